// A pinned ring of N fixed-size, page-aligned host slots, acquired and released explicitly.
//
// Memory: one page-aligned allocation, registered with CUDA (cudaHostRegister, portable) when a CUDA runtime
// can be loaded, otherwise mlock'd where permitted, otherwise plain (``pinned`` says which happened).
// Safety: a Slot is a handle (index + generation). Releasing twice, or using a handle after its release,
// raises SlotStateError; releasing a slot with a read or copy still in flight raises SlotStateError too.
#pragma once
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "completion.h"
#include "host_memory.h"

namespace klotski {

struct RingState;

class Slot {
 public:
  Slot(std::shared_ptr<RingState> ring, size_t index, uint64_t generation)
      : ring_(std::move(ring)), index_(index), generation_(generation) {}
  size_t index() const { return index_; }
  size_t nbytes() const;    // usable bytes (the ring's slot_bytes)
  size_t capacity() const;  // slot_bytes rounded up to whole pages (what a direct read may fill)
  bool live() const;
  // The slot's memory; throws SlotStateError naming `op` if the handle was released.
  uint8_t* data(const std::string& op) const;
  // Record an operation in flight on this slot (checked at release). Throws if the handle was released.
  void track(const std::shared_ptr<Completion>& c) const;
  // Return the slot to the ring. Throws SlotStateError on double release or while work is in flight.
  void release();
  std::string describe() const;

 private:
  std::shared_ptr<RingState> ring_;
  size_t index_;
  uint64_t generation_;
};

class PinnedRing {
 public:
  // pin: "auto" (CUDA if loadable, else mlock, else none), "cuda" (required), "mlock" (best effort), "none".
  PinnedRing(size_t num_slots, size_t slot_bytes, const std::string& pin);
  // Waits up to timeout_s (< 0: forever) for a free slot; throws RingExhausted after that. GIL released.
  Slot acquire(double timeout_s);
  // A free slot now, or throws RingExhausted at once.
  Slot try_acquire();
  size_t num_slots() const;
  size_t slot_bytes() const;
  size_t slot_capacity() const;
  size_t available() const;
  const std::string& pinned() const;
  uintptr_t base_address() const;

 private:
  std::shared_ptr<RingState> state_;
};

}  // namespace klotski
