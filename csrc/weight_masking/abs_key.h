// The sort key of |x|: the IEEE-754 bits of fabs(float(x)). For non-negative floats the bit pattern
// orders exactly like the value (+0 < denormals < normals < inf < NaN), so integer radix select works.
#pragma once

#include <cstdint>
#include <cstring>

#include "common/macros.h"

namespace unlearn_engine {

constexpr uint32_t kInfKey = 0x7f800000u;  // keys above this are NaN

template <typename T>
UE_HOST_DEVICE inline uint32_t abs_key(T value) {
  const float x = static_cast<float>(value);
#ifdef __CUDA_ARCH__
  return static_cast<uint32_t>(__float_as_uint(x)) & 0x7fffffffu;
#else
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return bits & 0x7fffffffu;
#endif
}

}  // namespace unlearn_engine
