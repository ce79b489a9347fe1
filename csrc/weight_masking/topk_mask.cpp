// Top-k mask driver (device-agnostic): runs the radix-select passes through a CPU or CUDA backend and
// does the small per-segment bookkeeping (digit choice, tie offsets) on the host between passes.
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <numeric>
#include <string>

#include "common/launch.h"
#include "topk_mask.h"

namespace unlearn_engine {
namespace {

constexpr int64_t kSelectNone = int64_t{1} << 40;  // a threshold above every key

// Which scheme runs on CPU: "two-pass" (default, topk_mask_cpu_two_pass), "gpu" (the GPU's two-pass driver with
// plain CPU kernels, so tests check it without a GPU) or "radix" (the general radix passes). $UE_TOPK_CPU_SCHEME.
std::string cpu_scheme() {
  const char* value = std::getenv("UE_TOPK_CPU_SCHEME");
  const std::string scheme = value && *value ? value : "two-pass";
  TORCH_CHECK(scheme == "two-pass" || scheme == "gpu" || scheme == "radix",
              "UE_TOPK_CPU_SCHEME must be two-pass, gpu or radix, got ", scheme);
  return scheme;
}

// The GPU's two-pass scheme (topk_mask.h). Returns false, bits untouched, when the threshold digit holds too many
// elements (heavy ties: the candidate list would cost more than it saves); the caller then runs the radix passes.
bool two_pass(const TwoPassBackend& backend, const std::vector<at::Tensor>& tensors, const WorkItems& items,
              const at::Tensor& segments, const std::vector<int64_t>& k, std::vector<at::Tensor>& bits) {
  const int64_t S = static_cast<int64_t>(k.size());
  const auto device = tensors[0].device();
  const auto longs = tensors[0].options().dtype(at::kLong);
  auto hist = at::zeros({S * kHighBins + 1}, longs);
  backend.high_histogram(tensors, items, segments, hist);
  const auto h = hist.cpu();
  const int64_t* counts = h.data_ptr<int64_t>();
  TORCH_CHECK(counts[S * kHighBins] == 0, "tensors contain ", counts[S * kHighBins],
              " NaN value(s); a top-k by magnitude is undefined for NaN (check the gradients)");
  // Per segment: the digit holding the k-th largest key, how many to take from it, and its list region.
  std::vector<int64_t> digit(S, kHighBins), need(S, 0), offset(S, 0), size(S, 0);
  int64_t candidates = 0;
  const int64_t total = std::accumulate(counts, counts + S * kHighBins, int64_t{0});
  for (int64_t s = 0; s < S; ++s) {
    offset[s] = candidates;
    if (k[s] == 0) continue;
    const DigitChoice choice = choose_digit(counts + s * kHighBins, kHighBins, k[s]);
    digit[s] = choice.digit;
    need[s] = choice.need;
    size[s] = choice.count;
    candidates += choice.count;
  }
  // The list costs ~56 bytes a candidate at its peak (the second sort's keys, values and scratch): past 1/128 of
  // the elements (under half a byte an element) the radix passes are cheaper in memory.
  if (candidates > std::max<int64_t>(int64_t{1} << 20, total / 128)) return false;
  if (std::all_of(k.begin(), k.end(), [](int64_t v) { return v == 0; })) return true;  // bits stay zero

  at::Tensor cand_key = at::empty({candidates}, longs), cand_pos = at::empty({candidates}, longs);
  auto fill = at::zeros({S}, longs);
  backend.write_collect(tensors, items, segments, device_vector(digit, device), device_vector(offset, device), fill,
                        cand_key, cand_pos, bits);
  // Each segment's candidates by key, descending, ties by position: the list sorted by position, then stably by
  // (segment, key descending). Segment s then holds [offset[s], offset[s] + size[s]); its first need[s] are taken.
  auto [pos, by_pos] = at::sort(cand_pos, std::optional<bool>(false), 0, false);  // positions are distinct
  cand_pos.reset();
  at::Tensor order_key = segments.index_select(0, pos.div(int64_t{1} << 16, "floor")) * (int64_t{1} << 32) +
                         (int64_t{0x7fffffff} - cand_key.index_select(0, by_pos));
  cand_key.reset();
  by_pos.reset();
  const at::Tensor by_key = std::get<1>(at::sort(order_key, std::optional<bool>(true), 0, false));
  order_key.reset();
  std::vector<at::Tensor> taken;
  for (int64_t s = 0; s < S; ++s)
    if (need[s] > 0) taken.push_back(by_key.narrow(0, offset[s], need[s]));
  backend.set_bits(items, pos.index_select(0, at::cat(taken)), bits);
  return true;
}

std::vector<at::Tensor> topk_mask(at::TensorList tensors_in, at::IntArrayRef k, bool per_tensor) {
  TORCH_CHECK(!tensors_in.empty(), "tensors must be a non-empty list");
  const auto dtype = tensors_in[0].scalar_type();
  const auto device = tensors_in[0].device();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "tensors must be float32, float16 or bfloat16, got ", dtype);
  std::vector<at::Tensor> tensors;
  std::vector<int64_t> lengths;
  for (size_t i = 0; i < tensors_in.size(); ++i) {
    const auto& t = tensors_in[i];
    TORCH_CHECK(t.scalar_type() == dtype, "tensors must share one dtype: tensors[0] is ", dtype, ", tensors[", i,
                "] is ", t.scalar_type());
    TORCH_CHECK(t.device() == device, "tensors must share one device: tensors[0] is on ", device, ", tensors[", i,
                "] is on ", t.device());
    tensors.push_back(t.contiguous().view({-1}));
    lengths.push_back(t.numel());
  }
  const int64_t num_segments = per_tensor ? static_cast<int64_t>(tensors.size()) : 1;
  TORCH_CHECK(static_cast<int64_t>(k.size()) == num_segments, "k must have one entry per segment (",
              num_segments, "), got ", k.size());
  std::vector<int64_t> segment_size(num_segments, 0);
  for (size_t i = 0; i < tensors.size(); ++i) segment_size[per_tensor ? i : 0] += lengths[i];
  for (int64_t s = 0; s < num_segments; ++s)
    TORCH_CHECK(k[s] >= 0 && k[s] <= segment_size[s], "k[", s, "]=", k[s], " must be in [0, ", segment_size[s], "]");

