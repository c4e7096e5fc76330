#include "ring_buffer.h"

#include <sys/mman.h>

#include <algorithm>
#include <deque>

#include "bindings.h"
#include "cuda_loader.h"
#include "errors.h"

namespace py = pybind11;

namespace klotski {

struct SlotState {
  bool in_use = false;
  uint64_t generation = 0;
  // Weak: a ticket/event must not keep the ring alive (no cycle through Slot). An expired entry is finished
  // work whose owner dropped it (running reads hold their ticket; the Python layer holds copy events).
  std::vector<std::weak_ptr<Completion>> inflight;
};

struct RingState {
  std::unique_ptr<AlignedHostBuffer> memory;
  size_t num_slots = 0, slot_bytes = 0, stride = 0;
  std::string pinned = "none";
  bool cuda_registered = false;
  mutable std::mutex mu;
  std::condition_variable cv;
  std::vector<SlotState> slots;
  std::deque<size_t> free_slots;

  ~RingState() {
    if (cuda_registered) {
      if (const CudaRuntime* rt = cuda_runtime()) rt->HostUnregister(memory->data());
    }
  }

  // With mu held: prune finished work on slot i; return the descriptions of what is still in flight.
  std::vector<std::string> busy(size_t i) {
    auto& v = slots[i].inflight;
    std::vector<std::string> out;
    std::vector<std::weak_ptr<Completion>> still;
    for (auto& w : v) {
      if (auto c = w.lock()) {
        if (!c->done()) {
          out.push_back(c->describe());
          still.push_back(w);
        }
      }
    }
    v.swap(still);
    return out;
  }

