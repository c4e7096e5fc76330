#include "host_memory.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "bindings.h"

namespace py = pybind11;

namespace klotski {

size_t page_size() {
  long p = sysconf(_SC_PAGESIZE);
  return p > 0 ? static_cast<size_t>(p) : 4096;
}

static bool is_power_of_two(size_t x) { return x && !(x & (x - 1)); }

AlignedHostBuffer::AlignedHostBuffer(size_t nbytes, size_t alignment, bool lock)
    : nbytes_(nbytes), alignment_(alignment) {
  if (!is_power_of_two(alignment) || alignment < sizeof(void*)) {
    throw std::invalid_argument("alignment must be a power of two >= " + std::to_string(sizeof(void*)) +
                                ", got " + std::to_string(alignment));
  }
  // Round the allocation up to whole alignment units so that direct I/O may fill the last one.
  alloc_bytes_ = ((nbytes ? nbytes : 1) + alignment - 1) / alignment * alignment;
  void* p = nullptr;
  int rc = posix_memalign(&p, alignment, alloc_bytes_);
  if (rc != 0 || p == nullptr) {
    throw std::runtime_error("posix_memalign(" + std::to_string(alloc_bytes_) + " bytes, alignment " +
                             std::to_string(alignment) + ") failed: " + std::strerror(rc));
  }
  std::memset(p, 0, alloc_bytes_);
  data_ = static_cast<uint8_t*>(p);
  if (lock) locked_ = (mlock(data_, alloc_bytes_) == 0);
}

AlignedHostBuffer::~AlignedHostBuffer() {
  if (data_) {
    if (locked_) munlock(data_, alloc_bytes_);
    std::free(data_);
  }
}

void register_host_memory(py::module_& m) {
  m.def("page_size", &page_size, "The host page size in bytes.");
  py::class_<AlignedHostBuffer>(m, "AlignedHostBuffer", py::buffer_protocol(),
                                "An aligned, zero-filled host allocation exposing the buffer protocol "
                                "(wrap with numpy.frombuffer or torch.frombuffer).")
      .def(py::init<size_t, size_t, bool>(), py::arg("nbytes"), py::arg("alignment") = 4096,
           py::arg("lock") = false)
      .def_property_readonly("address", [](const AlignedHostBuffer& b) {
        return reinterpret_cast<uintptr_t>(b.data());
      })
      .def_property_readonly("nbytes", &AlignedHostBuffer::nbytes)
      .def_property_readonly("alignment", &AlignedHostBuffer::alignment)
      .def_property_readonly("locked", &AlignedHostBuffer::locked)
      .def("__len__", &AlignedHostBuffer::nbytes)
      .def_buffer([](AlignedHostBuffer& b) -> py::buffer_info {
        return py::buffer_info(b.data(), 1, py::format_descriptor<uint8_t>::format(), 1,
                               {static_cast<py::ssize_t>(b.nbytes())}, {1});
      });
}

}  // namespace klotski
