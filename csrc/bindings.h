// Each concept of klotski._C registers its Python bindings through one function declared here;
// module.cpp calls them all. Add a line here and one in module.cpp for a new concept.
#pragma once
#include <pybind11/pybind11.h>

namespace klotski {
void register_errors(pybind11::module_& m);
void register_host_memory(pybind11::module_& m);
void register_cuda_loader(pybind11::module_& m);
void register_ring_buffer(pybind11::module_& m);
void register_disk_reader(pybind11::module_& m);
void register_h2d_copy(pybind11::module_& m);
void register_record_load(pybind11::module_& m);
void register_int4_dequant(pybind11::module_& m);
}  // namespace klotski
