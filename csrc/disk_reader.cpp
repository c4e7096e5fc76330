#include "disk_reader.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <vector>

#include "bindings.h"
#include "errors.h"
#include "uring_engine.h"

namespace py = pybind11;

namespace klotski {

IOMode parse_io_mode(const std::string& s) {
  std::string u = s;
  std::transform(u.begin(), u.end(), u.begin(), [](unsigned char c) { return std::toupper(c); });
  if (u == "AUTO") return IOMode::Auto;
  if (u == "DIRECT") return IOMode::Direct;
  if (u == "POSIX") return IOMode::Posix;
  throw std::invalid_argument("io mode must be AUTO, DIRECT or POSIX, got '" + s + "'");
}

std::string io_mode_name(IOMode m) {
  switch (m) {
    case IOMode::Auto: return "AUTO";
    case IOMode::Direct: return "DIRECT";
    default: return "POSIX";
  }
}

static uint64_t round_down(uint64_t x) { return x / kDirectAlignment * kDirectAlignment; }
static uint64_t round_up(uint64_t x) { return (x + kDirectAlignment - 1) / kDirectAlignment * kDirectAlignment; }
size_t span_bytes(uint64_t offset, uint64_t nbytes) { return round_up(offset % kDirectAlignment + nbytes); }

DiskReader::DiskReader(IOMode mode, size_t num_threads, size_t chunk_bytes, EngineKind engine, size_t queue_depth)
    : mode_(mode), chunk_bytes_(chunk_bytes) {
  if (chunk_bytes == 0 || chunk_bytes % kDirectAlignment != 0) {
    throw std::invalid_argument("chunk_bytes must be a positive multiple of 4096, got " + std::to_string(chunk_bytes));
  }
  if (num_threads == 0) throw std::invalid_argument("num_threads must be >= 1, got 0");
  if (queue_depth == 0) throw std::invalid_argument("queue_depth must be >= 1, got 0");
  engine_ = make_engine(engine, num_threads, queue_depth, &engine_note_);
}

DiskReader::~DiskReader() { close(true); }

std::shared_ptr<OpenFile> DiskReader::open(const std::string& path, uint64_t offset, uint64_t nbytes) {
  std::lock_guard<std::mutex> g(files_mu_);
  auto it = files_.find(path);
  if (it != files_.end()) return it->second;
  auto f = std::make_shared<OpenFile>();
  f->path = path;
  if (mode_ != IOMode::Posix) {
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_DIRECT);
    if (fd >= 0) {
      f->direct_fd = fd;
      f->direct.store(true);
    } else if (!(errno == EINVAL && mode_ == IOMode::Auto)) {
      int err = errno;
      throw OSErrorWithPath(err, "cannot open " + describe_request(path, offset, nbytes) + (mode_ == IOMode::Direct ? " with O_DIRECT" : "") + ": " + std::strerror(err), path);
    }
  }
  if (!f->direct.load()) {
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
      int err = errno;
      throw OSErrorWithPath(err, "cannot open " + describe_request(path, offset, nbytes) + ": " + std::strerror(err), path);
    }
    f->posix_fd = fd;
  }
  files_[path] = f;
  return f;
}

std::shared_ptr<ReadTicket> DiskReader::read(const std::string& path, uint64_t offset, uint64_t nbytes,
                                             uint8_t* dest, size_t capacity) {
  return submit(path, offset, nbytes, dest, capacity, nullptr);
}

std::shared_ptr<ReadTicket> DiskReader::read_into_slot(const std::string& path, uint64_t offset, uint64_t nbytes,
                                                       const Slot& slot) {
  uint8_t* dest = slot.data("read of " + describe_request(path, offset, nbytes) + " into");
  return submit(path, offset, nbytes, dest, slot.capacity(), &slot);
}

DiskReader::Layout DiskReader::layout(const std::string& path, uint64_t offset, uint64_t nbytes, uint8_t* dest,
                                      size_t capacity) {
  const size_t view = offset % kDirectAlignment;
  const size_t span = span_bytes(offset, nbytes);
  if (view + nbytes > capacity) {
    throw std::invalid_argument("read of " + describe_request(path, offset, nbytes) + ": destination holds " +
                                std::to_string(capacity) + " bytes but needs " + std::to_string(view + nbytes) +
                                " (data lands at offset % 4096 = " + std::to_string(view) + ")");
  }
  const bool aligned_dest = reinterpret_cast<uintptr_t>(dest) % kDirectAlignment == 0 && capacity >= span;
  if (mode_ == IOMode::Direct && !aligned_dest) {
    throw std::invalid_argument("read of " + describe_request(path, offset, nbytes) +
                                ": DIRECT mode needs a 4096-aligned destination of at least " +
                                std::to_string(span) + " bytes (got address " +
                                std::to_string(reinterpret_cast<uintptr_t>(dest)) + ", " +
                                std::to_string(capacity) + " bytes)");
  }
  Layout l;
  l.file = open(path, offset, nbytes);
  l.direct = l.file->direct.load() && aligned_dest;
  l.base = l.direct ? round_down(offset) : offset;
  l.end = l.direct ? round_down(offset) + span : offset + nbytes;
  l.out = l.direct ? dest : dest + view;
  return l;
}

