// Something in flight that touches a ring slot (a disk read into it, a copy out of it). A slot cannot be
// released while one of these is not done: releasing then would let the next owner see torn bytes.
#pragma once
#include <string>

namespace klotski {

class Completion {
 public:
  virtual ~Completion() = default;
  virtual bool done() = 0;                   // non-blocking; safe to call from any thread
  virtual std::string describe() const = 0;  // e.g. "read of 'x.bin' at offset 0, 4096 bytes"
};

}  // namespace klotski
