// CPU kernels of the top-k mask: work items in parallel (OpenMP through at::parallel_for).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <mutex>

#include "../abs_key.h"
#include "../topk_mask.h"

namespace unlearn_engine {
namespace {

template <typename F>
void for_each_item(const WorkItems& items, F&& fn) {
  at::parallel_for(0, items.size(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) fn(i);
  });
}

void histogram(const std::vector<at::Tensor>& tensors, const WorkItems& items, const at::Tensor& segments,
               const at::Tensor& prefix, int shift, at::Tensor& hist) {
  const int64_t* seg = segments.data_ptr<int64_t>();
  const int64_t* pre = prefix.data_ptr<int64_t>();
  int64_t* out = hist.data_ptr<int64_t>();
  const int64_t nan_slot = hist.numel() - 1;
  std::mutex merge;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tensors[0].scalar_type(), "topk_histogram", [&] {
    for_each_item(items, [&](int64_t i) {
      const scalar_t* x = tensors[items.tensor[i]].data_ptr<scalar_t>() + items.start[i];
      const uint32_t want = static_cast<uint32_t>(pre[seg[i]]);
      int64_t local[257] = {0};
      for (int64_t j = 0; j < items.length[i]; ++j) {
        const uint32_t key = abs_key(x[j]);
        if (key > kInfKey) { ++local[256]; continue; }
        if (shift < 24 && (key >> (shift + 8)) != want) continue;
        ++local[(key >> shift) & 255u];
      }
      std::lock_guard<std::mutex> lock(merge);
      for (int d = 0; d < 256; ++d) out[seg[i] * 256 + d] += local[d];
      out[nan_slot] += local[256];
    });
  });
}

void count_ties(const std::vector<at::Tensor>& tensors, const WorkItems& items, const at::Tensor& segments,
                const at::Tensor& threshold, at::Tensor& ties) {
  const int64_t* seg = segments.data_ptr<int64_t>();
  const int64_t* thr = threshold.data_ptr<int64_t>();
  int64_t* out = ties.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tensors[0].scalar_type(), "topk_count_ties", [&] {
    for_each_item(items, [&](int64_t i) {
      const scalar_t* x = tensors[items.tensor[i]].data_ptr<scalar_t>() + items.start[i];
      const int64_t t = thr[seg[i]];
      int64_t count = 0;
      for (int64_t j = 0; j < items.length[i]; ++j) count += static_cast<int64_t>(abs_key(x[j])) == t;
      out[i] = count;
    });
  });
}

void write_mask(const std::vector<at::Tensor>& tensors, const WorkItems& items, const at::Tensor& segments,
                const at::Tensor& threshold, const at::Tensor& tie_offset, const at::Tensor& ties_needed,
                std::vector<at::Tensor>& bits) {
  const int64_t* seg = segments.data_ptr<int64_t>();
  const int64_t* thr = threshold.data_ptr<int64_t>();
  const int64_t* offset = tie_offset.data_ptr<int64_t>();
  const int64_t* needed = ties_needed.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tensors[0].scalar_type(), "topk_write_mask", [&] {
    for_each_item(items, [&](int64_t i) {
      const scalar_t* x = tensors[items.tensor[i]].data_ptr<scalar_t>() + items.start[i];
      uint8_t* out = bits[items.tensor[i]].data_ptr<uint8_t>() + items.start[i] / 8;
      const int64_t t = thr[seg[i]], need = needed[seg[i]];
      int64_t rank = offset[i];
      for (int64_t j = 0; j < items.length[i]; ++j) {
        const int64_t key = abs_key(x[j]);
        const bool take = key > t || (key == t && rank++ < need);
        if (take) out[j >> 3] |= static_cast<uint8_t>(1u << (j & 7));
      }
    });
  });
}

}  // namespace

MaskBackend cpu_mask_backend() { return MaskBackend{&histogram, &count_ties, &write_mask}; }

}  // namespace unlearn_engine
