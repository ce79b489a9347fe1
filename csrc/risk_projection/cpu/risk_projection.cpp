// Risk projection on CPU: rows in parallel, one read and (if changed) one write of each row.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../risk_projection.h"
#include "common/dispatch.h"

namespace unlearn_engine {
namespace {

// The kernels index select[i] as a flat array: a strided view (sel[:, 0]) must be made contiguous first.
c10::optional<at::Tensor> contiguous_select(const c10::optional<at::Tensor>& select) {
  return select ? c10::optional<at::Tensor>(select->contiguous()) : c10::nullopt;
}

template <typename T>
void project_rows(const at::Tensor& x, T* out, const at::Tensor& basis, const c10::optional<at::Tensor>& select,
                  int64_t mode, float threshold, float strength, bool apply, float* scores) {
  const int64_t R = x.size(0), H = x.size(1);
  const int J = static_cast<int>(basis.size(1));
  const T* in = x.data_ptr<T>();
  const float* A = basis.data_ptr<float>();
  const bool* sel = select ? select->data_ptr<bool>() : nullptr;  // contiguous: see contiguous_select
  at::parallel_for(0, R, 16, [&](int64_t begin, int64_t end) {
    float c[kMaxBasis], w[kMaxBasis];
    for (int64_t i = begin; i < end; ++i) {
      const T* row = in + i * H;
      for (int j = 0; j < J; ++j) c[j] = 0.f;
      float norm2 = 0.f;
      for (int64_t h = 0; h < H; ++h) {
        const float v = static_cast<float>(row[h]);
        norm2 += v * v;
        const float* a = A + h * J;
        for (int j = 0; j < J; ++j) c[j] += v * a[j];
      }
      const bool changed = risk_weights(c, J, norm2, mode, threshold, strength, sel ? int(sel[i]) : -1, &scores[i], w);
      if (!apply) continue;
      T* dst = out + i * H;
      if (!changed) {
        if (dst != row) std::copy(row, row + H, dst);
        continue;
      }
      for (int64_t h = 0; h < H; ++h) {
        const float* a = A + h * J;
        float delta = 0.f;
        for (int j = 0; j < J; ++j) delta += a[j] * w[j];
        dst[h] = static_cast<T>(static_cast<float>(row[h]) + delta);
      }
    }
  });
}

at::Tensor risk_scores_cpu(const at::Tensor& x_in, const at::Tensor& basis_in, int64_t mode) {
  check_risk_args(x_in, basis_in, c10::nullopt);
  const auto x = x_in.contiguous(), basis = basis_in.contiguous();
  auto scores = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  UE_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "risk_scores_cpu", [&] {
    project_rows<scalar_t>(x, nullptr, basis, c10::nullopt, mode, 0.f, 0.f, false, scores.data_ptr<float>());
  });
  return scores;
}

std::tuple<at::Tensor, at::Tensor> risk_project_rows_cpu(const at::Tensor& x_in, const at::Tensor& basis_in,
                                                         const c10::optional<at::Tensor>& select, int64_t mode,
                                                         double threshold, double strength) {
  check_risk_args(x_in, basis_in, select);
  const auto x = x_in.contiguous(), basis = basis_in.contiguous();
  const auto sel = contiguous_select(select);
  auto out = at::empty_like(x);
  auto scores = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  UE_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "risk_project_rows_cpu", [&] {
    project_rows<scalar_t>(x, out.data_ptr<scalar_t>(), basis, sel, mode, threshold, strength, true,
                           scores.data_ptr<float>());
  });
  return {out, scores};
}

at::Tensor risk_project_rows_inplace_cpu(at::Tensor& x, const at::Tensor& basis_in,
                                         const c10::optional<at::Tensor>& select, int64_t mode, double threshold,
                                         double strength) {
  check_risk_args(x, basis_in, select);
  TORCH_CHECK(x.is_contiguous(), "x must be contiguous for the in-place risk projection");
  const auto basis = basis_in.contiguous();
  const auto sel = contiguous_select(select);
  auto scores = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  UE_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "risk_project_rows_inplace_cpu", [&] {
    project_rows<scalar_t>(x, x.data_ptr<scalar_t>(), basis, sel, mode, threshold, strength, true,
                           scores.data_ptr<float>());
  });
  return scores;
}

}  // namespace

TORCH_LIBRARY_IMPL(unlearn_engine, CPU, m) {
  m.impl("risk_scores", &risk_scores_cpu);
  m.impl("risk_project_rows", &risk_project_rows_cpu);
  m.impl("risk_project_rows_", &risk_project_rows_inplace_cpu);
}

}  // namespace unlearn_engine
