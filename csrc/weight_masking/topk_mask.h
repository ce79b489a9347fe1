// Exact top-k selection by |value| over many tensors, by radix select on the bits of |x| (fp32).
//
// For a non-negative float, its IEEE bit pattern orders like the value, so the k-th largest |x| is found
// digit by digit (4 passes of 8 bits, each a histogram over the still-candidate elements; 16-bit inputs skip the
// digits their widened key leaves zero: bf16 2 passes, fp16 3). Elements above
// the threshold are all selected; ties at the threshold are taken in (tensor, index) order until exactly k
// are selected. No sort, no concatenated copy of the tensors.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "work_items.h"

namespace unlearn_engine {

// Per-segment state of the search (a segment is the whole list, or one tensor in per-tensor scope).
struct Selection {
  std::vector<int64_t> segment_of_tensor;  // (T,)
  std::vector<int64_t> remaining;          // (S,) how many are still to choose among candidates
  std::vector<int64_t> prefix;             // (S,) the threshold's high bits found so far
};

// Backend kernels. `hist` is (S*256 + 1) int64: per-segment digit counts, then the NaN count.
struct MaskBackend {
  // Count digit (key >> shift) & 255 of the elements whose key >> (shift + 8) == prefix[segment].
  void (*histogram)(const std::vector<at::Tensor>& tensors, const WorkItems& items, const at::Tensor& segments,
                    const at::Tensor& prefix, int shift, at::Tensor& hist);
  // ties[item] = number of elements of that item whose key == threshold[segment].
  void (*count_ties)(const std::vector<at::Tensor>& tensors, const WorkItems& items, const at::Tensor& segments,
                     const at::Tensor& threshold, at::Tensor& ties);
  // Writes the bits: key > threshold, or key == threshold and tie rank < ties_needed[segment].
  void (*write_mask)(const std::vector<at::Tensor>& tensors, const WorkItems& items, const at::Tensor& segments,
                     const at::Tensor& threshold, const at::Tensor& tie_offset, const at::Tensor& ties_needed,
                     std::vector<at::Tensor>& bits);
};

MaskBackend cpu_mask_backend();

// CPU fast path: one histogram pass over the top 12 bits of the key, then one pass that writes every bit
// decided by that digit and collects the few elements of the threshold digit; the exact threshold among those
// is found by selection. Returns false (bits untouched) when the threshold digit holds too many elements, in
// which case the caller runs the general radix passes.
bool topk_mask_cpu_two_pass(const std::vector<at::Tensor>& tensors, const WorkItems& items,
                            const std::vector<int64_t>& item_segment, const std::vector<int64_t>& k,
                            std::vector<at::Tensor>& bits);
#ifdef WITH_CUDA
MaskBackend cuda_mask_backend();
#endif

}  // namespace unlearn_engine
