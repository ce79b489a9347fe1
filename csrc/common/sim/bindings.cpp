// Simulator build only: unlearn_engine._C_sim's Python functions (the seed, what ran) and the simulator's own
// checks, each a tiny kernel that breaks one rule (tests/test_cuda_sim.py expects each to be reported).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "common/launch.h"
#include "common/shared.h"
#include "common/sim/cuda_sim.h"

namespace unlearn_engine {
namespace {

__global__ void __launch_bounds__(64) divergent_barrier_kernel(int* out) {
  if (threadIdx.x < 32) __syncthreads();  // only the first warp
  out[threadIdx.x] = 1;
}

__global__ void __launch_bounds__(64) two_barriers_kernel(int* out) {
  if (threadIdx.x % 2) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

__global__ void __launch_bounds__(64) exited_lane_kernel(int* out) {
  if (threadIdx.x == 5) return;
  out[threadIdx.x] = __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x), 0);
}

__global__ void __launch_bounds__(64) divergent_ballot_kernel(int* out) {
  unsigned ballot = 0;
  for (int e = 0; e < 2; ++e)
    if ((threadIdx.x + e) % 3 != 0) ballot |= __ballot_sync(0xffffffffu, e == 0);
  out[threadIdx.x] = static_cast<int>(ballot);
}

__global__ void __launch_bounds__(64) mask_without_self_kernel(int* out) {
  out[threadIdx.x] = __shfl_down_sync(0x1u, static_cast<int>(threadIdx.x), 1);
}

__global__ void __launch_bounds__(64) cub_reuse_kernel(int* out) {
  using Reduce = cub::BlockReduce<int, 64>;
  UE_SHARED(typename Reduce::TempStorage, storage);
  const int a = Reduce(storage).Sum(1);
  const int b = Reduce(storage).Sum(2);  // no __syncthreads() between the two uses
  if (threadIdx.x == 0) out[0] = a + b;
}

__global__ void __launch_bounds__(64) cub_block_size_kernel(int* out) {
  using Scan = cub::BlockScan<int, 128>;
  UE_SHARED(typename Scan::TempStorage, storage);
  int before = 0, total = 0;
  Scan(storage).ExclusiveSum(1, before, total);
  out[threadIdx.x] = before + total;
}

__global__ void __launch_bounds__(64) uninitialised_shared_kernel(int* out) {
  UE_SHARED(int, never_written, [64]);
  out[threadIdx.x] = never_written[threadIdx.x];  // the fill pattern shows
}

__global__ void __launch_bounds__(64) good_kernel(int* out) {  // every rule kept: a warp sum, a barrier, a block scan
  using Scan = cub::BlockScan<int, 64>;
  UE_SHARED(typename Scan::TempStorage, storage);
  UE_SHARED(int, warp_sums, [2]);
  int v = static_cast<int>(threadIdx.x);
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = v;
  __syncthreads();
  int before = 0, total = 0;
  Scan(storage).ExclusiveSum(1, before, total);
  out[blockIdx.x * 64 + threadIdx.x] = warp_sums[0] + warp_sums[1] + before + total;
}

__global__ void __launch_bounds__(64) bounded_kernel(int* out) { out[threadIdx.x] = 1; }

__global__ void unbounded_kernel(int* out) { out[threadIdx.x] = 1; }  // no __launch_bounds__

// Each thread writes its neighbour's element of `first`: the last one writes one past its end (on a GPU, into
// `second` or padding), thread 0 of the other kernel one before its start. The first writes through a pointer,
// which UBSan's bounds check does not see (ASan's poisoned canary does, under make sanitize-sim); the second
// indexes the array, which UBSan reports there.
__global__ void __launch_bounds__(64) shared_overflow_kernel(int* out) {
  UE_SHARED(int, first, [64]);
  UE_SHARED(int, second, [64]);
  second[threadIdx.x] = 2;
  int* next = first + 1;
  next[threadIdx.x] = 1;
  __syncthreads();
  out[threadIdx.x] = second[threadIdx.x];
}

__global__ void __launch_bounds__(64) shared_underflow_kernel(int* out) {
  UE_SHARED(int, second, [64]);
  UE_SHARED(int, first, [64]);
  second[threadIdx.x] = 2;
  first[static_cast<int>(threadIdx.x) - 1] = 1;
  __syncthreads();
  out[threadIdx.x] = second[threadIdx.x];
}

// Runs one of the kernels above on 64 threads (good: 3 blocks), into a fresh int array; returns it.
std::vector<int> run_check(const std::string& name, unsigned block) {
  std::vector<int> out(3 * 1024, 0);
  const unsigned threads = block ? block : 64;
  if (name == "divergent_barrier") UE_LAUNCH(1, threads, 0, 0, divergent_barrier_kernel)(out.data());
  else if (name == "two_barriers") UE_LAUNCH(1, threads, 0, 0, two_barriers_kernel)(out.data());
  else if (name == "exited_lane") UE_LAUNCH(1, threads, 0, 0, exited_lane_kernel)(out.data());
  else if (name == "divergent_ballot") UE_LAUNCH(1, threads, 0, 0, divergent_ballot_kernel)(out.data());
  else if (name == "mask_without_self") UE_LAUNCH(1, threads, 0, 0, mask_without_self_kernel)(out.data());
  else if (name == "cub_reuse") UE_LAUNCH(1, threads, 0, 0, cub_reuse_kernel)(out.data());
  else if (name == "cub_block_size") UE_LAUNCH(1, threads, 0, 0, cub_block_size_kernel)(out.data());
  else if (name == "uninitialised_shared") UE_LAUNCH(1, threads, 0, 0, uninitialised_shared_kernel)(out.data());
  else if (name == "good") UE_LAUNCH(3, threads, 0, 0, good_kernel)(out.data());
  else if (name == "above_launch_bounds") UE_LAUNCH(1, 65, 0, 0, bounded_kernel)(out.data());
  else if (name == "no_launch_bounds") UE_LAUNCH(1, threads, 0, 0, unbounded_kernel)(out.data());
  else if (name == "shared_overflow") UE_LAUNCH(1, threads, 0, 0, shared_overflow_kernel)(out.data());
  else if (name == "shared_underflow") UE_LAUNCH(1, threads, 0, 0, shared_underflow_kernel)(out.data());
  else if (name == "too_many_threads") UE_LAUNCH(1, 2048, 0, 0, good_kernel)(out.data());
  else if (name == "grid_too_large") UE_LAUNCH(dim3(1, 70000), threads, 0, 0, good_kernel)(out.data());
  else throw std::invalid_argument("unknown simulator check " + name);
  out.resize(3 * threads);
  return out;
}

}  // namespace
}  // namespace unlearn_engine

void bind_simulator(pybind11::module_& m) {
  using unlearn_engine::run_check;
#ifdef UE_SIM_ASAN
  m.attr("sanitized") = true;  // built with ASan (make sanitize-sim)
#else
  m.attr("sanitized") = false;
#endif
  m.def("configure", [](uint64_t seed) { ::ue_sim::settings().seed = seed; },
        "Seed of the next launches: block and thread order, and the shared-memory fill (0x00 even, 0xff odd).");
  m.def("launches", [] { return ::ue_sim::settings().launches; }, "Kernel -> launches simulated so far.");
  m.def("blocks", [] { return ::ue_sim::settings().blocks; }, "Kernel -> blocks simulated so far.");
  m.def("run_check", &run_check, pybind11::arg("name"), pybind11::arg("block") = 0,
        "Runs one of the simulator's own check kernels (csrc/common/sim/bindings.cpp) and returns its output.");
}