  const c10::DeviceGuard guard(device);
  const WorkItems items = make_work_items(lengths);
#ifdef WITH_CUDA
  const MaskBackend backend = uses_cuda_kernels(device) ? cuda_mask_backend() : cpu_mask_backend();
#else
  const MaskBackend backend = cpu_mask_backend();
#endif
  std::vector<at::Tensor> bits;
  for (int64_t n : lengths) {
    // padded to whole 32-bit words: the GPU sets single bits with a 32-bit atomicOr
    const int64_t bytes = (n + 7) / 8;
    bits.push_back(at::zeros({(bytes + 3) / 4 * 4}, tensors[0].options().dtype(at::kByte)).narrow(0, 0, bytes));
  }
  if (items.size() == 0) return bits;

  std::vector<int64_t> item_segment(items.size());
  for (int64_t i = 0; i < items.size(); ++i) item_segment[i] = per_tensor ? items.tensor[i] : 0;
  const std::vector<int64_t> k_list(k.begin(), k.end());
  const std::string scheme = uses_cuda_kernels(device) ? "gpu" : cpu_scheme();
  if (scheme == "two-pass" && topk_mask_cpu_two_pass(tensors, items, item_segment, k_list, bits)) return bits;
  const at::Tensor segments = device_vector(item_segment, device);
#ifdef WITH_CUDA
  const TwoPassBackend two_pass_backend = uses_cuda_kernels(device) ? cuda_two_pass_backend() : cpu_two_pass_backend();
#else
  const TwoPassBackend two_pass_backend = cpu_two_pass_backend();
#endif
  if (scheme == "gpu" && two_pass(two_pass_backend, tensors, items, segments, k_list, bits)) return bits;

  std::vector<int64_t> remaining(k.begin(), k.end()), prefix(num_segments, 0);
  // A 16-bit value widened to fp32 leaves the low key bits zero (bf16: 16 bits, fp16: 13, denormals included):
  // a digit made only of those bits is 0 for every element, so its pass is skipped (bf16: 2 of 4 passes).
  const int zero_low_bits = dtype == at::kBFloat16 ? 16 : dtype == at::kHalf ? 13 : 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    if (shift + 8 <= zero_low_bits) {
      for (int64_t s = 0; s < num_segments; ++s)
        if (remaining[s] != 0) prefix[s] <<= 8;  // every candidate has digit 0 here
      continue;
    }
    auto hist = at::zeros({num_segments * 256 + 1}, tensors[0].options().dtype(at::kLong));
    backend.histogram(tensors, items, segments, device_vector(prefix, device), shift, hist);
    const auto h = hist.cpu();
    const int64_t* counts = h.data_ptr<int64_t>();
    TORCH_CHECK(counts[num_segments * 256] == 0, "tensors contain ", counts[num_segments * 256],
                " NaN value(s); a top-k by magnitude is undefined for NaN (check the gradients)");
    for (int64_t s = 0; s < num_segments; ++s) {
      if (remaining[s] == 0) continue;
      const DigitChoice choice = choose_digit(counts + s * 256, 256, remaining[s]);
      prefix[s] = (prefix[s] << 8) | choice.digit;
      remaining[s] = choice.need;
    }
  }
  for (int64_t s = 0; s < num_segments; ++s)
    if (k[s] == 0) prefix[s] = kSelectNone;
  const at::Tensor threshold = device_vector(prefix, device);

  auto ties = at::zeros({items.size()}, tensors[0].options().dtype(at::kLong));
  backend.count_ties(tensors, items, segments, threshold, ties);
  const auto ties_cpu = ties.cpu();
  std::vector<int64_t> tie_offset(items.size()), running(num_segments, 0);
  for (int64_t i = 0; i < items.size(); ++i) {
    tie_offset[i] = running[item_segment[i]];
    running[item_segment[i]] += ties_cpu.data_ptr<int64_t>()[i];
  }
  backend.write_mask(tensors, items, segments, threshold, device_vector(tie_offset, device),
                     device_vector(remaining, device), bits);
  return bits;
}

}  // namespace

TORCH_LIBRARY_IMPL(unlearn_engine, CPU, m) { m.impl("topk_mask", &topk_mask); }
#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(unlearn_engine, CUDA, m) { m.impl("topk_mask", &topk_mask); }
#endif

}  // namespace unlearn_engine
