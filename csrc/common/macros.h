// What every kernel family shares: the host/device qualifier and the CUDA block size.
#pragma once

#ifdef __CUDACC__
#define UE_HOST_DEVICE __host__ __device__
#else
#define UE_HOST_DEVICE
#endif

namespace unlearn_engine {

// Threads per block of the element-wise, reduction and per-row kernels (the loss row pass picks its own
// width from V). 256 = 8 warps: enough in flight per block, small enough for several blocks per SM.
constexpr int kThreads = 256;

}  // namespace unlearn_engine
