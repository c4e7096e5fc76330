#include "h2d_copy.h"

#include <cstring>

#include "bindings.h"
#include "cuda_loader.h"
#include "errors.h"

namespace py = pybind11;

namespace klotski {

static const CudaRuntime& require_cuda(const std::string& what) {
  const CudaRuntime* rt = cuda_runtime();
  if (!rt) throw CudaError(what + " needs CUDA: " + cuda_unavailable_reason());
  return *rt;
}

CopyEvent::CopyEvent(std::string what, bool cuda, int device) : what_(std::move(what)), cuda_(cuda), device_(device) {
  if (cuda_) {
    const CudaRuntime& rt = require_cuda(what_);
    rt.check(rt.SetDevice(device_), "cudaSetDevice(" + std::to_string(device_) + ")");
    rt.check(rt.EventCreateWithFlags(&event_, kCudaEventDisableTiming), "cudaEventCreateWithFlags");
  }
}

CopyEvent::~CopyEvent() {
  if (event_) {
    if (const CudaRuntime* rt = cuda_runtime()) rt->EventDestroy(event_);
  }
}

bool CopyEvent::done() {
  if (cuda_) {
    const CudaRuntime& rt = require_cuda(what_);
    int rc = rt.EventQuery(event_);
    if (rc == kCudaErrorNotReady) return false;
    rt.check(rc, what_ + ": cudaEventQuery");
    return true;
  }
  std::lock_guard<std::mutex> g(mu_);
  return done_;
}

void CopyEvent::synchronize(double timeout_s) {
  if (cuda_) {
    const CudaRuntime& rt = require_cuda(what_);
    if (timeout_s < 0) {
      rt.check(rt.EventSynchronize(event_), what_ + ": cudaEventSynchronize");
      return;
    }
    // Bounded wait: poll (the copy engine gives no timed wait).
    std::unique_lock<std::mutex> lk(mu_);
    std::condition_variable cv;
    bool finished = wait_interruptibly(lk, cv, timeout_s, [&] { return done(); });
    if (!finished) throw WaitTimeout(what_ + " not finished after " + std::to_string(timeout_s) + " s");
    return;
  }
  std::unique_lock<std::mutex> lk(mu_);
  if (!wait_interruptibly(lk, cv_, timeout_s, [&] { return done_; })) {
    throw WaitTimeout(what_ + " not finished after " + std::to_string(timeout_s) + " s");
  }
  if (error_) std::rethrow_exception(error_);
}

void CopyEvent::wait_on(uintptr_t stream) {
  if (!cuda_) {
    synchronize(-1.0);
    return;
  }
  const CudaRuntime& rt = require_cuda(what_);
  rt.check(rt.SetDevice(device_), "cudaSetDevice");
  rt.check(rt.StreamWaitEvent(reinterpret_cast<cudaStream_t>(stream), event_, 0), what_ + ": cudaStreamWaitEvent");
}

void CopyEvent::finish(std::exception_ptr error) {
  {
    std::lock_guard<std::mutex> g(mu_);
    done_ = true;
    error_ = error;
  }
  cv_.notify_all();
}

CopyEngine::CopyEngine(const std::string& device) : name_(device) {
  if (device == "cpu") {
    cpu_queue_ = std::make_unique<ThreadPool>(1);
    return;
  }
  if (device == "cuda") {
    device_ = 0;
  } else if (device.rfind("cuda:", 0) == 0) {
    try {
      device_ = std::stoi(device.substr(5));
    } catch (const std::exception&) {
      device_ = -1;
    }
  }
  if (device_ < 0) throw std::invalid_argument("device must be 'cpu', 'cuda' or 'cuda:<index>', got '" + device + "'");
  const CudaRuntime& rt = require_cuda("CopyEngine('" + device + "')");
  if (device_ >= rt.device_count) {
    throw std::invalid_argument("device " + device + " does not exist (" + std::to_string(rt.device_count) +
                                " CUDA device(s) visible)");
  }
  cuda_ = true;
}

CopyEngine::~CopyEngine() { close(); }

void CopyEngine::close() {
  if (cpu_queue_) cpu_queue_->shutdown(false);
}

std::shared_ptr<CopyEvent> CopyEngine::copy_spans(const std::vector<Span>& spans, uintptr_t stream,
                                                  const std::string& what, const Slot* slot) {
  auto ev = std::make_shared<CopyEvent>(what, cuda_, device_);
  if (slot) {
    ev->slot = *slot;
    slot->track(ev);
  }
  if (cuda_) {
    const CudaRuntime& rt = require_cuda(what);
    auto s = reinterpret_cast<cudaStream_t>(stream);
    rt.check(rt.SetDevice(device_), "cudaSetDevice(" + std::to_string(device_) + ")");
    for (const Span& sp : spans) {
      if (sp.nbytes == 0) continue;
      rt.check(rt.MemcpyAsync(reinterpret_cast<void*>(sp.dst), sp.src, sp.nbytes, kCudaMemcpyHostToDevice, s),
               what + ": cudaMemcpyAsync");
    }
    rt.check(rt.EventRecord(ev->event_, s), what + ": cudaEventRecord");
    return ev;
  }
  Task task;
  task.run = [ev, spans] {
    for (const Span& sp : spans) std::memcpy(reinterpret_cast<void*>(sp.dst), sp.src, sp.nbytes);
    ev->finish(nullptr);
  };
  task.drop = [ev, what] { ev->finish(std::make_exception_ptr(ReaderClosed(what + " cancelled: copy engine closed"))); };
  if (!cpu_queue_->submit(std::move(task))) throw ReaderClosed(what + ": the copy engine is closed");
  return ev;
}

std::shared_ptr<CopyEvent> CopyEngine::completed(const std::string& what) {
  if (cuda_) throw std::logic_error(what + ": a CUDA copy engine has no host-side completed event");
  auto ev = std::make_shared<CopyEvent>(what, false, device_);
  ev->finish(nullptr);
  return ev;
}

std::shared_ptr<CopyEvent> CopyEngine::copy(uintptr_t src, uintptr_t dst, size_t nbytes, uintptr_t stream) {
  return launch(reinterpret_cast<const uint8_t*>(src), dst, nbytes, stream,
                "copy of " + std::to_string(nbytes) + " bytes to " + name_, nullptr);
}

std::shared_ptr<CopyEvent> CopyEngine::copy_from_slot(const Slot& slot, size_t src_offset, uintptr_t dst,
                                                      size_t nbytes, uintptr_t stream) {
  const std::string what = "copy of " + slot.describe() + " [" + std::to_string(src_offset) + ", " +
                           std::to_string(src_offset + nbytes) + ") to " + name_;
  if (src_offset + nbytes > slot.capacity() || src_offset + nbytes < src_offset) {
    throw std::invalid_argument(what + ": range exceeds the slot's " + std::to_string(slot.capacity()) + " bytes");
  }
  const uint8_t* src = slot.data(what);
  return launch(src + src_offset, dst, nbytes, stream, what, &slot);
}

void register_h2d_copy(py::module_& m) {
  py::class_<CopyEvent, std::shared_ptr<CopyEvent>>(m, "CopyEvent", "Completion of one asynchronous copy.")
      .def("done", &CopyEvent::done, py::call_guard<py::gil_scoped_release>())
      .def("synchronize", &CopyEvent::synchronize, py::arg("timeout_s") = -1.0,
           py::call_guard<py::gil_scoped_release>())
      .def("wait_on", &CopyEvent::wait_on, py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
           "Make `stream` (a cudaStream_t as int) wait for this copy; CPU mode: block until it is done.")
      .def_property_readonly("cuda_event", [](const CopyEvent& e) { return reinterpret_cast<uintptr_t>(e.cuda_event()); })
      .def("__repr__", [](const CopyEvent& e) { return "<klotski._C.CopyEvent " + e.describe() + ">"; });
  py::class_<CopyEngine>(m, "CopyEngine", "Asynchronous host-to-device (or host-to-host in CPU mode) copies.")
      .def(py::init<const std::string&>(), py::arg("device") = "cpu")
      .def("copy", &CopyEngine::copy, py::arg("src"), py::arg("dst"), py::arg("nbytes"), py::arg("stream") = 0,
           py::call_guard<py::gil_scoped_release>(), "Raw addresses; the caller keeps both alive until done.")
      .def("copy_from_slot", &CopyEngine::copy_from_slot, py::arg("slot"), py::arg("src_offset"), py::arg("dst"),
           py::arg("nbytes"), py::arg("stream") = 0, py::call_guard<py::gil_scoped_release>())
      .def("close", &CopyEngine::close, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("is_cuda", &CopyEngine::is_cuda)
      .def_property_readonly("device", &CopyEngine::device);
}

}  // namespace klotski
