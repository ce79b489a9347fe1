// Simulator build only (csrc/common/sim/): stands in for ATen's CUDA context, so a .cu file's host code compiles as
// C++. The current stream is the simulator's one stream; a launch has finished (or thrown) when it returns.
#pragma once

#include "common/sim/cuda_sim.h"

namespace at::cuda {
inline ::ue_sim::Stream getCurrentCUDAStream() { return 0; }
}  // namespace at::cuda

// A simulated launch reports its errors by throwing, so there is nothing left to check after it.
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ((void)0)
