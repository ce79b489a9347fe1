// Top-k mask driver (device-agnostic): runs the radix-select passes through a CPU or CUDA backend and
// does the small per-segment bookkeeping (digit choice, tie offsets) on the host between passes.
#include <torch/library.h>

#include <algorithm>

#include "topk_mask.h"

namespace unlearn_engine {
namespace {

constexpr int64_t kSelectNone = int64_t{1} << 40;  // a threshold above every key

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
  const MaskBackend backend = device.is_cuda() ? cuda_mask_backend() : cpu_mask_backend();
#else
  const MaskBackend backend = cpu_mask_backend();
#endif
  std::vector<at::Tensor> bits;
  for (int64_t n : lengths) bits.push_back(at::zeros({(n + 7) / 8}, tensors[0].options().dtype(at::kByte)));
  if (items.size() == 0) return bits;

  std::vector<int64_t> item_segment(items.size());
  for (int64_t i = 0; i < items.size(); ++i) item_segment[i] = per_tensor ? items.tensor[i] : 0;
  if (!device.is_cuda() && topk_mask_cpu_two_pass(tensors, items, item_segment, std::vector<int64_t>(k.begin(), k.end()), bits))
    return bits;
  const at::Tensor segments = device_vector(item_segment, device);

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
      int64_t above = 0;
      for (int digit = 255; digit >= 0; --digit) {
        const int64_t c = counts[s * 256 + digit];
        if (above + c >= remaining[s]) {
          prefix[s] = (prefix[s] << 8) | digit;
          remaining[s] -= above;
          break;
        }
        above += c;
      }
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
