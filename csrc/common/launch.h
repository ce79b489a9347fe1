// The one way the project launches a CUDA kernel, and the one test of which kernels a device runs.
//
//   UE_LAUNCH(grid, block, shared_bytes, stream, kernel<T>)(args...);
//
// The kernel comes last so that the commas of its template arguments survive the macro. nvcc turns it into
// kernel<<<grid, block, shared_bytes, stream>>>(args...); the simulator build (UE_SIM, csrc/common/sim/) into a
// call of ue_sim::launch, which runs every block's threads on the CPU and checks the synchronisation rules.
#pragma once

#include <c10/core/Device.h>

#ifdef UE_SIM
#define UE_LAUNCH(grid, block, shared_bytes, stream, ...) \
  ::ue_sim::launch(#__VA_ARGS__, __FILE__, __LINE__, grid, block, shared_bytes, stream, __VA_ARGS__)
#else
#define UE_LAUNCH(grid, block, shared_bytes, stream, ...) __VA_ARGS__<<<grid, block, shared_bytes, stream>>>
#endif

namespace unlearn_engine {

// Whether tensors on `device` go to the CUDA kernels: CUDA tensors in the real build, every tensor in the simulator
// build (there the "CUDA" kernels run on CPU tensors).
inline bool uses_cuda_kernels(const c10::Device& device) {
#if defined(UE_SIM)
  (void)device;
  return true;
#elif defined(WITH_CUDA)
  return device.is_cuda();
#else
  (void)device;
  return false;
#endif
}

}  // namespace unlearn_engine
