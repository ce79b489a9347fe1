// CPU kernels of the top-k mask: work items in parallel (OpenMP through at::parallel_for).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <functional>
#include <mutex>
#include <numeric>
#include <utility>
#include <vector>

#include "../abs_key.h"
#include "../topk_mask.h"
#include "common/dispatch.h"

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
  UE_DISPATCH_FLOAT_HALF_BF16(tensors[0].scalar_type(), "topk_histogram", [&] {
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
  UE_DISPATCH_FLOAT_HALF_BF16(tensors[0].scalar_type(), "topk_count_ties", [&] {
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
  UE_DISPATCH_FLOAT_HALF_BF16(tensors[0].scalar_type(), "topk_write_mask", [&] {
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

// The bits of one work item that its segment's top digit d decides (key >> kHighShift > d); collect(key, index) is
// called for each element of digit d itself, in index order.
template <typename T, typename Collect>
void write_decided_bits(const T* x, uint8_t* out, int64_t n, int64_t d, Collect&& collect) {
  for (int64_t b = 0; b * 8 < n; ++b) {
    uint8_t byte = 0;
    for (int e = 0; e < 8 && b * 8 + e < n; ++e) {
      const uint32_t key = abs_key(x[b * 8 + e]);
      const int64_t hi = key >> kHighShift;
      byte |= static_cast<uint8_t>(hi > d) << e;
      if (hi == d) collect(key, b * 8 + e);
    }
    out[b] = byte;
  }
}

template <typename T>
bool two_pass_typed(const std::vector<at::Tensor>& tensors, const WorkItems& items,
                    const std::vector<int64_t>& item_segment, const std::vector<int64_t>& k,
                    std::vector<at::Tensor>& bits) {
  const int64_t S = static_cast<int64_t>(k.size());
  // Pass 1: histogram of the top digit, per segment.
  std::vector<int64_t> hist(S * kHighBins, 0);
  int64_t nans = 0, total = 0;
  std::mutex merge;
  for_each_item(items, [&](int64_t i) {
    const T* x = tensors[items.tensor[i]].data_ptr<T>() + items.start[i];
    std::vector<int32_t> local(kHighBins, 0);
    int64_t local_nans = 0;
    for (int64_t j = 0; j < items.length[i]; ++j) {
      const uint32_t key = abs_key(x[j]);
      local_nans += key > kInfKey;
      ++local[key >> kHighShift];
    }
    std::lock_guard<std::mutex> lock(merge);
    int64_t* h = hist.data() + item_segment[i] * kHighBins;
    for (int64_t d = 0; d < kHighBins; ++d) h[d] += local[d];
    nans += local_nans;
  });
  TORCH_CHECK(nans == 0, "tensors contain ", nans, " NaN value(s); a top-k by magnitude is undefined for NaN "
              "(check the gradients)");
  // Per segment: the digit holding the k-th largest key, and how many to take from it.
  std::vector<int64_t> digit(S, kHighBins), need_in_digit(S, 0);
  int64_t candidates = 0;
  for (int64_t s = 0; s < S; ++s) {
    total += std::accumulate(hist.begin() + s * kHighBins, hist.begin() + (s + 1) * kHighBins, int64_t{0});
    if (k[s] == 0) continue;
    const DigitChoice choice = choose_digit(hist.data() + s * kHighBins, kHighBins, k[s]);
    digit[s] = choice.digit;
    need_in_digit[s] = choice.need;
    candidates += choice.count;
  }
  if (candidates > std::max<int64_t>(int64_t{1} << 20, total / 8)) return false;  // heavy ties: general path
  // Pass 2: every bit the top digit decides; the threshold digit's elements are collected, in order.
  std::vector<std::vector<std::pair<uint32_t, int64_t>>> found(items.size());
  for_each_item(items, [&](int64_t i) {
    const T* x = tensors[items.tensor[i]].data_ptr<T>() + items.start[i];
    uint8_t* out = bits[items.tensor[i]].data_ptr<uint8_t>() + items.start[i] / 8;
    write_decided_bits(x, out, items.length[i], digit[item_segment[i]],
                       [&](uint32_t key, int64_t j) { found[i].emplace_back(key, j); });
  });
  // The exact threshold among the candidates, then ties in (tensor, index) order.
  std::vector<std::vector<uint32_t>> keys(S);
  for (int64_t i = 0; i < items.size(); ++i)
    for (const auto& c : found[i]) keys[item_segment[i]].push_back(c.first);
  std::vector<uint32_t> threshold(S, 0);
  std::vector<int64_t> ties_left(S, 0);
  for (int64_t s = 0; s < S; ++s) {
    auto& v = keys[s];
    if (need_in_digit[s] == 0 || v.empty()) continue;
    std::nth_element(v.begin(), v.begin() + (need_in_digit[s] - 1), v.end(), std::greater<uint32_t>());
    threshold[s] = v[need_in_digit[s] - 1];
    const int64_t greater = std::count_if(v.begin(), v.end(), [&](uint32_t key) { return key > threshold[s]; });
    ties_left[s] = need_in_digit[s] - greater;
  }
  for (int64_t i = 0; i < items.size(); ++i) {
    const int64_t s = item_segment[i];
    if (need_in_digit[s] == 0) continue;
    uint8_t* out = bits[items.tensor[i]].data_ptr<uint8_t>() + items.start[i] / 8;
    for (const auto& [key, j] : found[i]) {
      const bool take = key > threshold[s] || (key == threshold[s] && ties_left[s]-- > 0);
      if (take) out[j >> 3] |= static_cast<uint8_t>(1u << (j & 7));
    }
  }
  return true;
}

}  // namespace

bool topk_mask_cpu_two_pass(const std::vector<at::Tensor>& tensors, const WorkItems& items,
                            const std::vector<int64_t>& item_segment, const std::vector<int64_t>& k,
                            std::vector<at::Tensor>& bits) {
  bool done = false;
  UE_DISPATCH_FLOAT_HALF_BF16(tensors[0].scalar_type(), "topk_two_pass", [&] {
    done = two_pass_typed<scalar_t>(tensors, items, item_segment, k, bits);
  });
  return done;
}

MaskBackend cpu_mask_backend() { return MaskBackend{&histogram, &count_ties, &write_mask}; }

// ----------------------------------------------------------------------------- the GPU's two-pass kernels on CPU
// Plain loops with the CUDA kernels' contract (topk_mask.h, TwoPassBackend): they let the tests run the GPU's
// two-pass driver on a machine without one (UE_TOPK_CPU_SCHEME=gpu).
namespace {

void high_histogram(const std::vector<at::Tensor>& tensors, const WorkItems& items, const at::Tensor& segments,
                    at::Tensor& hist) {
  const int64_t* seg = segments.data_ptr<int64_t>();
  int64_t* out = hist.data_ptr<int64_t>();
  const int64_t nan_slot = hist.numel() - 1;
  UE_DISPATCH_FLOAT_HALF_BF16(tensors[0].scalar_type(), "topk_high_histogram", [&] {
    for (int64_t i = 0; i < items.size(); ++i) {
      const scalar_t* x = tensors[items.tensor[i]].data_ptr<scalar_t>() + items.start[i];
      for (int64_t j = 0; j < items.length[i]; ++j) {
        const uint32_t key = abs_key(x[j]);
        if (key > kInfKey) {
          ++out[nan_slot];
        } else {
          ++out[seg[i] * kHighBins + (key >> kHighShift)];
        }
      }
    }
  });
}

void write_collect(const std::vector<at::Tensor>& tensors, const WorkItems& items, const at::Tensor& segments,
                   const at::Tensor& digit, const at::Tensor& offset, at::Tensor& fill, at::Tensor& cand_key,
                   at::Tensor& cand_pos, std::vector<at::Tensor>& bits) {
  const int64_t* seg = segments.data_ptr<int64_t>();
  const int64_t* dig = digit.data_ptr<int64_t>();
  const int64_t* off = offset.data_ptr<int64_t>();
  int64_t* filled = fill.data_ptr<int64_t>();
  int64_t* keys = cand_key.data_ptr<int64_t>();
  int64_t* pos = cand_pos.data_ptr<int64_t>();
  UE_DISPATCH_FLOAT_HALF_BF16(tensors[0].scalar_type(), "topk_write_collect", [&] {
    // items in reverse order: the list comes out unordered, as the GPU's atomics leave it
    for (int64_t i = items.size() - 1; i >= 0; --i) {
      const scalar_t* x = tensors[items.tensor[i]].data_ptr<scalar_t>() + items.start[i];
      uint8_t* out = bits[items.tensor[i]].data_ptr<uint8_t>() + items.start[i] / 8;
      const int64_t s = seg[i];
      write_decided_bits(x, out, items.length[i], dig[s], [&](uint32_t key, int64_t j) {
        const int64_t slot = off[s] + filled[s]++;
        keys[slot] = key;
        pos[slot] = (i << 16) | j;
      });
    }
  });
}

// As the CUDA kernel does: OR into the 32-bit word holding the bit, which must lie inside the padded storage.
void set_bits(const WorkItems& items, const at::Tensor& positions, std::vector<at::Tensor>& bits) {
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t p = 0; p < positions.numel(); ++p) {
    const int64_t i = pos[p] >> 16, e = items.start[i] + (pos[p] & 0xffff);
    const at::Tensor& t = bits[items.tensor[i]];
    uint8_t* word = t.data_ptr<uint8_t>() + 4 * (e >> 5);
    TORCH_CHECK(reinterpret_cast<uintptr_t>(word) % 4 == 0 &&
                    word + 4 <= static_cast<uint8_t*>(t.storage().mutable_data()) + t.storage().nbytes(),
                "top-k mask storage is not padded to whole 32-bit words");
    uint32_t value;
    std::memcpy(&value, word, 4);
    value |= 1u << (e & 31);
    std::memcpy(word, &value, 4);
  }
}

}  // namespace

TwoPassBackend cpu_two_pass_backend() { return TwoPassBackend{&high_histogram, &write_collect, &set_bits}; }

}  // namespace unlearn_engine
