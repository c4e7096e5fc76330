// Page-aligned host allocations: the unit every ring slot and direct-I/O read is built on.
#pragma once
#include <cstddef>
#include <cstdint>

namespace klotski {

size_t page_size();

// An owning, aligned, zero-initialised host allocation. Optionally mlock'd (best effort).
class AlignedHostBuffer {
 public:
  AlignedHostBuffer(size_t nbytes, size_t alignment, bool lock);
  ~AlignedHostBuffer();
  AlignedHostBuffer(const AlignedHostBuffer&) = delete;
  AlignedHostBuffer& operator=(const AlignedHostBuffer&) = delete;

  uint8_t* data() const { return data_; }
  size_t nbytes() const { return nbytes_; }
  size_t alignment() const { return alignment_; }
  bool locked() const { return locked_; }

 private:
  uint8_t* data_ = nullptr;
  size_t nbytes_ = 0;
  size_t alignment_ = 0;
  size_t alloc_bytes_ = 0;
  bool locked_ = false;
};

}  // namespace klotski
