// Disk reads straight into ring slots or aligned host buffers, bypassing the page cache with O_DIRECT where
// the file system allows it, on one of two engines (read_engine.h): a thread pool of blocking pread()s or an
// io_uring driven by one thread.
//
// IO modes (as kvikio's compat mode): DIRECT (O_DIRECT; an error where it is refused), POSIX (buffered pread),
// AUTO (O_DIRECT per file, decided once per file: falls back to buffered POSIX for files that refuse it,
// and for requests whose destination is not page-aligned or too small for the aligned superset).
//
// Layout: whatever the mode, the requested bytes land at dest + view_offset, view_offset = offset % 4096.
// A direct request reads the aligned superset [offset rounded down, offset + nbytes rounded up), so its
// destination must be page-aligned and hold span_bytes(offset, nbytes) bytes.
// Large requests are split into chunk_bytes pieces that run in parallel; one ticket tracks all pieces.
//
// read_now() does the same read on the calling thread (one blocking pread loop, no engine, no thread hop):
// for a caller that would wait on the ticket at once anyway (a queue-depth-1 reader). Same modes, layout,
// errors and open-file cache; safe from several threads at once; close() waits for the running ones.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>

#include "read_engine.h"
#include "read_request.h"
#include "ring_buffer.h"

namespace klotski {

enum class IOMode { Auto, Direct, Posix };
IOMode parse_io_mode(const std::string& s);
std::string io_mode_name(IOMode m);

size_t span_bytes(uint64_t offset, uint64_t nbytes);  // round_up(offset % 4096 + nbytes, 4096)

class DiskReader {
 public:
  // engine: see read_engine.h; num_threads sizes the thread pool, queue_depth the io_uring.
  DiskReader(IOMode mode, size_t num_threads, size_t chunk_bytes, EngineKind engine = EngineKind::Threads,
             size_t queue_depth = 32);
  ~DiskReader();
  // Queue a read of [offset, offset + nbytes) of path into dest (capacity bytes). Opens the file on first
  // use (a missing file raises here, naming path, offset and size). Errors of the read itself surface
  // from ReadTicket::wait.
  std::shared_ptr<ReadTicket> read(const std::string& path, uint64_t offset, uint64_t nbytes, uint8_t* dest,
                                   size_t capacity);
  std::shared_ptr<ReadTicket> read_into_slot(const std::string& path, uint64_t offset, uint64_t nbytes,
                                             const Slot& slot);
  // The same read done on the calling thread before returning (call it with the GIL released). Returns the
  // ticket, already finished (view_offset, mode); errors of the read throw here (OSErrorWithPath,
  // ShortReadError, ReaderClosed after close), not from the ticket.
  std::shared_ptr<ReadTicket> read_now(const std::string& path, uint64_t offset, uint64_t nbytes, uint8_t* dest,
                                       size_t capacity);
  std::shared_ptr<ReadTicket> read_now_into_slot(const std::string& path, uint64_t offset, uint64_t nbytes,
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
  size_t num_threads() const { return engine_->num_threads(); }
  size_t queue_depth() const { return engine_->queue_depth(); }
  std::string engine() const { return engine_->name(); }
  const std::string& engine_note() const { return engine_note_; }
  size_t chunk_bytes() const { return chunk_bytes_; }

 private:
  // Where a request's bytes go: the file, whether it is read with O_DIRECT (the aligned superset), and the
  // file range [base, end) written at out. Validates the destination (invalid_argument) and opens the file.
  struct Layout {
    std::shared_ptr<OpenFile> file;
    bool direct = false;
    uint64_t base = 0, end = 0;
    uint8_t* out = nullptr;
  };
  // Counts a running read_now() for close(); throws ReaderClosed once close() began.
  class SyncReadScope {
   public:
    SyncReadScope(DiskReader& r, const std::string& path, uint64_t offset, uint64_t nbytes);
    ~SyncReadScope();
    SyncReadScope(const SyncReadScope&) = delete;
    SyncReadScope& operator=(const SyncReadScope&) = delete;

   private:
    DiskReader& r_;
  };
  Layout layout(const std::string& path, uint64_t offset, uint64_t nbytes, uint8_t* dest, size_t capacity);
  std::shared_ptr<OpenFile> open(const std::string& path, uint64_t offset, uint64_t nbytes);
  std::shared_ptr<ReadTicket> submit(const std::string& path, uint64_t offset, uint64_t nbytes, uint8_t* dest,
                                     size_t capacity, const Slot* slot);
  IOMode mode_;
  size_t chunk_bytes_;
  std::unique_ptr<ReadEngine> engine_;
  std::string engine_note_;
  std::mutex files_mu_, close_mu_;
  std::map<std::string, std::shared_ptr<OpenFile>> files_;
  std::atomic<bool> closed_{false};
  std::mutex sync_mu_;  // guards sync_reads_ and the closed_ check of read_now()
  std::condition_variable sync_idle_;
  size_t sync_reads_ = 0;  // read_now() calls running
};

}  // namespace klotski
