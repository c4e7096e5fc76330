// One native call per disk-resident record (a packed-store expert: w13 + w2 [+ scales, zero points], or one
// streamed checkpoint tensor): read it into a ring slot, then copy its parts into device tensors through the
// CopyEngine, with one completion event. No Python runs between the read and the copies, nor per chunk.
//
// Read: on the calling thread (DiskReader::read_now: one blocking pread loop, the loader lane waits anyway)
// or through the reader's engine (thread pool / io_uring: the record is split into chunk_bytes pieces read in
// parallel, and the call waits for all of them).
// Copy: CUDA: one cudaMemcpyAsync per part on the caller's stream (the loader lane's), then one event recorded
// on it; `synchronize` waits for the event before returning, so the caller may release the slot at once.
// CPU mode (the "device" is host memory): each part is copied (or widened, bf16/fp16 -> fp32) on the calling
// thread; the returned event is already done.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "disk_reader.h"
#include "h2d_copy.h"
#include "ring_buffer.h"

namespace klotski {

enum class Convert : int { None = 0, Bf16ToF32 = 1, F16ToF32 = 2 };

// Bytes [src_offset, src_offset + src_bytes) of the record go to dst (converted: dst holds 2x src_bytes).
struct CopyPart {
  size_t src_offset = 0;
  uintptr_t dst = 0;
  size_t src_bytes = 0;
  Convert convert = Convert::None;
};

// Reads [offset, offset + nbytes) of path into slot (queued: through the reader's engine; else on this
// thread), then copies `parts` out of it. Errors name the record (path, offset, size) and the part.
// read_seconds (if given) receives the time spent in the read alone.
std::shared_ptr<CopyEvent> load_record(DiskReader& reader, CopyEngine& engine, const std::string& path,
                                       uint64_t offset, uint64_t nbytes, const Slot& slot,
                                       const std::vector<CopyPart>& parts, uintptr_t stream, bool queued,
                                       bool synchronize, double timeout_s, double* read_seconds = nullptr);

// The host conversions of CPU mode (exposed for tests): n elements of src (bf16 / fp16 bits) -> fp32 dst.
void widen_to_f32(const uint16_t* src, float* dst, size_t n, Convert how);

}  // namespace klotski
