// The CUDA runtime, found at run time with dlopen: klotski._C links to no CUDA library, builds with g++
// alone and imports on machines without a GPU. Only the handful of entry points the I/O path needs.
#pragma once
#include <cstddef>
#include <string>

namespace klotski {

using cudaError_t = int;
using cudaStream_t = void*;
using cudaEvent_t = void*;

constexpr int kCudaSuccess = 0;
constexpr int kCudaErrorNotReady = 600;
constexpr int kCudaMemcpyHostToDevice = 1;
constexpr int kCudaMemcpyHostToHost = 0;
constexpr unsigned kCudaHostRegisterPortable = 1;
constexpr unsigned kCudaEventDisableTiming = 2;

struct CudaRuntime {
  cudaError_t (*GetDeviceCount)(int*);
  cudaError_t (*SetDevice)(int);
  cudaError_t (*HostRegister)(void*, size_t, unsigned);
  cudaError_t (*HostUnregister)(void*);
  cudaError_t (*MemcpyAsync)(void*, const void*, size_t, int, cudaStream_t);
  cudaError_t (*EventCreateWithFlags)(cudaEvent_t*, unsigned);
  cudaError_t (*EventRecord)(cudaEvent_t, cudaStream_t);
  cudaError_t (*EventQuery)(cudaEvent_t);
  cudaError_t (*EventSynchronize)(cudaEvent_t);
  cudaError_t (*EventDestroy)(cudaEvent_t);
  cudaError_t (*StreamWaitEvent)(cudaStream_t, cudaEvent_t, unsigned);
  const char* (*GetErrorString)(cudaError_t);
  std::string library;  // the file dlopen found
  int device_count = 0;

  // Throws CudaError("<what>: <cuda message>") when rc is not cudaSuccess.
  void check(cudaError_t rc, const std::string& what) const;
};

// The process's CUDA runtime (loaded once, on first use), or nullptr when no libcudart can be loaded or no
// device is visible. KLOTSKI_CUDART names a library file to try first; KLOTSKI_DISABLE_CUDA=1 forces nullptr.
const CudaRuntime* cuda_runtime();
// Why cuda_runtime() is null ("" when it is not).
std::string cuda_unavailable_reason();

}  // namespace klotski
