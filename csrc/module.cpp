// klotski._C: host-memory, disk-read and copy primitives for the offloaded MoE runtime.
// Links to neither torch nor CUDA; CUDA is found at run time (dlopen) where it is used.
#include "bindings.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "Klotski native I/O: aligned/pinned host buffers, disk reads, host-to-device copies; host int4 dequantization";
  klotski::register_errors(m);
  klotski::register_host_memory(m);
  klotski::register_cuda_loader(m);
  klotski::register_ring_buffer(m);
  klotski::register_disk_reader(m);
  klotski::register_h2d_copy(m);
  klotski::register_record_load(m);
  klotski::register_int4_dequant(m);
}
