#include "cuda_loader.h"

#include <dlfcn.h>

#include <cstdlib>
#include <memory>
#include <vector>

#include "bindings.h"
#include "errors.h"

namespace py = pybind11;

namespace klotski {

namespace {

struct Loaded {
  std::unique_ptr<CudaRuntime> runtime;
  std::string reason;
};

template <class Fn>
bool bind(void* lib, const char* name, Fn& out, std::string& missing) {
  out = reinterpret_cast<Fn>(dlsym(lib, name));
  if (!out) missing += std::string(missing.empty() ? "" : ", ") + name;
  return out != nullptr;
}

Loaded load() {
  Loaded result;
  const char* disable = std::getenv("KLOTSKI_DISABLE_CUDA");
  if (disable && std::string(disable) == "1") {
    result.reason = "disabled by KLOTSKI_DISABLE_CUDA=1";
    return result;
  }
  std::vector<std::string> names;
  if (const char* path = std::getenv("KLOTSKI_CUDART")) names.emplace_back(path);
  for (const char* n : {"libcudart.so", "libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0"}) names.emplace_back(n);
  void* lib = nullptr;
  std::string found;
  for (const auto& n : names) {
    lib = dlopen(n.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (lib) {
      found = n;
      break;
    }
  }
  if (!lib) {
    result.reason = "no CUDA runtime library could be loaded (tried libcudart.so, .so.13, .so.12, .so.11.0)";
    return result;
  }
  auto rt = std::make_unique<CudaRuntime>();
  std::string missing;
  bind(lib, "cudaGetDeviceCount", rt->GetDeviceCount, missing);
  bind(lib, "cudaSetDevice", rt->SetDevice, missing);
  bind(lib, "cudaHostRegister", rt->HostRegister, missing);
  bind(lib, "cudaHostUnregister", rt->HostUnregister, missing);
  bind(lib, "cudaMemcpyAsync", rt->MemcpyAsync, missing);
  bind(lib, "cudaEventCreateWithFlags", rt->EventCreateWithFlags, missing);
  bind(lib, "cudaEventRecord", rt->EventRecord, missing);
  bind(lib, "cudaEventQuery", rt->EventQuery, missing);
  bind(lib, "cudaEventSynchronize", rt->EventSynchronize, missing);
  bind(lib, "cudaEventDestroy", rt->EventDestroy, missing);
  bind(lib, "cudaStreamWaitEvent", rt->StreamWaitEvent, missing);
  bind(lib, "cudaGetErrorString", rt->GetErrorString, missing);
  if (!missing.empty()) {
    result.reason = found + " lacks " + missing;
    return result;
  }
  int count = 0;
  if (rt->GetDeviceCount(&count) != kCudaSuccess || count <= 0) {
    result.reason = found + " loaded but no CUDA device is visible";
    return result;
  }
  rt->library = found;
  rt->device_count = count;
  result.runtime = std::move(rt);
  return result;  // the library handle stays open for the life of the process
}

const Loaded& loaded() {
  static const Loaded instance = load();  // process-wide: the CUDA runtime is a per-process resource
  return instance;
}

}  // namespace

void CudaRuntime::check(cudaError_t rc, const std::string& what) const {
  if (rc != kCudaSuccess) {
    const char* msg = GetErrorString ? GetErrorString(rc) : nullptr;
    throw CudaError(what + " failed: " + (msg ? msg : "CUDA error") + " (" + std::to_string(rc) + ")");
  }
}

const CudaRuntime* cuda_runtime() { return loaded().runtime.get(); }
std::string cuda_unavailable_reason() { return loaded().reason; }

void register_cuda_loader(py::module_& m) {
  m.def("cuda_available", [] { return cuda_runtime() != nullptr; },
        "True when a CUDA runtime was loaded (dlopen) and a device is visible.");
  m.def("cuda_info", [] {
    py::dict d;
    const CudaRuntime* rt = cuda_runtime();
    d["available"] = rt != nullptr;
    d["library"] = rt ? rt->library : std::string();
    d["device_count"] = rt ? rt->device_count : 0;
    d["reason"] = cuda_unavailable_reason();
    return d;
  }, "What the CUDA loader found: available, library, device_count, reason (why not).");
}

}  // namespace klotski
