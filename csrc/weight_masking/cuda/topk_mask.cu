// CUDA kernels of the top-k mask: one block per work item, one launch per pass for all tensors.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "../abs_key.h"
#include "../topk_mask.h"
#include "common/dispatch.h"
#include "common/launch.h"
#include "common/shared.h"
#include "common/macros.h"

namespace unlearn_engine {
namespace {

struct ItemView {
  const int64_t* table;  // (W, 3): tensor, start, length
  __device__ int64_t tensor(int64_t i) const { return table[3 * i]; }
  __device__ int64_t start(int64_t i) const { return table[3 * i + 1]; }
  __device__ int64_t length(int64_t i) const { return table[3 * i + 2]; }
};

template <typename T>
__global__ void __launch_bounds__(kThreads) histogram_kernel(const int64_t* __restrict__ ptrs, ItemView items, const int64_t* __restrict__ segs,
                                 const int64_t* __restrict__ prefix, int shift, unsigned long long* __restrict__ hist,
                                 int64_t nan_slot) {
  UE_SHARED(unsigned int, local, [257]);
  for (int d = threadIdx.x; d < 257; d += blockDim.x) local[d] = 0;
  __syncthreads();
  const int64_t i = blockIdx.x;
  const T* x = reinterpret_cast<const T*>(ptrs[items.tensor(i)]) + items.start(i);
  const uint32_t want = static_cast<uint32_t>(prefix[segs[i]]);
  for (int64_t j = threadIdx.x; j < items.length(i); j += blockDim.x) {
    const uint32_t key = abs_key(x[j]);
    if (key > kInfKey) { atomicAdd(&local[256], 1u); continue; }
    if (shift < 24 && (key >> (shift + 8)) != want) continue;
    atomicAdd(&local[(key >> shift) & 255u], 1u);
  }
  __syncthreads();
  for (int d = threadIdx.x; d < 256; d += blockDim.x)
    if (local[d]) atomicAdd(&hist[segs[i] * 256 + d], static_cast<unsigned long long>(local[d]));
  if (threadIdx.x == 0 && local[256]) atomicAdd(&hist[nan_slot], static_cast<unsigned long long>(local[256]));
}

template <typename T>
__global__ void __launch_bounds__(kThreads) count_ties_kernel(const int64_t* __restrict__ ptrs, ItemView items, const int64_t* __restrict__ segs,
                                  const int64_t* __restrict__ threshold, int64_t* __restrict__ ties) {
  using Reduce = cub::BlockReduce<int64_t, kThreads>;
  UE_SHARED(typename Reduce::TempStorage, storage);
  const int64_t i = blockIdx.x;
  const T* x = reinterpret_cast<const T*>(ptrs[items.tensor(i)]) + items.start(i);
  const int64_t t = threshold[segs[i]];
  int64_t count = 0;
  for (int64_t j = threadIdx.x; j < items.length(i); j += blockDim.x) count += static_cast<int64_t>(abs_key(x[j])) == t;
  const int64_t total = Reduce(storage).Sum(count);
  if (threadIdx.x == 0) ties[i] = total;
}

// Each thread builds one byte (8 elements); ties are ranked in index order with a block-wide scan.
template <typename T>
__global__ void __launch_bounds__(kThreads) write_mask_kernel(const int64_t* __restrict__ ptrs, const int64_t* __restrict__ bit_ptrs,
                                  ItemView items, const int64_t* __restrict__ segs,
                                  const int64_t* __restrict__ threshold, const int64_t* __restrict__ tie_offset,
                                  const int64_t* __restrict__ ties_needed) {
  using Scan = cub::BlockScan<int, kThreads>;
  UE_SHARED(typename Scan::TempStorage, storage);
  const int64_t i = blockIdx.x;
  const int64_t start = items.start(i), length = items.length(i);
  const T* x = reinterpret_cast<const T*>(ptrs[items.tensor(i)]) + start;
  uint8_t* out = reinterpret_cast<uint8_t*>(bit_ptrs[items.tensor(i)]) + start / 8;
  const int64_t t = threshold[segs[i]], need = ties_needed[segs[i]];
  const int64_t num_bytes = (length + 7) / 8;
  int64_t carry = tie_offset[i];
  for (int64_t tile = 0; tile < num_bytes; tile += blockDim.x) {
    const int64_t b = tile + threadIdx.x;
    int64_t keys[8];
    int tie_count = 0;
    for (int e = 0; e < 8; ++e) {
      const int64_t j = 8 * b + e;
      keys[e] = (b < num_bytes && j < length) ? static_cast<int64_t>(abs_key(x[j])) : -1;
      tie_count += keys[e] == t;
    }
    int before, tile_total;
    Scan(storage).ExclusiveSum(tie_count, before, tile_total);
    __syncthreads();  // storage is reused by the next tile's scan
    if (b < num_bytes) {
      int64_t rank = carry + before;
      uint8_t byte = 0;
      for (int e = 0; e < 8; ++e) {
        const bool take = keys[e] > t || (keys[e] == t && rank++ < need);
        byte |= static_cast<uint8_t>(take) << e;
      }
      out[b] = byte;
    }
    carry += tile_total;
  }
}

// ----------------------------------------------------------------------------- the two-pass scheme
// Pass 1: per-segment histogram of the key's top 12 bits (4096 bins in shared memory), plus the NaN count.
template <typename T>
__global__ void __launch_bounds__(kThreads) high_histogram_kernel(const int64_t* __restrict__ ptrs, ItemView items,
                                                                  const int64_t* __restrict__ segs,
                                                                  unsigned long long* __restrict__ hist,
                                                                  int64_t nan_slot) {
  UE_SHARED(unsigned int, local, [kHighBins + 1]);
  for (int d = threadIdx.x; d <= kHighBins; d += blockDim.x) local[d] = 0;
  __syncthreads();
  const int64_t i = blockIdx.x;
  const T* x = reinterpret_cast<const T*>(ptrs[items.tensor(i)]) + items.start(i);
  for (int64_t j = threadIdx.x; j < items.length(i); j += blockDim.x) {
    const uint32_t key = abs_key(x[j]);
    atomicAdd(&local[key > kInfKey ? kHighBins : key >> kHighShift], 1u);
  }
  __syncthreads();
  unsigned long long* h = hist + segs[i] * kHighBins;
  for (int d = threadIdx.x; d < kHighBins; d += blockDim.x)
    if (local[d]) atomicAdd(&h[d], static_cast<unsigned long long>(local[d]));
  if (threadIdx.x == 0 && local[kHighBins]) atomicAdd(&hist[nan_slot], static_cast<unsigned long long>(local[kHighBins]));
}

// Pass 2: each thread builds one byte (8 elements): the bits the top digit decides; elements of the threshold
// digit go to the segment's candidate list, one atomic per warp (the lanes' slots by ballot and popcount).
template <typename T>
__global__ void __launch_bounds__(kThreads) write_collect_kernel(
    const int64_t* __restrict__ ptrs, const int64_t* __restrict__ bit_ptrs, ItemView items,
    const int64_t* __restrict__ segs, const int64_t* __restrict__ digit, const int64_t* __restrict__ offset,
    unsigned long long* __restrict__ fill, int64_t* __restrict__ cand_key, int64_t* __restrict__ cand_pos) {
  const int64_t i = blockIdx.x;
  const int64_t start = items.start(i), length = items.length(i), s = segs[i];
  const T* x = reinterpret_cast<const T*>(ptrs[items.tensor(i)]) + start;
  uint8_t* out = reinterpret_cast<uint8_t*>(bit_ptrs[items.tensor(i)]) + start / 8;
  const uint32_t d = static_cast<uint32_t>(digit[s]);
  const int64_t num_bytes = (length + 7) / 8, base = offset[s];
  const unsigned lane = threadIdx.x & 31u;
  // the trip count is the same for every thread, so whole warps reach each ballot
  for (int64_t tile = 0; tile < num_bytes; tile += blockDim.x) {
    const int64_t b = tile + threadIdx.x;
    uint8_t byte = 0;
    for (int e = 0; e < 8; ++e) {
      const int64_t j = 8 * b + e;
      const bool valid = b < num_bytes && j < length;
      const uint32_t key = valid ? abs_key(x[j]) : 0u;
      const uint32_t hi = key >> kHighShift;
      byte |= static_cast<uint8_t>(valid && hi > d) << e;
      const bool collect = valid && hi == d;
      const unsigned ballot = __ballot_sync(0xffffffffu, collect);
      if (ballot == 0u) continue;
      unsigned long long first = 0;
      const int leader = __ffs(ballot) - 1;
      if (static_cast<int>(lane) == leader) first = atomicAdd(&fill[s], static_cast<unsigned long long>(__popc(ballot)));
      first = __shfl_sync(0xffffffffu, first, leader);
      if (collect) {
        const int64_t slot = base + static_cast<int64_t>(first) + __popc(ballot & ((1u << lane) - 1u));
        cand_key[slot] = key;
        cand_pos[slot] = (i << 16) | j;
      }
    }
    if (b < num_bytes) out[b] = byte;
  }
}

// The bits of the chosen candidates: one 32-bit atomicOr each (the bits tensors are padded to whole words).
__global__ void __launch_bounds__(kThreads) set_bits_kernel(const int64_t* __restrict__ bit_ptrs, ItemView items,
                                                            const int64_t* __restrict__ positions, int64_t count) {
  for (int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; p < count;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = positions[p] >> 16;
    const int64_t e = items.start(i) + (positions[p] & 0xffff);
    unsigned int* word = reinterpret_cast<unsigned int*>(bit_ptrs[items.tensor(i)]) + (e >> 5);
    atomicOr(word, 1u << (e & 31));
  }
}

at::Tensor item_table(const WorkItems& items, const at::Device& device) { return items.table(device); }

void histogram(const std::vector<at::Tensor>& tensors, const WorkItems& items, const at::Tensor& segments,
               const at::Tensor& prefix, int shift, at::Tensor& hist) {
  const auto device = tensors[0].device();
  const auto ptrs = pointer_table(tensors, device);
  const auto table = item_table(items, device);
  auto stream = at::cuda::getCurrentCUDAStream();
  UE_DISPATCH_FLOAT_HALF_BF16(tensors[0].scalar_type(), "topk_histogram_cuda", [&] {
    UE_LAUNCH(items.size(), kThreads, 0, stream, histogram_kernel<scalar_t>)(
        ptrs.data_ptr<int64_t>(), ItemView{table.data_ptr<int64_t>()}, segments.data_ptr<int64_t>(),
        prefix.data_ptr<int64_t>(), shift, reinterpret_cast<unsigned long long*>(hist.data_ptr<int64_t>()),
        hist.numel() - 1);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void count_ties(const std::vector<at::Tensor>& tensors, const WorkItems& items, const at::Tensor& segments,
                const at::Tensor& threshold, at::Tensor& ties) {
  const auto device = tensors[0].device();
  const auto ptrs = pointer_table(tensors, device);
  const auto table = item_table(items, device);
  auto stream = at::cuda::getCurrentCUDAStream();
  UE_DISPATCH_FLOAT_HALF_BF16(tensors[0].scalar_type(), "topk_count_ties_cuda", [&] {
    UE_LAUNCH(items.size(), kThreads, 0, stream, count_ties_kernel<scalar_t>)(
        ptrs.data_ptr<int64_t>(), ItemView{table.data_ptr<int64_t>()}, segments.data_ptr<int64_t>(),
        threshold.data_ptr<int64_t>(), ties.data_ptr<int64_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void write_mask(const std::vector<at::Tensor>& tensors, const WorkItems& items, const at::Tensor& segments,
                const at::Tensor& threshold, const at::Tensor& tie_offset, const at::Tensor& ties_needed,
                std::vector<at::Tensor>& bits) {
  const auto device = tensors[0].device();
  const auto ptrs = pointer_table(tensors, device);
  const auto bit_ptrs = pointer_table(bits, device);
  const auto table = item_table(items, device);
  auto stream = at::cuda::getCurrentCUDAStream();
  UE_DISPATCH_FLOAT_HALF_BF16(tensors[0].scalar_type(), "topk_write_mask_cuda", [&] {
    UE_LAUNCH(items.size(), kThreads, 0, stream, write_mask_kernel<scalar_t>)(
        ptrs.data_ptr<int64_t>(), bit_ptrs.data_ptr<int64_t>(), ItemView{table.data_ptr<int64_t>()},
        segments.data_ptr<int64_t>(), threshold.data_ptr<int64_t>(), tie_offset.data_ptr<int64_t>(),
        ties_needed.data_ptr<int64_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void high_histogram(const std::vector<at::Tensor>& tensors, const WorkItems& items, const at::Tensor& segments,
                    at::Tensor& hist) {
  const auto device = tensors[0].device();
  const auto ptrs = pointer_table(tensors, device);
  const auto table = item_table(items, device);
  auto stream = at::cuda::getCurrentCUDAStream();
  UE_DISPATCH_FLOAT_HALF_BF16(tensors[0].scalar_type(), "topk_high_histogram_cuda", [&] {
    UE_LAUNCH(items.size(), kThreads, 0, stream, high_histogram_kernel<scalar_t>)(
        ptrs.data_ptr<int64_t>(), ItemView{table.data_ptr<int64_t>()}, segments.data_ptr<int64_t>(),
        reinterpret_cast<unsigned long long*>(hist.data_ptr<int64_t>()), hist.numel() - 1);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void write_collect(const std::vector<at::Tensor>& tensors, const WorkItems& items, const at::Tensor& segments,
                   const at::Tensor& digit, const at::Tensor& offset, at::Tensor& fill, at::Tensor& cand_key,
                   at::Tensor& cand_pos, std::vector<at::Tensor>& bits) {
  const auto device = tensors[0].device();
  const auto ptrs = pointer_table(tensors, device);
  const auto bit_ptrs = pointer_table(bits, device);
  const auto table = item_table(items, device);
  auto stream = at::cuda::getCurrentCUDAStream();
  UE_DISPATCH_FLOAT_HALF_BF16(tensors[0].scalar_type(), "topk_write_collect_cuda", [&] {
    UE_LAUNCH(items.size(), kThreads, 0, stream, write_collect_kernel<scalar_t>)(
        ptrs.data_ptr<int64_t>(), bit_ptrs.data_ptr<int64_t>(), ItemView{table.data_ptr<int64_t>()},
        segments.data_ptr<int64_t>(), digit.data_ptr<int64_t>(), offset.data_ptr<int64_t>(),
        reinterpret_cast<unsigned long long*>(fill.data_ptr<int64_t>()), cand_key.data_ptr<int64_t>(),
        cand_pos.data_ptr<int64_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void set_bits(const WorkItems& items, const at::Tensor& positions, std::vector<at::Tensor>& bits) {
  const int64_t count = positions.numel();
  if (count == 0) return;
  const auto device = positions.device();
  const auto bit_ptrs = pointer_table(bits, device);
  const auto table = item_table(items, device);
  const int blocks = static_cast<int>(std::min<int64_t>((count + kThreads - 1) / kThreads, 4096));
  UE_LAUNCH(blocks, kThreads, 0, at::cuda::getCurrentCUDAStream(), set_bits_kernel)(
      bit_ptrs.data_ptr<int64_t>(), ItemView{table.data_ptr<int64_t>()}, positions.data_ptr<int64_t>(), count);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

MaskBackend cuda_mask_backend() { return MaskBackend{&histogram, &count_ties, &write_mask}; }
TwoPassBackend cuda_two_pass_backend() { return TwoPassBackend{&high_histogram, &write_collect, &set_bits}; }

}  // namespace unlearn_engine
