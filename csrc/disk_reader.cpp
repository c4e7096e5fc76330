#include "disk_reader.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <vector>

#include "bindings.h"
#include "errors.h"

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

// One file's descriptors: an O_DIRECT one (when the file system accepts it) and a buffered one (opened on
// first need). `direct` turns false for good if an O_DIRECT read is refused with EINVAL in AUTO mode.
struct OpenFile {
  std::string path;
  int direct_fd = -1;
  int posix_fd = -1;
  std::atomic<bool> direct{false};
  std::mutex mu;

  ~OpenFile() {
    if (direct_fd >= 0) ::close(direct_fd);
    if (posix_fd >= 0) ::close(posix_fd);
  }
  int buffered_fd() {
    std::lock_guard<std::mutex> g(mu);
    if (posix_fd < 0) {
      int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
      if (fd < 0) throw OSErrorWithPath(errno, "cannot reopen '" + path + "' for buffered reads: " +
                                                   std::strerror(errno), path);
      posix_fd = fd;
    }
    return posix_fd;
  }
  uint64_t size() const {
    struct stat st;
    int fd = direct_fd >= 0 ? direct_fd : posix_fd;
    return (fd >= 0 && fstat(fd, &st) == 0) ? static_cast<uint64_t>(st.st_size) : 0;
  }
};

ReadTicket::ReadTicket(std::string path, uint64_t offset, uint64_t nbytes, bool direct, size_t pieces)
    : path_(std::move(path)), offset_(offset), nbytes_(nbytes), direct_(direct), pending_(pieces) {}

bool ReadTicket::done() {
  std::lock_guard<std::mutex> g(mu_);
  return pending_ == 0;
}

std::string ReadTicket::describe() const { return "read of " + describe_request(path_, offset_, nbytes_); }

void ReadTicket::finish_piece(std::exception_ptr error) {
  {
    std::lock_guard<std::mutex> g(mu_);
    if (error && !error_) error_ = error;
    if (pending_ > 0) --pending_;
  }
  cv_.notify_all();
}

void ReadTicket::wait(double timeout_s) {
  std::unique_lock<std::mutex> lk(mu_);
  if (!wait_interruptibly(lk, cv_, timeout_s, [&] { return pending_ == 0; })) {
    throw WaitTimeout(describe() + " not finished after " + std::to_string(timeout_s) + " s");
  }
  if (error_) std::rethrow_exception(error_);
}

void ReadTicket::rethrow_if_failed() {
  std::lock_guard<std::mutex> g(mu_);
  if (pending_ == 0 && error_) std::rethrow_exception(error_);
}

// Read [off, off + len) into dst; `need` of those bytes must arrive (the rest may lie past end of file).
static void read_piece(ReadTicket& t, OpenFile& f, bool allow_fallback, bool direct, uint64_t off, size_t len,
                       uint8_t* dst, size_t need) {
  int fd = direct ? f.direct_fd : f.buffered_fd();
  size_t got = 0;
  while (got < len) {
    ssize_t r = ::pread(fd, dst + got, len - got, static_cast<off_t>(off + got));
    if (r < 0) {
      int err = errno;
      if (err == EINTR) continue;
      if (direct && err == EINVAL && allow_fallback && got == 0) {
        f.direct.store(false);  // this file refuses O_DIRECT reads: buffered from now on
        t.fell_back_to_posix();
        fd = f.buffered_fd();
        direct = false;
        continue;
      }
      throw OSErrorWithPath(err, t.describe() + " failed: " + std::strerror(err) + " (pread of " +
                                     std::to_string(len - got) + " bytes at " + std::to_string(off + got) + ")",
                            t.path());
    }
    if (r == 0) break;  // end of file
    got += static_cast<size_t>(r);
  }
  if (got < need) {
    uint64_t size = f.size();
    throw ShortReadError("short read: " + t.describe() + " reaches past end of file (file is " +
                         std::to_string(size) + " bytes, request ends at " +
                         std::to_string(t.offset() + t.nbytes()) + "); got " + std::to_string(got) + " of " +
                         std::to_string(need) + " bytes at " + std::to_string(off));
  }
}

