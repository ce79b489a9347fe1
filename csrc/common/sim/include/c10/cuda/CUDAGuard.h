// Simulator build only (csrc/common/sim/): the device guard has no device to switch to.
#pragma once

#include <c10/core/Device.h>

namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(const c10::Device&) {}
};
}  // namespace c10::cuda
