#include "record_load.h"

#include <pybind11/stl.h>

#include <chrono>
#include <cstring>

#include "bindings.h"
#include "errors.h"
#include "read_request.h"

namespace py = pybind11;

namespace klotski {

static float half_to_float(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu, mant = h & 0x3FFu, bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (mant << 13);  // inf / nan
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (mant << 13);  // normal: rebias 15 -> 127
  } else if (mant == 0) {
    bits = sign;  // +-0
  } else {  // subnormal: normalise
    exp = 113;
    while (!(mant & 0x400u)) {
      mant <<= 1;
      --exp;
    }
    bits = sign | (exp << 23) | ((mant & 0x3FFu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

void widen_to_f32(const uint16_t* src, float* dst, size_t n, Convert how) {
  if (how == Convert::Bf16ToF32) {
    auto* out = reinterpret_cast<uint32_t*>(dst);
    for (size_t i = 0; i < n; ++i) out[i] = static_cast<uint32_t>(src[i]) << 16;
  } else if (how == Convert::F16ToF32) {
    for (size_t i = 0; i < n; ++i) dst[i] = half_to_float(src[i]);
  } else {
    throw std::invalid_argument("widen_to_f32: conversion must be bf16 or fp16 -> fp32");
  }
}

static std::string part_name(const std::string& record, size_t i, const CopyPart& p) {
  return record + " part " + std::to_string(i) + " [" + std::to_string(p.src_offset) + ", " +
         std::to_string(p.src_offset + p.src_bytes) + ")";
}

std::shared_ptr<CopyEvent> load_record(DiskReader& reader, CopyEngine& engine, const std::string& path,
                                       uint64_t offset, uint64_t nbytes, const Slot& slot,
                                       const std::vector<CopyPart>& parts, uintptr_t stream, bool queued,
                                       bool synchronize, double timeout_s, double* read_seconds) {
  const std::string record = "record " + describe_request(path, offset, nbytes);
  for (size_t i = 0; i < parts.size(); ++i) {  // validate before any byte moves
    const CopyPart& p = parts[i];
    if (p.src_offset + p.src_bytes > nbytes || p.src_offset + p.src_bytes < p.src_offset) {
      throw std::invalid_argument(part_name(record, i, p) + " lies outside the record's " + std::to_string(nbytes) +
                                  " bytes");
    }
    if (p.convert != Convert::None && (engine.is_cuda() || p.src_bytes % 2 != 0)) {
      throw std::invalid_argument(part_name(record, i, p) + ": a widening copy is host-only, on whole 16-bit "
                                  "elements (CUDA copies move bytes as stored)");
    }
    if (p.dst == 0 && p.src_bytes != 0) throw std::invalid_argument(part_name(record, i, p) + ": null destination");
  }
  const auto t0 = std::chrono::steady_clock::now();
  if (queued) {
    reader.read_into_slot(path, offset, nbytes, slot)->wait(timeout_s);
  } else {
    reader.read_now_into_slot(path, offset, nbytes, slot);
  }
  if (read_seconds) *read_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const uint8_t* base = slot.data("copy of " + record + " out of") + offset % kDirectAlignment;
  if (!engine.is_cuda()) {
    for (const CopyPart& p : parts) {
      if (p.convert == Convert::None) {
        std::memcpy(reinterpret_cast<void*>(p.dst), base + p.src_offset, p.src_bytes);
      } else {
        widen_to_f32(reinterpret_cast<const uint16_t*>(base + p.src_offset), reinterpret_cast<float*>(p.dst),
                     p.src_bytes / 2, p.convert);
      }
    }
    return engine.completed("copy of " + record);
  }
  std::vector<CopyEngine::Span> spans;
  spans.reserve(parts.size());
  for (const CopyPart& p : parts) spans.push_back({base + p.src_offset, p.dst, p.src_bytes});
  auto ev = engine.copy_spans(spans, stream, "copy of " + record, &slot);
  if (synchronize) ev->synchronize(timeout_s);
  return ev;
}

void register_record_load(py::module_& m) {
  m.def(
      "load_record",
      [](DiskReader& reader, CopyEngine& engine, const std::string& path, uint64_t offset, uint64_t nbytes,
         const Slot& slot, const std::vector<std::tuple<size_t, uintptr_t, size_t, int>>& parts, uintptr_t stream,
         bool queued, bool synchronize, double timeout_s) {
        std::vector<CopyPart> ps;
        ps.reserve(parts.size());
        for (const auto& [src_offset, dst, src_bytes, convert] : parts) {
          if (convert < 0 || convert > 2) throw std::invalid_argument("convert must be 0, 1 or 2, got " + std::to_string(convert));
          ps.push_back({src_offset, dst, src_bytes, static_cast<Convert>(convert)});
        }
        double read_s = 0.0;
        auto ev = load_record(reader, engine, path, offset, nbytes, slot, ps, stream, queued, synchronize, timeout_s,
                              &read_s);
        return std::make_pair(ev, read_s);
      },
      py::arg("reader"), py::arg("engine"), py::arg("path"), py::arg("offset"), py::arg("nbytes"), py::arg("slot"),
      py::arg("parts"), py::arg("stream") = 0, py::arg("queued") = false, py::arg("synchronize") = true,
      py::arg("timeout_s") = -1.0, py::call_guard<py::gil_scoped_release>(),
      "Read a record into `slot` and copy its parts [(src_offset, dst_address, src_bytes, convert)] to the device "
      "(convert: 0 bytes as stored, 1 bf16 -> fp32, 2 fp16 -> fp32, host only). Returns (CopyEvent, read seconds).");
  m.def(
      "widen_to_f32",
      [](uintptr_t src, uintptr_t dst, size_t n, int convert) {
        widen_to_f32(reinterpret_cast<const uint16_t*>(src), reinterpret_cast<float*>(dst), n,
                     static_cast<Convert>(convert));
      },
      py::arg("src"), py::arg("dst"), py::arg("n"), py::arg("convert"), py::call_guard<py::gil_scoped_release>());
}

}  // namespace klotski