  std::string exhausted_message(double waited) const {
    return "ring exhausted: all " + std::to_string(num_slots) + " slots of " + std::to_string(slot_bytes) +
           " bytes are in use" + (waited > 0 ? " after waiting " + std::to_string(waited) + " s" : std::string()) +
           "; release slots (Slot.release()) or make the ring larger";
  }
};

static std::string slot_name(size_t index, uint64_t generation) {
  return "slot " + std::to_string(index) + " (generation " + std::to_string(generation) + ")";
}

size_t Slot::nbytes() const { return ring_->slot_bytes; }
size_t Slot::capacity() const { return ring_->stride; }

bool Slot::live() const {
  std::lock_guard<std::mutex> g(ring_->mu);
  const auto& s = ring_->slots[index_];
  return s.in_use && s.generation == generation_;
}

std::string Slot::describe() const { return slot_name(index_, generation_); }

uint8_t* Slot::data(const std::string& op) const {
  if (!live()) throw SlotStateError(op + ": " + describe() + " was already released (use after release)");
  return ring_->memory->data() + index_ * ring_->stride;
}

void Slot::track(const std::shared_ptr<Completion>& c) const {
  std::lock_guard<std::mutex> g(ring_->mu);
  auto& s = ring_->slots[index_];
  if (!(s.in_use && s.generation == generation_)) {
    throw SlotStateError(c->describe() + ": " + describe() + " was already released (use after release)");
  }
  s.inflight.push_back(c);
}

void Slot::release() {
  {
    std::lock_guard<std::mutex> g(ring_->mu);
    auto& s = ring_->slots[index_];
    if (!(s.in_use && s.generation == generation_)) {
      throw SlotStateError("release: " + describe() + " was already released (double release)");
    }
    auto pending = ring_->busy(index_);
    if (!pending.empty()) {
      throw SlotStateError("release: " + describe() + " still has " + std::to_string(pending.size()) +
                           " transfer(s) in flight (" + pending.front() + "); wait for them first");
    }
    s.in_use = false;
    s.generation++;
    ring_->free_slots.push_back(index_);
  }
  ring_->cv.notify_one();
}

PinnedRing::PinnedRing(size_t num_slots, size_t slot_bytes, const std::string& pin) {
  if (num_slots == 0) throw std::invalid_argument("num_slots must be >= 1, got 0");
  if (slot_bytes == 0) throw std::invalid_argument("slot_bytes must be >= 1, got 0");
  if (pin != "auto" && pin != "cuda" && pin != "mlock" && pin != "none") {
    throw std::invalid_argument("pin must be one of 'auto', 'cuda', 'mlock', 'none', got '" + pin + "'");
  }
  auto st = std::make_shared<RingState>();
  const size_t page = page_size();
  st->num_slots = num_slots;
  st->slot_bytes = slot_bytes;
  st->stride = (slot_bytes + page - 1) / page * page;
  const size_t total = st->stride * num_slots;
  st->memory = std::make_unique<AlignedHostBuffer>(total, page, false);
  if (pin == "auto" || pin == "cuda") {
    const CudaRuntime* rt = cuda_runtime();
    if (rt) {
      rt->check(rt->HostRegister(st->memory->data(), total, kCudaHostRegisterPortable),
                "cudaHostRegister(" + std::to_string(total) + " bytes)");
      st->cuda_registered = true;
      st->pinned = "cuda";
    } else if (pin == "cuda") {
      throw CudaError("pin='cuda' needs a CUDA runtime: " + cuda_unavailable_reason());
    }
  }
  if (!st->cuda_registered && (pin == "auto" || pin == "mlock")) {
    if (mlock(st->memory->data(), total) == 0) st->pinned = "mlock";
  }
  st->slots.resize(num_slots);
  for (size_t i = 0; i < num_slots; ++i) st->free_slots.push_back(i);
  state_ = std::move(st);
}

Slot PinnedRing::acquire(double timeout_s) {
  std::unique_lock<std::mutex> lk(state_->mu);
  bool ok = wait_interruptibly(lk, state_->cv, timeout_s, [&] { return !state_->free_slots.empty(); });
  if (!ok) throw RingExhausted(state_->exhausted_message(timeout_s));
  size_t i = state_->free_slots.front();
  state_->free_slots.pop_front();
  auto& s = state_->slots[i];
  s.in_use = true;
  return Slot(state_, i, s.generation);
}

Slot PinnedRing::try_acquire() {
  std::lock_guard<std::mutex> g(state_->mu);
  if (state_->free_slots.empty()) throw RingExhausted(state_->exhausted_message(0));
  size_t i = state_->free_slots.front();
  state_->free_slots.pop_front();
  state_->slots[i].in_use = true;
  return Slot(state_, i, state_->slots[i].generation);
}

size_t PinnedRing::num_slots() const { return state_->num_slots; }
size_t PinnedRing::slot_bytes() const { return state_->slot_bytes; }
size_t PinnedRing::slot_capacity() const { return state_->stride; }
size_t PinnedRing::available() const {
  std::lock_guard<std::mutex> g(state_->mu);
  return state_->free_slots.size();
}
const std::string& PinnedRing::pinned() const { return state_->pinned; }
uintptr_t PinnedRing::base_address() const { return reinterpret_cast<uintptr_t>(state_->memory->data()); }

void register_ring_buffer(py::module_& m) {
  py::class_<Slot>(m, "Slot", py::buffer_protocol(),
                   "A handle to one acquired ring slot (index + generation). Invalid after release().")
      .def_property_readonly("index", &Slot::index)
      .def_property_readonly("nbytes", &Slot::nbytes)
      .def_property_readonly("capacity", &Slot::capacity)
      .def_property_readonly("live", &Slot::live)
      .def_property_readonly("address",
                             [](const Slot& s) { return reinterpret_cast<uintptr_t>(s.data("address")); })
      .def("release", &Slot::release, py::call_guard<py::gil_scoped_release>())
      .def("__repr__", [](const Slot& s) { return "<klotski._C.Slot " + s.describe() + ">"; })
      .def_buffer([](Slot& s) -> py::buffer_info {
        return py::buffer_info(s.data("buffer view"), 1, py::format_descriptor<uint8_t>::format(), 1,
                               {static_cast<py::ssize_t>(s.capacity())}, {1});
      });
  py::class_<PinnedRing>(m, "PinnedRing", "N page-aligned host slots of a fixed size, pinned where possible.")
      .def(py::init<size_t, size_t, const std::string&>(), py::arg("num_slots"), py::arg("slot_bytes"),
           py::arg("pin") = "auto")
      .def("acquire", &PinnedRing::acquire, py::arg("timeout_s") = -1.0, py::call_guard<py::gil_scoped_release>())
      .def("try_acquire", &PinnedRing::try_acquire)
      .def_property_readonly("num_slots", &PinnedRing::num_slots)
      .def_property_readonly("slot_bytes", &PinnedRing::slot_bytes)
      .def_property_readonly("slot_capacity", &PinnedRing::slot_capacity)
      .def_property_readonly("available", &PinnedRing::available)
      .def_property_readonly("pinned", &PinnedRing::pinned)
      .def_property_readonly("base_address", &PinnedRing::base_address);
}

}  // namespace klotski
