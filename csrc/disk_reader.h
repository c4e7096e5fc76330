// Disk reads on a native thread pool, straight into ring slots or aligned host buffers, bypassing the page
// cache with O_DIRECT where the file system allows it.
//
// IO modes (as kvikio's compat mode): DIRECT (O_DIRECT; an error where it is refused), POSIX (buffered pread),
// AUTO (O_DIRECT per file, decided once per file: falls back to buffered POSIX for files that refuse it,
// and for requests whose destination is not page-aligned or too small for the aligned superset).
//
// Layout: whatever the mode, the requested bytes land at dest + view_offset, view_offset = offset % 4096.
// A direct request reads the aligned superset [offset rounded down, offset + nbytes rounded up), so its
// destination must be page-aligned and hold span_bytes(offset, nbytes) bytes.
// Large requests are split into chunk_bytes pieces that run in parallel; one ticket tracks all pieces.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>

#include "completion.h"
#include "ring_buffer.h"
#include "thread_pool.h"

namespace klotski {

enum class IOMode { Auto, Direct, Posix };
IOMode parse_io_mode(const std::string& s);
std::string io_mode_name(IOMode m);

constexpr size_t kDirectAlignment = 4096;
size_t span_bytes(uint64_t offset, uint64_t nbytes);  // round_up(offset % 4096 + nbytes, 4096)

struct OpenFile;

class ReadTicket : public Completion {
 public:
  ReadTicket(std::string path, uint64_t offset, uint64_t nbytes, bool direct, size_t pieces);
  bool done() override;
  std::string describe() const override;
  // Blocks (GIL released by the binding) until every piece finished; rethrows the first error.
  // timeout_s < 0: no limit; on timeout throws WaitTimeout (the read keeps going).
  void wait(double timeout_s);
  // Re-raises the error of a finished ticket, if any (no waiting).
  void rethrow_if_failed();
  void finish_piece(std::exception_ptr error);
  void fell_back_to_posix() { direct_ = false; }

  const std::string& path() const { return path_; }
  uint64_t offset() const { return offset_; }
  uint64_t nbytes() const { return nbytes_; }
  size_t view_offset() const { return static_cast<size_t>(offset_ % kDirectAlignment); }
  std::string mode() const { return direct_ ? "DIRECT" : "POSIX"; }
  bool cancelled() const { return cancelled_.load(); }
  void cancel() { cancelled_.store(true); }
  std::optional<Slot> slot;  // keeps the ring's memory alive while the read runs

 private:
  std::string path_;
  uint64_t offset_, nbytes_;
  std::atomic<bool> direct_;
  std::atomic<bool> cancelled_{false};
  std::mutex mu_;
  std::condition_variable cv_;
  size_t pending_;
  std::exception_ptr error_;
};

class DiskReader {
 public:
  DiskReader(IOMode mode, size_t num_threads, size_t chunk_bytes);
  ~DiskReader();
  // Queue a read of [offset, offset + nbytes) of path into dest (capacity bytes). Opens the file on first
  // use (a missing file raises here, naming path, offset and size). Errors of the read itself surface
  // from ReadTicket::wait.
  std::shared_ptr<ReadTicket> read(const std::string& path, uint64_t offset, uint64_t nbytes, uint8_t* dest,
                                   size_t capacity);
  std::shared_ptr<ReadTicket> read_into_slot(const std::string& path, uint64_t offset, uint64_t nbytes,
                                             const Slot& slot);
  // cancel=false: drain every queued piece first; cancel=true: queued pieces fail with ReaderClosed.
  // Pieces already running always finish. Afterwards read() raises ReaderClosed. Idempotent.
  void close(bool cancel);
  bool closed() const { return closed_.load(); }
  // Forget the cached descriptors of path (next read reopens it, e.g. after the file was replaced).
  void forget(const std::string& path);
  // The mode a file was opened in ("DIRECT" or "POSIX"); opens it if needed.
  std::string file_mode(const std::string& path);
  IOMode mode() const { return mode_; }
  size_t num_threads() const { return num_threads_; }
  size_t chunk_bytes() const { return chunk_bytes_; }

 private:
  std::shared_ptr<OpenFile> open(const std::string& path, uint64_t offset, uint64_t nbytes);
  std::shared_ptr<ReadTicket> submit(const std::string& path, uint64_t offset, uint64_t nbytes, uint8_t* dest,
                                     size_t capacity, const Slot* slot);
  IOMode mode_;
  size_t num_threads_, chunk_bytes_;
  std::unique_ptr<ThreadPool> pool_;
  std::mutex files_mu_, close_mu_;
  std::map<std::string, std::shared_ptr<OpenFile>> files_;
  std::atomic<bool> closed_{false};
};

}  // namespace klotski
