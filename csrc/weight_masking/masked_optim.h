// Masked optimizer steps: only the elements listed in `indices` (the set bits of a Mask, per tensor)
// are read and written, so unselected parameters and their state stay bit-for-bit untouched.
// State is dense (same shape as the parameter) or compact (one slot per selected element, in index order).
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <vector>

#include "common/macros.h"

namespace unlearn_engine {

struct AdamWHyper {
  float lr, beta1, beta2, eps, weight_decay, step_size, bias_correction2_sqrt;
};

inline AdamWHyper make_adamw_hyper(double lr, double beta1, double beta2, double eps, double weight_decay,
                                   int64_t step) {
  const double bc1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bc2 = 1.0 - std::pow(beta2, static_cast<double>(step));
  return AdamWHyper{static_cast<float>(lr), static_cast<float>(beta1), static_cast<float>(beta2),
                    static_cast<float>(eps), static_cast<float>(weight_decay), static_cast<float>(lr / bc1),
                    static_cast<float>(std::sqrt(bc2))};
}

// torch.optim.AdamW's update, per element, in fp32.
template <typename T>
UE_HOST_DEVICE inline void adamw_element(T& param, T grad, T& exp_avg, T& exp_avg_sq, const AdamWHyper& h) {
  float p = static_cast<float>(param), g = static_cast<float>(grad);
  float m = static_cast<float>(exp_avg), v = static_cast<float>(exp_avg_sq);
  p *= 1.f - h.lr * h.weight_decay;
  m += (g - m) * (1.f - h.beta1);
  v = v * h.beta2 + (1.f - h.beta2) * g * g;
  const float denom = sqrtf(v) / h.bias_correction2_sqrt + h.eps;
  p -= h.step_size * (m / denom);
  param = static_cast<T>(p);
  exp_avg = static_cast<T>(m);
  exp_avg_sq = static_cast<T>(v);
}

struct SGDHyper {
  float lr, momentum, dampening, weight_decay;
  bool nesterov, first_step;
};

// torch.optim.SGD's update, per element, in fp32 (momentum_buffer unused when momentum == 0).
template <typename T>
UE_HOST_DEVICE inline void sgd_element(T& param, T grad, T* momentum_buffer, const SGDHyper& h) {
  float p = static_cast<float>(param), g = static_cast<float>(grad);
  if (h.weight_decay != 0.f) g += h.weight_decay * p;
  if (h.momentum != 0.f) {
    float buf = h.first_step ? g : h.momentum * static_cast<float>(*momentum_buffer) + (1.f - h.dampening) * g;
    *momentum_buffer = static_cast<T>(buf);
    g = h.nesterov ? g + h.momentum * buf : buf;
  }
  param = static_cast<T>(p - h.lr * g);
}

// Checks the parallel lists and returns the per-tensor index counts.
inline std::vector<int64_t> check_masked_lists(at::TensorList params, at::TensorList grads,
                                               const std::vector<at::TensorList>& states,
                                               const std::vector<const char*>& state_names, at::TensorList indices,
                                               bool compact_state) {
  const size_t n = params.size();
  TORCH_CHECK(n > 0, "params must be a non-empty list");
  TORCH_CHECK(grads.size() == n && indices.size() == n, "params, grads and mask must have the same length (",
              n, "), got grads=", grads.size(), ", mask tensors=", indices.size());
  for (size_t s = 0; s < states.size(); ++s)
    TORCH_CHECK(states[s].size() == n, state_names[s], " must have one tensor per param (", n, "), got ",
                states[s].size());
  const auto dtype = params[0].scalar_type();
  const auto device = params[0].device();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "params must be float32, float16 or bfloat16, got ", dtype);
  std::vector<int64_t> counts;
  for (size_t i = 0; i < n; ++i) {
    const auto& p = params[i];
    TORCH_CHECK(p.scalar_type() == dtype && p.device() == device, "params[", i, "] must be ", dtype, " on ",
                device, " like params[0], got ", p.scalar_type(), " on ", p.device());
    TORCH_CHECK(p.is_contiguous(), "params[", i, "] must be contiguous");
    TORCH_CHECK(grads[i].sizes() == p.sizes() && grads[i].scalar_type() == dtype && grads[i].device() == device &&
                    grads[i].is_contiguous(),
                "grads[", i, "] must be a contiguous ", dtype, " tensor of shape ", p.sizes(), " on ", device);
    const auto& idx = indices[i];
    TORCH_CHECK(idx.dim() == 1 && idx.scalar_type() == at::kInt && idx.device() == device && idx.is_contiguous(),
                "mask indices[", i, "] must be a contiguous 1-D int32 tensor on ", device);
    const int64_t want = compact_state ? idx.numel() : p.numel();
    for (size_t s = 0; s < states.size(); ++s) {
      const auto& st = states[s][i];
      TORCH_CHECK(st.numel() == want && st.scalar_type() == dtype && st.device() == device && st.is_contiguous(),
                  state_names[s], "[", i, "] must be a contiguous ", dtype, " tensor of ", want, " elements on ",
                  device, compact_state ? " (compact state: one per selected element)" : "");
    }
    counts.push_back(idx.numel());
  }
  return counts;
}

