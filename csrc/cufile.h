// GPUDirect Storage: disk -> GPU memory reads through cuFile, dlopen'd (libcufile.so) when present.
// Without libcufile (or without a GDS-capable driver), gds_available() is false and GdsFile raises CudaError.
#pragma once
#include <cstdint>
#include <string>

namespace klotski {

bool gds_available();
std::string gds_unavailable_reason();

// One file opened with O_DIRECT and registered with cuFile.
class GdsFile {
 public:
  explicit GdsFile(const std::string& path);
  ~GdsFile();
  GdsFile(const GdsFile&) = delete;
  GdsFile& operator=(const GdsFile&) = delete;
  // Blocking read of nbytes at file_offset into device memory dev_ptr + dev_offset (GIL released by binding).
  // Errors name path, offset and size; EOF before nbytes raises ShortReadError.
  void read(uintptr_t dev_ptr, uint64_t nbytes, uint64_t file_offset, uint64_t dev_offset);
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  int fd_ = -1;
  void* handle_ = nullptr;
};

}  // namespace klotski
