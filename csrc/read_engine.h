// How the disk reader's pieces get read. Two engines with the same contract:
//   threads: a pool of native threads, each running blocking pread()s (thread_pool.h);
//   uring:   one thread driving an io_uring (raw syscalls, no liburing) with a bounded queue depth.
// Contract: submit() queues pieces (false, pieces untouched, once shutdown began); every accepted piece is
// finished on its ticket exactly once. shutdown(cancel=false) reads everything queued first; cancel=true
// finishes queued pieces with ReaderClosed (their tickets are cancelled) without reading them. Pieces already
// being read always complete, so no destination is written after shutdown returns. Idempotent.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "read_request.h"

namespace klotski {

enum class EngineKind { Auto, Uring, Threads };
EngineKind parse_engine(const std::string& s);  // "auto" | "uring" | "threads" (case-insensitive)

class ReadEngine {
 public:
  virtual ~ReadEngine() = default;
  virtual bool submit(std::vector<ReadPiece>& pieces) = 0;
  virtual void shutdown(bool cancel) = 0;
  virtual std::string name() const = 0;     // "threads" or "uring"
  virtual size_t num_threads() const = 0;   // native threads doing the reads
  virtual size_t queue_depth() const = 0;   // pieces read at once at most
};

std::unique_ptr<ReadEngine> make_thread_engine(size_t num_threads);

// AUTO picks the engine the measurements favour on this kind of machine (see read_engine.cpp) and falls back
// to threads where io_uring cannot be set up; URING throws std::runtime_error naming why it is unavailable.
// `note` says why the engine was chosen.
std::unique_ptr<ReadEngine> make_engine(EngineKind kind, size_t num_threads, size_t queue_depth, std::string* note);

}  // namespace klotski
