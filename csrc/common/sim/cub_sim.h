// Simulator build only: the two cub block primitives the kernels use, with cub's usage contract checked.
//   cub::BlockReduce<T, BLOCK>(storage).Sum(x)                      -> the block's sum, valid in thread 0 only
//   cub::BlockScan<T, BLOCK>(storage).ExclusiveSum(x, before, total) -> the exclusive prefix and the block's total
// The contract: the block has exactly BLOCK threads (1-D), every thread calls, and the TempStorage is used again
// only after a __syncthreads() (cub's own rule: other threads may still read it). A break of the first two shows
// as a barrier error; the third fails here. Sums run in thread order, so the result does not depend on the schedule.
#pragma once

#include "common/sim/cuda_sim.h"

namespace cub {
namespace sim_detail {

constexpr uint64_t kUsed = 0x75655f63756273ull;  // "used" mark of a TempStorage (fresh shared memory never has it)

template <int BLOCK>
void check_block(const char* primitive) {
  const dim3& b = ::ue_sim::Index::block_dim();
  if (b.x != static_cast<unsigned>(BLOCK) || b.y != 1 || b.z != 1)
    ::ue_sim::fail(std::string(primitive) + " made for " + std::to_string(BLOCK) + " threads runs in a block of " +
                   std::to_string(b.x) + "x" + std::to_string(b.y) + "x" + std::to_string(b.z));
}

template <typename Storage>
void check_reuse(const Storage& s, const char* primitive) {
  if (s.used == kUsed && s.epoch == ::ue_sim::launch_state().barrier_epoch)
    ::ue_sim::fail(std::string(primitive) + ": TempStorage used again with no __syncthreads() since its last use");
}

template <typename T>
T poisoned() {  // what threads other than 0 get from BlockReduce::Sum (undefined in cub)
  T v;
  std::memset(&v, 0xa5, sizeof(T));
  return v;
}

}  // namespace sim_detail

template <typename T, int BLOCK_DIM_X>
class BlockReduce {
 public:
  struct TempStorage {
    uint64_t used, epoch;
    T slot[BLOCK_DIM_X];
  };
  explicit BlockReduce(TempStorage& storage) : s_(storage) {}

  T Sum(T input) {
    sim_detail::check_block<BLOCK_DIM_X>("cub::BlockReduce");
    sim_detail::check_reuse(s_, "cub::BlockReduce::Sum");
    const unsigned tid = threadIdx.x;
    s_.slot[tid] = input;
    __syncthreads();
    T total = poisoned_or_sum(tid);
    s_.used = sim_detail::kUsed;
    s_.epoch = ::ue_sim::launch_state().barrier_epoch;
    return total;
  }

 private:
  T poisoned_or_sum(unsigned tid) {
    if (tid != 0) return sim_detail::poisoned<T>();
    T total = s_.slot[0];
    for (int i = 1; i < BLOCK_DIM_X; ++i) total = total + s_.slot[i];
    return total;
  }
  TempStorage& s_;
};

template <typename T, int BLOCK_DIM_X>
class BlockScan {
 public:
  struct TempStorage {
    uint64_t used, epoch;
    T slot[BLOCK_DIM_X];
  };
  explicit BlockScan(TempStorage& storage) : s_(storage) {}

  void ExclusiveSum(T input, T& output, T& block_aggregate) {
    sim_detail::check_block<BLOCK_DIM_X>("cub::BlockScan");
    sim_detail::check_reuse(s_, "cub::BlockScan::ExclusiveSum");
    const unsigned tid = threadIdx.x;
    s_.slot[tid] = input;
    __syncthreads();
    T before = T(0), total = T(0);
    for (int i = 0; i < BLOCK_DIM_X; ++i) {
      if (static_cast<unsigned>(i) == tid) before = total;
      total = total + s_.slot[i];
    }
    output = before;
    block_aggregate = total;
    s_.used = sim_detail::kUsed;
    s_.epoch = ::ue_sim::launch_state().barrier_epoch;
  }

 private:
  TempStorage& s_;
};

}  // namespace cub
