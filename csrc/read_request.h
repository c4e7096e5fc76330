// What the disk reader hands to its engines: an open file, a ticket per request, and pieces of requests.
// A request is split into pieces (chunk_bytes each); an engine reads each piece into its destination and
// reports the piece's outcome to the ticket. Engines (read_engine.h): blocking pread() on a thread pool, or
// io_uring (uring_engine.h).
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <optional>
#include <string>

#include "completion.h"
#include "ring_buffer.h"

namespace klotski {

constexpr size_t kDirectAlignment = 4096;

// One file's descriptors: an O_DIRECT one (when the file system accepts it) and a buffered one (opened on
// first need). `direct` turns false for good if an O_DIRECT read is refused with EINVAL in AUTO mode.
struct OpenFile {
  std::string path;
  int direct_fd = -1;
  int posix_fd = -1;
  std::atomic<bool> direct{false};
  std::mutex mu;

  ~OpenFile();
  int buffered_fd();     // opens it on first use; OSErrorWithPath if that fails
  uint64_t size() const;  // current size (0 if unknown)
};

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

// File bytes [off, off + len) go to dst; `need` of them must arrive (the rest may lie past end of file).
// `got` counts the bytes read so far (engines resume short reads from there).
struct ReadPiece {
  std::shared_ptr<ReadTicket> ticket;
  std::shared_ptr<OpenFile> file;
  bool allow_fallback = false;  // AUTO mode: an O_DIRECT refusal (EINVAL) switches the file to buffered
  bool direct = false;
  uint64_t off = 0;
  size_t len = 0;
  uint8_t* dst = nullptr;
  size_t need = 0;
  size_t got = 0;

  int fd() { return direct ? file->direct_fd : file->buffered_fd(); }
  // After a read failed with err: if it is an O_DIRECT refusal this piece may recover from (AUTO mode, no
  // byte read yet), switch the piece and its file to buffered reads and return true.
  bool fall_back_to_posix(int err);
  std::exception_ptr os_error(int err) const;   // OSError naming the request and this piece's remainder
  std::exception_ptr short_read() const;        // end of file after got < need bytes
  std::exception_ptr cancelled() const;         // another piece of the ticket was dropped at close
  std::exception_ptr dropped() const;           // this piece was still queued when the reader closed
};

// Reads a whole piece with blocking pread() (EINTR retried, short reads resumed); throws on error.
void read_piece_blocking(ReadPiece& p);

}  // namespace klotski