// The raw ops' data checks (validate=True), with one device-to-host copy for all tensors: every index lies in
// [0, numel) of its parameter, and each list is strictly increasing. Sorted and duplicate-free is what Mask.indices
// gives; a duplicate would update one element twice (on CUDA, two threads racing on it).
inline void check_index_values(at::TensorList params, at::TensorList indices) {
  std::vector<at::Tensor> stats;
  const auto opts = indices[0].options().dtype(at::kLong);
  for (size_t i = 0; i < indices.size(); ++i) {
    const auto& idx = indices[i];
    if (idx.numel() == 0) {
      stats.push_back(at::zeros({3}, opts));
      continue;
    }
    const at::Tensor out_of_order = idx.numel() > 1 ? (idx.slice(0, 1) <= idx.slice(0, 0, -1)).sum().to(at::kLong)
                                                    : at::zeros({}, opts);
    stats.push_back(at::stack({idx.min().to(at::kLong), idx.max().to(at::kLong), out_of_order}));
  }
  const at::Tensor host = at::stack(stats).cpu();
  const auto s = host.accessor<int64_t, 2>();
  for (size_t i = 0; i < indices.size(); ++i) {
    if (indices[i].numel() == 0) continue;
    const int64_t numel = params[i].numel();
    TORCH_CHECK(s[i][0] >= 0 && s[i][1] < numel, "mask indices[", i, "] must lie in [0, ", numel,
                ") (the elements of params[", i, "]), got values from ", s[i][0], " to ", s[i][1]);
    if (s[i][2] == 0) continue;
    const at::Tensor idx = indices[i].cpu();
    const int32_t* v = idx.data_ptr<int32_t>();
    int64_t j = 0;
    while (v[j + 1] > v[j]) ++j;
    TORCH_CHECK(v[j + 1] != v[j], "mask indices[", i, "] holds index ", v[j], " twice (positions ", j, " and ", j + 1,
                "): each element may be selected once");
    TORCH_CHECK(false, "mask indices[", i, "] must be strictly increasing, got ", v[j], " at position ", j, " then ",
                v[j + 1]);
  }
}

// The SGD kernels' common preamble: checks (momentum buffers only when momentum != 0) and hyper-parameters.
inline std::vector<int64_t> check_sgd_lists(at::TensorList params, at::TensorList grads,
                                            at::TensorList momentum_buffers, at::TensorList indices,
                                            bool compact_state, double momentum) {
  if (momentum != 0.0)
    return check_masked_lists(params, grads, {momentum_buffers}, {"momentum_buffers"}, indices, compact_state);
  return check_masked_lists(params, grads, {}, {}, indices, compact_state);
}

inline SGDHyper make_sgd_hyper(double lr, double momentum, double dampening, double weight_decay, bool nesterov,
                               bool first_step) {
  return SGDHyper{static_cast<float>(lr), static_cast<float>(momentum), static_cast<float>(dampening),
                  static_cast<float>(weight_decay), nesterov, first_step};
}

}  // namespace unlearn_engine
