#include "cufile.h"

#include <dlfcn.h>
#include <fcntl.h>
#include <sys/types.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <memory>

#include "bindings.h"
#include "cuda_loader.h"
#include "errors.h"

namespace py = pybind11;

namespace klotski {

namespace {

// The few cuFile ABI types we need (cufile.h, CUDA 11.4+).
struct CUfileError {
  int err;     // CUfileOpError, 0 = CU_FILE_SUCCESS
  int cu_err;  // CUresult
};
struct CUfileDescr {
  int type;  // CU_FILE_HANDLE_TYPE_OPAQUE_FD = 1
  union {
    int fd;
    void* handle;
  } handle;
  const void* fs_ops;
};
constexpr int kOpaqueFd = 1;

struct CuFile {
  CUfileError (*DriverOpen)();
  CUfileError (*HandleRegister)(void**, CUfileDescr*);
  void (*HandleDeregister)(void*);
  ssize_t (*Read)(void*, void*, size_t, off_t, off_t);
};

struct Loaded {
  std::unique_ptr<CuFile> api;
  std::string reason;
};

Loaded load() {
  Loaded out;
  if (!cuda_runtime()) {
    out.reason = "no CUDA: " + cuda_unavailable_reason();
    return out;
  }
  void* lib = nullptr;
  for (const char* n : {"libcufile.so", "libcufile.so.1", "libcufile.so.0"}) {
    if ((lib = dlopen(n, RTLD_NOW | RTLD_LOCAL))) break;
  }
  if (!lib) {
    out.reason = "libcufile.so (GPUDirect Storage) not found";
    return out;
  }
  auto api = std::make_unique<CuFile>();
  api->DriverOpen = reinterpret_cast<CUfileError (*)()>(dlsym(lib, "cuFileDriverOpen"));
  api->HandleRegister = reinterpret_cast<CUfileError (*)(void**, CUfileDescr*)>(dlsym(lib, "cuFileHandleRegister"));
  api->HandleDeregister = reinterpret_cast<void (*)(void*)>(dlsym(lib, "cuFileHandleDeregister"));
  api->Read = reinterpret_cast<ssize_t (*)(void*, void*, size_t, off_t, off_t)>(dlsym(lib, "cuFileRead"));
  if (!api->DriverOpen || !api->HandleRegister || !api->HandleDeregister || !api->Read) {
    out.reason = "libcufile.so lacks the cuFile driver/handle/read entry points";
    return out;
  }
  CUfileError e = api->DriverOpen();
  if (e.err != 0) {
    out.reason = "cuFileDriverOpen failed (cuFile error " + std::to_string(e.err) + ", CUDA " +
                 std::to_string(e.cu_err) + ")";
    return out;
  }
  out.api = std::move(api);
  return out;
}

const Loaded& loaded() {
  static const Loaded instance = load();  // the cuFile driver is a per-process resource
  return instance;
}

const CuFile& require() {
  if (!loaded().api) throw CudaError("GPUDirect Storage is unavailable: " + loaded().reason);
  return *loaded().api;
}

}  // namespace

bool gds_available() { return loaded().api != nullptr; }
std::string gds_unavailable_reason() { return loaded().reason; }

GdsFile::GdsFile(const std::string& path) : path_(path) {
  const CuFile& api = require();
  fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_DIRECT);
  if (fd_ < 0) {
    int err = errno;
    throw OSErrorWithPath(err, "cannot open '" + path + "' with O_DIRECT for GPUDirect Storage: " + std::strerror(err), path);
  }
  CUfileDescr d{};
  d.type = kOpaqueFd;
  d.handle.fd = fd_;
  CUfileError e = api.HandleRegister(&handle_, &d);
  if (e.err != 0) {
    ::close(fd_);
    fd_ = -1;
    throw CudaError("cuFileHandleRegister('" + path + "') failed (cuFile error " + std::to_string(e.err) + ")");
  }
}

GdsFile::~GdsFile() {
  if (handle_ && gds_available()) loaded().api->HandleDeregister(handle_);
  if (fd_ >= 0) ::close(fd_);
}

void GdsFile::read(uintptr_t dev_ptr, uint64_t nbytes, uint64_t file_offset, uint64_t dev_offset) {
  const CuFile& api = require();
  uint64_t got = 0;
  while (got < nbytes) {
    ssize_t r = api.Read(handle_, reinterpret_cast<void*>(dev_ptr), nbytes - got, static_cast<off_t>(file_offset + got),
                         static_cast<off_t>(dev_offset + got));
    if (r < 0) {
      // cuFileRead: -1 with errno for POSIX errors, other negatives are -CUfileOpError.
      int err = r == -1 ? errno : EIO;
      throw OSErrorWithPath(err, "GPUDirect read of " + describe_request(path_, file_offset, nbytes) + " failed (" +
                                     (r == -1 ? std::string(std::strerror(err)) : "cuFile error " + std::to_string(-r)) + ")",
                            path_);
    }
    if (r == 0) {
      throw ShortReadError("short read: GPUDirect read of " + describe_request(path_, file_offset, nbytes) +
                           " reaches past end of file; got " + std::to_string(got) + " bytes");
    }
    got += static_cast<uint64_t>(r);
  }
}

void register_cufile(py::module_& m) {
  m.def("gds_available", &gds_available, "True when cuFile (GPUDirect Storage) was loaded and its driver opened.");
  m.def("gds_unavailable_reason", &gds_unavailable_reason);
  py::class_<GdsFile>(m, "GdsFile", "A file registered with cuFile for disk -> GPU reads.")
      .def(py::init<const std::string&>(), py::arg("path"))
      .def("read", &GdsFile::read, py::arg("dev_ptr"), py::arg("nbytes"), py::arg("file_offset"),
           py::arg("dev_offset") = 0, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("path", &GdsFile::path);
}

}  // namespace klotski
