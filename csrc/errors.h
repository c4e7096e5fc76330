// Typed errors of klotski._C and their Python mapping (see errors.cpp):
//   OSErrorWithPath  -> OSError(errno, message, path)  (so ENOENT becomes FileNotFoundError, EIO stays OSError)
//   ShortReadError   -> klotski._C.ShortReadError, a subclass of OSError (EOF before the requested bytes)
//   WaitTimeout      -> TimeoutError
//   RingExhausted    -> klotski._C.RingExhaustedError, a subclass of TimeoutError
//   SlotStateError   -> klotski._C.SlotStateError, a subclass of RuntimeError (double release, use after release)
//   ReaderClosed     -> klotski._C.ReaderClosedError, a subclass of RuntimeError (closed reader, cancelled read)
//   CudaError        -> klotski._C.CudaError, a subclass of RuntimeError
// std::invalid_argument keeps pybind11's mapping to ValueError.
#pragma once
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

namespace klotski {

struct OSErrorWithPath : std::runtime_error {
  OSErrorWithPath(int err, const std::string& msg, std::string path)
      : std::runtime_error(msg), err(err), path(std::move(path)) {}
  int err;
  std::string path;
};

struct ShortReadError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
struct WaitTimeout : std::runtime_error {
  using std::runtime_error::runtime_error;
};
struct RingExhausted : std::runtime_error {
  using std::runtime_error::runtime_error;
};
struct SlotStateError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
struct ReaderClosed : std::runtime_error {
  using std::runtime_error::runtime_error;
};
struct CudaError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// "path at offset O, N bytes": the request description every I/O error message starts with.
std::string describe_request(const std::string& path, uint64_t offset, uint64_t nbytes);

// Waits on cv (lock held by lk, GIL released by the caller) until pred() or timeout_s elapses
// (timeout_s < 0: no limit). Every 100 ms it briefly takes the GIL to let Ctrl-C through.
// Returns pred()'s final value.
template <class Lock, class Cv, class Pred>
bool wait_interruptibly(Lock& lk, Cv& cv, double timeout_s, Pred pred);

}  // namespace klotski

#include "errors_impl.h"