std::shared_ptr<ReadTicket> DiskReader::submit(const std::string& path, uint64_t offset, uint64_t nbytes,
                                               uint8_t* dest, size_t capacity, const Slot* slot) {
  if (closed_.load()) throw ReaderClosed("read of " + describe_request(path, offset, nbytes) + ": the reader is closed");
  const Layout l = layout(path, offset, nbytes, dest, capacity);

  // Pieces: [start, end) in file coordinates, written at l.out + (start - l.base).
  std::vector<std::pair<uint64_t, uint64_t>> pieces;
  for (uint64_t s = l.base; s < l.end || pieces.empty(); s += chunk_bytes_) {
    pieces.emplace_back(s, std::min<uint64_t>(l.end, s + chunk_bytes_));
    if (l.end == l.base) break;  // nbytes == 0: one empty piece
  }
  auto ticket = std::make_shared<ReadTicket>(path, offset, nbytes, l.direct, pieces.size());
  if (slot) {
    ticket->slot = *slot;
    slot->track(ticket);
  }
  const uint64_t req_end = offset + nbytes;
  std::vector<ReadPiece> reads;
  reads.reserve(pieces.size());
  for (auto [s, e] : pieces) {
    ReadPiece p;
    p.ticket = ticket;
    p.file = l.file;
    p.allow_fallback = mode_ == IOMode::Auto;
    p.direct = l.direct;
    p.off = s;
    p.len = static_cast<size_t>(e - s);
    p.need = static_cast<size_t>(std::min<uint64_t>(p.len, req_end > s ? req_end - s : 0));
    p.dst = l.out + (s - l.base);
    reads.push_back(std::move(p));
  }
  if (!engine_->submit(reads)) {
    ticket->cancel();
    for (auto& p : reads) p.ticket->finish_piece(p.dropped());
    throw ReaderClosed(ticket->describe() + ": the reader is closed");
  }
  return ticket;
}

std::shared_ptr<ReadTicket> DiskReader::read_now(const std::string& path, uint64_t offset, uint64_t nbytes,
                                                 uint8_t* dest, size_t capacity) {
  SyncReadScope scope(*this, path, offset, nbytes);
  const Layout l = layout(path, offset, nbytes, dest, capacity);
  auto ticket = std::make_shared<ReadTicket>(path, offset, nbytes, l.direct, 1);
  ReadPiece p;
  p.ticket = ticket;
  p.file = l.file;
  p.allow_fallback = mode_ == IOMode::Auto;
  p.direct = l.direct;
  p.off = l.base;
  p.len = static_cast<size_t>(l.end - l.base);
  p.need = static_cast<size_t>(offset + nbytes - l.base);  // the superset's tail may lie past end of file
  p.dst = l.out;
  read_piece_blocking(p);  // throws OSErrorWithPath / ShortReadError naming the request
  ticket->finish_piece(nullptr);
  return ticket;
}

std::shared_ptr<ReadTicket> DiskReader::read_now_into_slot(const std::string& path, uint64_t offset,
                                                           uint64_t nbytes, const Slot& slot) {
  uint8_t* dest = slot.data("read of " + describe_request(path, offset, nbytes) + " into");
  return read_now(path, offset, nbytes, dest, slot.capacity());
}

DiskReader::SyncReadScope::SyncReadScope(DiskReader& r, const std::string& path, uint64_t offset, uint64_t nbytes)
    : r_(r) {
  std::lock_guard<std::mutex> g(r_.sync_mu_);
  if (r_.closed_.load()) {
    throw ReaderClosed("read of " + describe_request(path, offset, nbytes) + ": the reader is closed");
  }
  ++r_.sync_reads_;
}

DiskReader::SyncReadScope::~SyncReadScope() {
  std::lock_guard<std::mutex> g(r_.sync_mu_);
  if (--r_.sync_reads_ == 0) r_.sync_idle_.notify_all();
}

void DiskReader::close(bool cancel) {
  std::lock_guard<std::mutex> g(close_mu_);
  {
    // No read_now starts after this; the ones running finish (a pread cannot be cancelled) before close returns.
    std::unique_lock<std::mutex> lk(sync_mu_);
    closed_.store(true);
    sync_idle_.wait(lk, [&] { return sync_reads_ == 0; });
  }
  if (engine_) engine_->shutdown(cancel);
  std::lock_guard<std::mutex> f(files_mu_);
  files_.clear();
}

