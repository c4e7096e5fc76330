// The io_uring engine: one native thread owns an io_uring (set up with raw syscalls; liburing is not used)
// and both submits IORING_OP_READs straight into the destinations and reaps their completions, with at
// most queue_depth pieces in flight. Callers queue pieces and wake the thread through an eventfd that the
// ring itself reads. Short reads are resubmitted for the rest, -EAGAIN/-EINTR completions are retried, an
// O_DIRECT refusal in AUTO mode falls back to buffered reads, other errors fail the piece like pread would.
//
// The kernel may refuse io_uring (ENOSYS on old kernels, EPERM under seccomp or
// kernel.io_uring_disabled): probe_io_uring() says so, and make_uring_engine() throws naming the reason.
#pragma once
#include <memory>
#include <string>

#include "read_engine.h"

namespace klotski {

struct UringSupport {
  bool available = false;
  std::string reason;  // why not, or what was checked
};

// Sets up (and tears down) a small ring and checks IORING_OP_READ is supported.
UringSupport probe_io_uring();

// Throws std::runtime_error("io_uring unavailable: ...") where the ring cannot be set up.
std::unique_ptr<ReadEngine> make_uring_engine(size_t queue_depth);

}  // namespace klotski
