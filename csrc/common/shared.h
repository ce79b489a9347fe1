// The one way the project declares a kernel's shared memory, so that the simulator can check it:
//
//   UE_SHARED(float, partial, [kThreads / 32][JMAX + 1]);  // nvcc: __shared__ float partial[kThreads / 32][JMAX + 1];
//   UE_SHARED(int, changed);                               // nvcc: __shared__ int changed;
//
// The simulator build (UE_SIM) makes `name` a reference to storage of the block being simulated (ue_sim::shared in
// csrc/common/sim/cuda_sim.h): the first thread to reach the declaration allocates it, fresh for each block and
// filled with the seed's pattern, with canaries on both sides that are checked when the block ends, so a write
// past either end of the variable is reported (under ASan, any access there, at once). A plain __shared__ does not
// compile there. A type with a comma (template arguments) needs an alias first, as the macro's arguments split at it.
#pragma once

#ifdef UE_SIM
// The address of a static per declaration (and per template instantiation) keys the block's storage.
#define UE_SHARED(type, name, ...)     \
  static char ue_sim_shared_at_##name; \
  auto& name = ::ue_sim::shared<type __VA_ARGS__>(&ue_sim_shared_at_##name, #name, __FILE__, __LINE__)
#else
#define UE_SHARED(type, name, ...) __shared__ type name __VA_ARGS__
#endif
