#include "errors.h"

#include "bindings.h"

namespace py = pybind11;

namespace klotski {

std::string describe_request(const std::string& path, uint64_t offset, uint64_t nbytes) {
  return "'" + path + "' at offset " + std::to_string(offset) + ", " + std::to_string(nbytes) + " bytes";
}

void register_errors(py::module_& m) {
  py::register_exception<ShortReadError>(m, "ShortReadError", PyExc_OSError);
  py::register_exception<RingExhausted>(m, "RingExhaustedError", PyExc_TimeoutError);
  py::register_exception<SlotStateError>(m, "SlotStateError", PyExc_RuntimeError);
  py::register_exception<ReaderClosed>(m, "ReaderClosedError", PyExc_RuntimeError);
  py::register_exception<CudaError>(m, "CudaError", PyExc_RuntimeError);
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const OSErrorWithPath& e) {
      // OSError(errno, strerror, filename): Python picks the subclass (FileNotFoundError, ...) from errno.
      py::tuple args = py::make_tuple(e.err, e.what(), e.path);
      PyErr_SetObject(PyExc_OSError, args.ptr());
    } catch (const WaitTimeout& e) {
      PyErr_SetString(PyExc_TimeoutError, e.what());
    }
  });
}

}  // namespace klotski
