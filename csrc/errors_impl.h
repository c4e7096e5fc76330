// Template body of wait_interruptibly (included from errors.h).
#pragma once
#include <chrono>

namespace klotski {

template <class Lock, class Cv, class Pred>
bool wait_interruptibly(Lock& lk, Cv& cv, double timeout_s, Pred pred) {
  using clock = std::chrono::steady_clock;
  const auto slice = std::chrono::milliseconds(100);
  const bool bounded = timeout_s >= 0;
  const auto deadline = clock::now() + std::chrono::duration_cast<clock::duration>(
                                           std::chrono::duration<double>(bounded ? timeout_s : 0.0));
  while (!pred()) {
    auto until = clock::now() + slice;
    if (bounded && deadline < until) until = deadline;
    cv.wait_until(lk, until, [&] { return pred(); });
    if (pred()) return true;
    if (bounded && clock::now() >= deadline) return false;
    lk.unlock();
    {
      pybind11::gil_scoped_acquire gil;
      if (PyErr_CheckSignals() != 0) throw pybind11::error_already_set();
    }
    lk.lock();
  }
  return true;
}

}  // namespace klotski
