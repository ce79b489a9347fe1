// Exact top-k selection by |value| over many tensors, by the bits of |x| (fp32 keys).
//
// For a non-negative float, its IEEE bit pattern orders like the value. Two passes over the tensors: a histogram
// of the key's top 12 bits finds the digit that holds the k-th largest key; a second pass writes every bit that
// digit decides and collects the elements of the digit itself (a small list), among which the exact threshold
// and the ties, taken in (tensor, index) order, are found (CPU: nth_element; GPU: two sorts of the list). When
// that digit holds too many elements (heavy ties) the general radix select runs instead: digit by digit (4
// passes of 8 bits, 16-bit inputs skipping the digits their widened key leaves zero: bf16 2, fp16 3), then a
// pass counting ties and one writing the bits. No sort of the tensors, no concatenated copy.
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

// Scanning a segment's digit counts from the top: the digit holding its k-th largest key (k >= 1), how many keys
// to take from that digit (k minus those above it) and how many it holds.
struct DigitChoice {
  int64_t digit, need, count;
};
inline DigitChoice choose_digit(const int64_t* counts, int64_t bins, int64_t k) {
  int64_t above = 0;
  for (int64_t d = bins - 1; d >= 0; --d) {
    if (above + counts[d] >= k) return {d, k - above, counts[d]};
    above += counts[d];
  }
  return {bins, 0, 0};  // fewer than k keys: cannot happen for a checked k
}

// The key's top 12 bits: the first digit of the two-pass scheme.
constexpr int kHighShift = 19;  // keys are 31 bits
constexpr int64_t kHighBins = int64_t{1} << 12;

// Backend kernels of the two-pass scheme (the GPU's; the CPU has its own, topk_mask_cpu_two_pass, and these for
// tests). A candidate's position is (item << 16) | index in item: ordered like (tensor, index).
struct TwoPassBackend {
  // hist (S*kHighBins + 1) int64: per-segment counts of key >> kHighShift, then the NaN count.
  void (*high_histogram)(const std::vector<at::Tensor>& tensors, const WorkItems& items, const at::Tensor& segments,
                         at::Tensor& hist);
  // Writes bit = (key >> kHighShift) > digit[segment] for every element, and appends each element whose top digit
  // equals digit[segment] to its segment's region of the candidate list (key and position at offset[segment] +
  // fill[segment]++; fill starts at zero).
  void (*write_collect)(const std::vector<at::Tensor>& tensors, const WorkItems& items, const at::Tensor& segments,
                        const at::Tensor& digit, const at::Tensor& offset, at::Tensor& fill, at::Tensor& cand_key,
                        at::Tensor& cand_pos, std::vector<at::Tensor>& bits);
  // Sets the bits of the given positions (bits tensors padded to whole 32-bit words).
  void (*set_bits)(const WorkItems& items, const at::Tensor& positions, std::vector<at::Tensor>& bits);
};

TwoPassBackend cpu_two_pass_backend();

// CPU fast path: one histogram pass over the top 12 bits of the key, then one pass that writes every bit
// decided by that digit and collects the few elements of the threshold digit; the exact threshold among those
// is found by selection. Returns false (bits untouched) when the threshold digit holds too many elements, in
// which case the caller runs the general radix passes.
bool topk_mask_cpu_two_pass(const std::vector<at::Tensor>& tensors, const WorkItems& items,
                            const std::vector<int64_t>& item_segment, const std::vector<int64_t>& k,
                            std::vector<at::Tensor>& bits);
#ifdef WITH_CUDA
MaskBackend cuda_mask_backend();
TwoPassBackend cuda_two_pass_backend();
#endif

}  // namespace unlearn_engine
