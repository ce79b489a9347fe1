// RMU loss on CUDA: a grid-stride squared-difference reduction (fixed grid, per-block partials,
// so the sum is deterministic) and an elementwise gradient kernel that reads grad_output on device.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../rmu.h"
#include "common/dispatch.h"
#include "common/launch.h"
#include "common/shared.h"
#include "common/macros.h"

namespace unlearn_engine {
namespace {

constexpr int kMaxBlocks = 1024;

template <typename T>
__global__ void __launch_bounds__(kThreads) sum_sq_diff_kernel(const T* __restrict__ a, const T* __restrict__ b, int64_t numel, int64_t H,
                                   bool b_is_row, float* __restrict__ partial) {
  UE_SHARED(float, warp_sums, [kThreads / 32]);
  float acc = 0.f;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < numel; i += (int64_t)gridDim.x * blockDim.x) {
    const float d = static_cast<float>(a[i]) - static_cast<float>(b[b_is_row ? i % H : i]);
    acc += d * d;
  }
  for (int offset = 16; offset > 0; offset >>= 1) acc += __shfl_down_sync(0xffffffff, acc, offset);
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    float s = 0.f;
    for (int w = 0; w < kThreads / 32; ++w) s += warp_sums[w];
    partial[blockIdx.x] = s;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) scaled_diff_kernel(const T* __restrict__ a, const T* __restrict__ b, int64_t numel, int64_t H,
                                   bool b_is_row, const float* __restrict__ grad, float scale, T* __restrict__ out) {
  const float s = scale * grad[0];
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < numel; i += (int64_t)gridDim.x * blockDim.x)
    out[i] = static_cast<T>(s * (static_cast<float>(a[i]) - static_cast<float>(b[b_is_row ? i % H : i])));
}

int blocks_for(int64_t numel) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(kMaxBlocks, (numel + kThreads - 1) / kThreads)));
}

at::Tensor sum_sq_diff(const at::Tensor& a, const at::Tensor& b, bool b_is_row) {
  const int blocks = blocks_for(a.numel());
  auto partial = at::zeros({blocks}, a.options().dtype(at::kFloat));
  if (a.numel() == 0) return partial.sum();
  UE_DISPATCH_FLOAT_HALF_BF16_DOUBLE(a.scalar_type(), "rmu_sum_sq_diff", [&] {
    UE_LAUNCH(blocks, kThreads, 0, at::cuda::getCurrentCUDAStream(), sum_sq_diff_kernel<scalar_t>)(
        a.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), a.numel(), a.size(1), b_is_row, partial.data_ptr<float>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return partial.sum();
}

void scaled_diff(const at::Tensor& a, const at::Tensor& b, bool b_is_row, const at::Tensor& grad, float scale,
                 at::Tensor& out) {
  if (a.numel() == 0) return;
  UE_DISPATCH_FLOAT_HALF_BF16_DOUBLE(a.scalar_type(), "rmu_scaled_diff", [&] {
    UE_LAUNCH(blocks_for(a.numel()), kThreads, 0, at::cuda::getCurrentCUDAStream(), scaled_diff_kernel<scalar_t>)(
        a.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), a.numel(), a.size(1), b_is_row, grad.data_ptr<float>(),
        scale, out.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor rmu_loss_cuda(const at::Tensor& forget_act, const at::Tensor& control, const at::Tensor& retain_act,
                         const at::Tensor& retain_ref, double alpha) {
  check_rmu_args(forget_act, control, retain_act, retain_ref);
  const c10::cuda::CUDAGuard guard(forget_act.device());
  const auto f = forget_act.contiguous(), r = retain_act.contiguous();
  return sum_sq_diff(f, control.contiguous(), true) * mean_scale(f) +
         sum_sq_diff(r, retain_ref.contiguous(), false) * (alpha * mean_scale(r));
}

std::tuple<at::Tensor, at::Tensor> rmu_loss_backward_cuda(const at::Tensor& grad, const at::Tensor& forget_act,
                                                          const at::Tensor& control, const at::Tensor& retain_act,
                                                          const at::Tensor& retain_ref, double alpha) {
  check_rmu_args(forget_act, control, retain_act, retain_ref);
  const c10::cuda::CUDAGuard guard(forget_act.device());
  const auto f = forget_act.contiguous(), r = retain_act.contiguous();
  const auto g = grad.to(at::kFloat).contiguous();
  auto gf = at::empty_like(f), gr = at::empty_like(r);
  scaled_diff(f, control.contiguous(), true, g, static_cast<float>(2.0 * mean_scale(f)), gf);
  scaled_diff(r, retain_ref.contiguous(), false, g, static_cast<float>(2.0 * alpha * mean_scale(r)), gr);
  return {gf, gr};
}

}  // namespace

TORCH_LIBRARY_IMPL(unlearn_engine, CUDA, m) {
  m.impl("rmu_loss", &rmu_loss_cuda);
  m.impl("rmu_loss_backward", &rmu_loss_backward_cuda);
}

}  // namespace unlearn_engine
