// Host-to-device copies out of ring slots, asynchronous, each with a completion event.
//
// CUDA mode: cudaMemcpyAsync on a caller-given stream (torch's stream.cuda_stream), then an event recorded on
// that stream; CopyEvent::wait_on(stream) makes another stream (the compute stream) wait on it on the GPU.
// CPU mode ("device" = host memory, for the runtime's CPU mode and for tests): copies run in submission order
// on one native copy thread, like a single stream; the stream argument is accepted and ignored and
// wait_on blocks the caller until the copy is done (CPU compute is synchronous).
#pragma once
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "completion.h"
#include "ring_buffer.h"
#include "thread_pool.h"

namespace klotski {

class CopyEvent : public Completion {
 public:
  CopyEvent(std::string what, bool cuda, int device);
  ~CopyEvent() override;
  bool done() override;
  std::string describe() const override { return what_; }
  void synchronize(double timeout_s);  // blocks (GIL released by the binding)
  void wait_on(uintptr_t stream);      // CUDA: cudaStreamWaitEvent; CPU: synchronize
  void finish(std::exception_ptr error);  // CPU mode: called by the copy thread
  void* cuda_event() const { return event_; }
  std::optional<Slot> slot;  // keeps the ring's memory alive while the copy runs

 private:
  std::string what_;
  bool cuda_;
  int device_;
  void* event_ = nullptr;
  std::mutex mu_;
  std::condition_variable cv_;
  bool done_ = false;
  std::exception_ptr error_;
  friend class CopyEngine;
};

class CopyEngine {
 public:
  // device: "cpu" or "cuda:<index>" / "cuda".
  explicit CopyEngine(const std::string& device);
  ~CopyEngine();
  // Copy nbytes from host src to dst (device memory in CUDA mode, host memory in CPU mode).
  std::shared_ptr<CopyEvent> copy(uintptr_t src, uintptr_t dst, size_t nbytes, uintptr_t stream);
  // Copy [src_offset, src_offset + nbytes) of a live slot; the slot cannot be released until it is done.
  std::shared_ptr<CopyEvent> copy_from_slot(const Slot& slot, size_t src_offset, uintptr_t dst, size_t nbytes,
                                            uintptr_t stream);
  // Several copies with one event (CUDA: one cudaMemcpyAsync each on `stream`, then the event; CPU: one task
  // on the copy thread). `slot` (optional) cannot be released until the event is done.
  struct Span {
    const uint8_t* src;
    uintptr_t dst;
    size_t nbytes;
  };
  std::shared_ptr<CopyEvent> copy_spans(const std::vector<Span>& spans, uintptr_t stream, const std::string& what,
                                        const Slot* slot);
  // An event that is already done (CPU mode: copies the caller made itself, on its own thread).
  std::shared_ptr<CopyEvent> completed(const std::string& what);
  bool is_cuda() const { return cuda_; }
  int device_index() const { return device_; }
  const std::string& device() const { return name_; }
  void close();

 private:
  std::shared_ptr<CopyEvent> launch(const uint8_t* src, uintptr_t dst, size_t nbytes, uintptr_t stream,
                                    const std::string& what, const Slot* slot) {
    return copy_spans({{src, dst, nbytes}}, stream, what, slot);
  }
  std::string name_;
  bool cuda_ = false;
  int device_ = -1;
  std::unique_ptr<ThreadPool> cpu_queue_;  // CPU mode: one thread = one in-order stream
};

}  // namespace klotski