DiskReader::DiskReader(IOMode mode, size_t num_threads, size_t chunk_bytes)
    : mode_(mode), num_threads_(num_threads), chunk_bytes_(chunk_bytes) {
  if (chunk_bytes == 0 || chunk_bytes % kDirectAlignment != 0) {
    throw std::invalid_argument("chunk_bytes must be a positive multiple of 4096, got " + std::to_string(chunk_bytes));
  }
  pool_ = std::make_unique<ThreadPool>(num_threads);
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

std::shared_ptr<ReadTicket> DiskReader::submit(const std::string& path, uint64_t offset, uint64_t nbytes,
                                               uint8_t* dest, size_t capacity, const Slot* slot) {
  if (closed_.load()) throw ReaderClosed("read of " + describe_request(path, offset, nbytes) + ": the reader is closed");
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
  std::shared_ptr<OpenFile> file = open(path, offset, nbytes);
  const bool direct = file->direct.load() && aligned_dest;
  const bool allow_fallback = mode_ == IOMode::Auto;

  // Pieces: [start, end) in file coordinates, written at dest + (start - base).
  const uint64_t base = direct ? round_down(offset) : offset;
  const uint64_t end = direct ? round_down(offset) + span : offset + nbytes;
  uint8_t* const out = direct ? dest : dest + view;
  std::vector<std::pair<uint64_t, uint64_t>> pieces;
  for (uint64_t s = base; s < end || pieces.empty(); s += chunk_bytes_) {
    pieces.emplace_back(s, std::min<uint64_t>(end, s + chunk_bytes_));
    if (end == base) break;  // nbytes == 0: one empty piece
  }
  auto ticket = std::make_shared<ReadTicket>(path, offset, nbytes, direct, pieces.size());
  if (slot) {
    ticket->slot = *slot;
    slot->track(ticket);
  }
  const uint64_t req_end = offset + nbytes;
  std::vector<Task> tasks;
  tasks.reserve(pieces.size());
  for (auto [s, e] : pieces) {
    const size_t len = static_cast<size_t>(e - s);
    const size_t need = static_cast<size_t>(std::min<uint64_t>(len, req_end > s ? req_end - s : 0));
    uint8_t* dst = out + (s - base);
    Task task;
    task.run = [ticket, file, allow_fallback, direct, s, len, dst, need] {
      if (ticket->cancelled()) {
        ticket->finish_piece(std::make_exception_ptr(ReaderClosed(ticket->describe() + " cancelled")));
        return;
      }
      try {
        read_piece(*ticket, *file, allow_fallback, direct && file->direct.load(), s, len, dst, need);
        ticket->finish_piece(nullptr);
      } catch (...) {
        ticket->finish_piece(std::current_exception());
      }
    };
    task.drop = [ticket] {
      ticket->cancel();
      ticket->finish_piece(std::make_exception_ptr(
          ReaderClosed(ticket->describe() + " was cancelled: the reader was closed before it ran")));
    };
    tasks.push_back(std::move(task));
  }
  if (!pool_->submit_all(tasks)) {
    for (auto& t : tasks) t.drop();
    throw ReaderClosed(ticket->describe() + ": the reader is closed");
  }
  return ticket;
}

void DiskReader::close(bool cancel) {
  std::lock_guard<std::mutex> g(close_mu_);
  closed_.store(true);
  if (pool_) pool_->shutdown(cancel);
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
  py::class_<DiskReader>(m, "DiskReader", "Disk reads on a native thread pool (O_DIRECT / buffered POSIX).")
      .def(py::init([](const std::string& mode, size_t num_threads, size_t chunk_bytes) {
             return std::make_unique<DiskReader>(parse_io_mode(mode), num_threads, chunk_bytes);
           }),
           py::arg("mode") = "AUTO", py::arg("num_threads") = 8, py::arg("chunk_bytes") = 4 << 20)
      .def("read", [](DiskReader& r, const std::string& path, uint64_t offset, uint64_t nbytes, uintptr_t address,
                      size_t capacity) {
             return r.read(path, offset, nbytes, reinterpret_cast<uint8_t*>(address), capacity);
           },
           py::arg("path"), py::arg("offset"), py::arg("nbytes"), py::arg("address"), py::arg("capacity"),
           py::call_guard<py::gil_scoped_release>(),
           "Read into raw host memory [address, address + capacity). The caller keeps that memory alive.")
      .def("read_into_slot", &DiskReader::read_into_slot, py::arg("path"), py::arg("offset"), py::arg("nbytes"),
           py::arg("slot"), py::call_guard<py::gil_scoped_release>())
      .def("close", &DiskReader::close, py::arg("cancel") = false, py::call_guard<py::gil_scoped_release>())
      .def("forget", &DiskReader::forget, py::arg("path"))
      .def("file_mode", &DiskReader::file_mode, py::arg("path"), py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("closed", &DiskReader::closed)
      .def_property_readonly("mode", [](const DiskReader& r) { return io_mode_name(r.mode()); })
      .def_property_readonly("num_threads", &DiskReader::num_threads)
      .def_property_readonly("chunk_bytes", &DiskReader::chunk_bytes);
}

}  // namespace klotski
