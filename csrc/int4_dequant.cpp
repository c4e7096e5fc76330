// int4 dequantization on the host, one pass: the CPU path's cost of computing from an int4 expert slot.
//
// Computes exactly klotski.quant.int4.dequantize_int4's values: W[n, k] = (code - zero) * scale in fp32, one
// rounding (code - zero is a small integer, exact in fp32; the product is one IEEE multiply), written as fp32.
// Layout (klotski/quant/int4.py): codes [rows, K/2] uint8 (even k in the low nibble), scales [rows, K/G] fp32 /
// bf16 / fp16, zeros [rows, K/G] uint8 or none (zero point 8). Links to no torch: tensors are passed by address
// from Python, which checks their shapes, dtypes and contiguity.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <thread>
#include <vector>

#include "bindings.h"

namespace py = pybind11;

namespace klotski {
namespace {

enum ScaleKind { kF32 = 0, kBF16 = 1, kF16 = 2 };

float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t mant = h & 0x3FFu;
  uint32_t bits;
  if (exp == 0x1Fu) {
    bits = sign | 0x7F800000u | (mant << 13);  // inf / nan
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;
  } else {  // subnormal half: normalise
    exp = 113u;
    while (!(mant & 0x400u)) {
      mant <<= 1;
      --exp;
    }
    bits = sign | (exp << 23) | ((mant & 0x3FFu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

float load_scale(const void* scales, int kind, size_t i) {
  if (kind == kF32) return static_cast<const float*>(scales)[i];
  const uint16_t v = static_cast<const uint16_t*>(scales)[i];
  if (kind == kBF16) {
    const uint32_t bits = static_cast<uint32_t>(v) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
  }
  return half_to_float(v);
}

// One group at a time: the 16 values (c - zero) * scale a code can take are computed first (the same IEEE
// operations as per weight, so the same values), then each byte's two codes are looked up.
__attribute__((optimize("O3"))) void dequant_rows(const uint8_t* codes, const void* scales, int kind,
                                                  const uint8_t* zeros, float* out, int64_t row0, int64_t row1,
                                                  int64_t k, int64_t group) {
  const int64_t groups = k / group, half_group = group / 2;
  float table[16];
  for (int64_t r = row0; r < row1; ++r) {
    for (int64_t g = 0; g < groups; ++g) {
      const size_t gi = static_cast<size_t>(r * groups + g);
      const float s = load_scale(scales, kind, gi);
      const float z = zeros ? static_cast<float>(zeros[gi]) : 8.0f;
      for (int c = 0; c < 16; ++c) table[c] = (static_cast<float>(c) - z) * s;
      const uint8_t* c = codes + r * (k / 2) + g * half_group;
      float* o = out + r * k + g * group;
      for (int64_t j = 0; j < half_group; ++j) {
        const uint8_t b = c[j];
        o[2 * j] = table[b & 0xF];
        o[2 * j + 1] = table[b >> 4];
      }
    }
  }
}

void dequantize_int4_host(uintptr_t codes, uintptr_t scales, int scale_kind, uintptr_t zeros, uintptr_t out,
                          int64_t rows, int64_t k, int64_t group, int threads) {
  if (rows < 0 || k <= 0 || group < 2 || group % 2 || k % group)
    throw std::invalid_argument("dequantize_int4_host: bad shape (rows " + std::to_string(rows) + ", K " +
                                std::to_string(k) + ", group " + std::to_string(group) + ")");
  if (scale_kind < kF32 || scale_kind > kF16)
    throw std::invalid_argument("dequantize_int4_host: scale_kind must be 0 (fp32), 1 (bf16) or 2 (fp16)");
  const auto* c = reinterpret_cast<const uint8_t*>(codes);
  const auto* s = reinterpret_cast<const void*>(scales);
  const auto* z = reinterpret_cast<const uint8_t*>(zeros);
  auto* o = reinterpret_cast<float*>(out);
  const int64_t min_rows = std::max<int64_t>(1, (1 << 20) / k);  // ~1M weights a thread at least
  const int n = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, rows / min_rows)));
  if (n == 1) {
    dequant_rows(c, s, scale_kind, z, o, 0, rows, k, group);
    return;
  }
  std::vector<std::thread> pool;
  const int64_t per = (rows + n - 1) / n;
  for (int t = 0; t < n; ++t) {
    const int64_t a = t * per, b = std::min(rows, a + per);
    if (a < b) pool.emplace_back(dequant_rows, c, s, scale_kind, z, o, a, b, k, group);
  }
  for (auto& th : pool) th.join();
}

}  // namespace

void register_int4_dequant(py::module_& m) {
  m.def("dequantize_int4_host", &dequantize_int4_host, py::arg("codes"), py::arg("scales"), py::arg("scale_kind"),
        py::arg("zeros"), py::arg("out"), py::arg("rows"), py::arg("k"), py::arg("group"), py::arg("threads") = 1,
        py::call_guard<py::gil_scoped_release>(),
        "out[rows, K] fp32 = (code - zero) * scale from int4 codes [rows, K/2] uint8, scales [rows, K/G] "
        "(scale_kind 0 fp32, 1 bf16, 2 fp16), zeros [rows, K/G] uint8 or 0 (zero point 8); contiguous, by address.");
}

}  // namespace klotski