void DiskReader::forget(const std::string& path) {
  std::lock_guard<std::mutex> g(files_mu_);
  files_.erase(path);
}

std::string DiskReader::file_mode(const std::string& path) {
  auto f = open(path, 0, 0);
  return f->direct.load() ? "DIRECT" : "POSIX";
}

void register_disk_reader(py::module_& m) {
  m.def("span_bytes", &span_bytes, py::arg("offset"), py::arg("nbytes"),
        "Bytes a direct read of (offset, nbytes) fills: round_up(offset % 4096 + nbytes, 4096).");
  m.attr("DIRECT_ALIGNMENT") = kDirectAlignment;
  py::class_<ReadTicket, std::shared_ptr<ReadTicket>>(m, "ReadTicket", "One queued read; poll done() or wait().")
      .def("done", &ReadTicket::done, py::call_guard<py::gil_scoped_release>())
      .def("wait", &ReadTicket::wait, py::arg("timeout_s") = -1.0, py::call_guard<py::gil_scoped_release>())
      .def("rethrow_if_failed", &ReadTicket::rethrow_if_failed)
      .def_property_readonly("path", &ReadTicket::path)
      .def_property_readonly("offset", &ReadTicket::offset)
      .def_property_readonly("nbytes", &ReadTicket::nbytes)
      .def_property_readonly("view_offset", &ReadTicket::view_offset)
      .def_property_readonly("mode", &ReadTicket::mode)
      .def("__repr__", [](const ReadTicket& t) { return "<klotski._C.ReadTicket " + t.describe() + ">"; });
  m.def("io_uring_info", [] {
        UringSupport s = probe_io_uring();
        py::dict d;
        d["available"] = s.available;
        d["reason"] = s.reason;
        return d;
      },
      "Whether this kernel lets us set up an io_uring with IORING_OP_READ: {'available': bool, 'reason': str}.");
  py::class_<DiskReader>(m, "DiskReader",
                         "Disk reads (O_DIRECT / buffered POSIX) on a thread pool or an io_uring (engine=).")
      .def(py::init([](const std::string& mode, size_t num_threads, size_t chunk_bytes, const std::string& engine,
                       size_t queue_depth) {
             return std::make_unique<DiskReader>(parse_io_mode(mode), num_threads, chunk_bytes, parse_engine(engine),
                                                 queue_depth);
           }),
           py::arg("mode") = "AUTO", py::arg("num_threads") = 8, py::arg("chunk_bytes") = 4 << 20,
           py::arg("engine") = "auto", py::arg("queue_depth") = 32, py::call_guard<py::gil_scoped_release>())
      .def("read", [](DiskReader& r, const std::string& path, uint64_t offset, uint64_t nbytes, uintptr_t address,
                      size_t capacity) {
             return r.read(path, offset, nbytes, reinterpret_cast<uint8_t*>(address), capacity);
           },
           py::arg("path"), py::arg("offset"), py::arg("nbytes"), py::arg("address"), py::arg("capacity"),
           py::call_guard<py::gil_scoped_release>(),
           "Read into raw host memory [address, address + capacity). The caller keeps that memory alive.")
      .def("read_into_slot", &DiskReader::read_into_slot, py::arg("path"), py::arg("offset"), py::arg("nbytes"),
           py::arg("slot"), py::call_guard<py::gil_scoped_release>())
      .def("read_now", [](DiskReader& r, const std::string& path, uint64_t offset, uint64_t nbytes,
                          uintptr_t address, size_t capacity) {
             return r.read_now(path, offset, nbytes, reinterpret_cast<uint8_t*>(address), capacity);
           },
           py::arg("path"), py::arg("offset"), py::arg("nbytes"), py::arg("address"), py::arg("capacity"),
           py::call_guard<py::gil_scoped_release>(),
           "Read into [address, address + capacity) on the calling thread (GIL released); returns the finished "
           "ticket, raises the read's error.")
      .def("read_now_into_slot", &DiskReader::read_now_into_slot, py::arg("path"), py::arg("offset"),
           py::arg("nbytes"), py::arg("slot"), py::call_guard<py::gil_scoped_release>())
      .def("close", &DiskReader::close, py::arg("cancel") = false, py::call_guard<py::gil_scoped_release>())
      .def("forget", &DiskReader::forget, py::arg("path"))
      .def("file_mode", &DiskReader::file_mode, py::arg("path"), py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("closed", &DiskReader::closed)
      .def_property_readonly("mode", [](const DiskReader& r) { return io_mode_name(r.mode()); })
      .def_property_readonly("num_threads", &DiskReader::num_threads)
      .def_property_readonly("queue_depth", &DiskReader::queue_depth)
      .def_property_readonly("engine", &DiskReader::engine)
      .def_property_readonly("engine_note", &DiskReader::engine_note)
      .def_property_readonly("chunk_bytes", &DiskReader::chunk_bytes);
}

}  // namespace klotski
