// Risk projection on CUDA: one block per row. Threads stride over H accumulating the J coefficients and
// the squared norm in registers; a block reduction gives the row's weights; a second sweep over the
// (L1/L2-resident) row writes x + A w. J is bucketed at compile time (16 / 32 / 64) to stay in registers.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../risk_projection.h"
#include "common/dispatch.h"
#include "common/launch.h"
#include "common/shared.h"
#include "common/macros.h"

namespace unlearn_engine {
namespace {

// The kernel indexes select[i] as a flat array: a strided view (sel[:, 0]) must be made contiguous first.
c10::optional<at::Tensor> contiguous_select(const c10::optional<at::Tensor>& select) {
  return select ? c10::optional<at::Tensor>(select->contiguous()) : c10::nullopt;
}

// `in` and `out` are the same buffer for the in-place op, so neither is __restrict__.
template <typename T, int JMAX>
__global__ void __launch_bounds__(kThreads)
risk_rows_kernel(const T* in, T* out, const float* __restrict__ A, int64_t H, int J, const bool* __restrict__ select,
                 int64_t mode, float threshold, float strength, float* __restrict__ scores) {
  UE_SHARED(float, partial, [kThreads / 32][JMAX + 1]);
  UE_SHARED(float, coef, [JMAX + 1]);  // the row's coefficients c_j, then its squared norm
  UE_SHARED(float, w, [JMAX]);
  UE_SHARED(int, changed);
  const int64_t i = blockIdx.x;
  const T* row = in + i * H;
  float acc[JMAX + 1];
#pragma unroll
  for (int j = 0; j <= JMAX; ++j) acc[j] = 0.f;
  for (int64_t h = threadIdx.x; h < H; h += blockDim.x) {
    const float v = static_cast<float>(row[h]);
    acc[JMAX] += v * v;
    const float* a = A + h * J;
#pragma unroll
    for (int j = 0; j < JMAX; ++j)
      if (j < J) acc[j] += v * a[j];
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int j = 0; j <= JMAX; ++j) {
    float v = acc[j];
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffff, v, offset);
    if (lane == 0) partial[warp][j] = v;
  }
  __syncthreads();
  for (int j = threadIdx.x; j <= JMAX; j += blockDim.x) {
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < kThreads / 32; ++k) s += partial[k][j];
    coef[j] = s;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    // reads coef and writes w in shared memory: no per-thread arrays indexed at run time (no stack frame)
    changed = risk_weights(coef, J, coef[JMAX], mode, threshold, strength, select ? int(select[i]) : -1,
                           &scores[i], w);
  }
  __syncthreads();
  if (!out) return;
  T* dst = out + i * H;
  if (!changed) {
    if (dst != row)
      for (int64_t h = threadIdx.x; h < H; h += blockDim.x) dst[h] = row[h];
    return;
  }
  for (int64_t h = threadIdx.x; h < H; h += blockDim.x) {
    const float* a = A + h * J;
    float delta = 0.f;
#pragma unroll
    for (int j = 0; j < JMAX; ++j)
      if (j < J) delta += a[j] * w[j];
    dst[h] = static_cast<T>(static_cast<float>(row[h]) + delta);
  }
}

template <typename T, int JMAX>
void launch_bucket(const at::Tensor& x, T* out, const at::Tensor& basis, const c10::optional<at::Tensor>& select,
                   int64_t mode, float threshold, float strength, float* scores) {
  UE_LAUNCH(x.size(0), kThreads, 0, at::cuda::getCurrentCUDAStream(), risk_rows_kernel<T, JMAX>)(
      x.data_ptr<T>(), out, basis.data_ptr<float>(), x.size(1), static_cast<int>(basis.size(1)),
      select ? select->data_ptr<bool>() : nullptr, mode, threshold, strength, scores);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch(const at::Tensor& x, T* out, const at::Tensor& basis, const c10::optional<at::Tensor>& select,
            int64_t mode, float threshold, float strength, float* scores) {
  if (x.size(0) == 0) return;
  const int64_t J = basis.size(1);
  if (J <= 16) launch_bucket<T, 16>(x, out, basis, select, mode, threshold, strength, scores);
  else if (J <= 32) launch_bucket<T, 32>(x, out, basis, select, mode, threshold, strength, scores);
  else launch_bucket<T, 64>(x, out, basis, select, mode, threshold, strength, scores);
}

at::Tensor risk_scores_cuda(const at::Tensor& x_in, const at::Tensor& basis_in, int64_t mode) {
  check_risk_args(x_in, basis_in, c10::nullopt);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto x = x_in.contiguous(), basis = basis_in.contiguous();
  auto scores = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  UE_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "risk_scores_cuda", [&] {
    launch<scalar_t>(x, nullptr, basis, c10::nullopt, mode, 0.f, 0.f, scores.data_ptr<float>());
  });
  return scores;
}

std::tuple<at::Tensor, at::Tensor> risk_project_rows_cuda(const at::Tensor& x_in, const at::Tensor& basis_in,
                                                          const c10::optional<at::Tensor>& select, int64_t mode,
                                                          double threshold, double strength) {
  check_risk_args(x_in, basis_in, select);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto x = x_in.contiguous(), basis = basis_in.contiguous();
  const auto sel = contiguous_select(select);
  auto out = at::empty_like(x);
  auto scores = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  UE_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "risk_project_rows_cuda", [&] {
    launch<scalar_t>(x, out.data_ptr<scalar_t>(), basis, sel, mode, threshold, strength, scores.data_ptr<float>());
  });
  return {out, scores};
}

at::Tensor risk_project_rows_inplace_cuda(at::Tensor& x, const at::Tensor& basis_in,
                                          const c10::optional<at::Tensor>& select, int64_t mode, double threshold,
                                          double strength) {
  check_risk_args(x, basis_in, select);
  TORCH_CHECK(x.is_contiguous(), "x must be contiguous for the in-place risk projection");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto basis = basis_in.contiguous();
  const auto sel = contiguous_select(select);
  auto scores = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  UE_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "risk_project_rows_inplace_cuda", [&] {
    launch<scalar_t>(x, x.data_ptr<scalar_t>(), basis, sel, mode, threshold, strength, scores.data_ptr<float>());
  });
  return scores;
}

}  // namespace

TORCH_LIBRARY_IMPL(unlearn_engine, CUDA, m) {
  m.impl("risk_scores", &risk_scores_cuda);
  m.impl("risk_project_rows", &risk_project_rows_cuda);
  m.impl("risk_project_rows_", &risk_project_rows_inplace_cuda);
}

}  // namespace unlearn_engine
