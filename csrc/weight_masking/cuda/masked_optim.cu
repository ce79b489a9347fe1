// Masked AdamW / SGD on CUDA: one launch for all tensors, one block per work item of selected indices.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../masked_optim.h"
#include "../work_items.h"
#include "common/dispatch.h"
#include "common/launch.h"
#include "common/macros.h"

namespace unlearn_engine {
namespace {

std::vector<at::Tensor> as_vector(at::TensorList list) { return std::vector<at::Tensor>(list.begin(), list.end()); }

template <typename T>
__global__ void __launch_bounds__(kThreads) masked_adamw_kernel(const int64_t* __restrict__ items, const int64_t* __restrict__ params,
                                    const int64_t* __restrict__ grads, const int64_t* __restrict__ exp_avgs,
                                    const int64_t* __restrict__ exp_avg_sqs, const int64_t* __restrict__ indices,
                                    bool compact_state, AdamWHyper h) {
  const int64_t w = blockIdx.x, t = items[3 * w], start = items[3 * w + 1], length = items[3 * w + 2];
  T* p = reinterpret_cast<T*>(params[t]);
  const T* g = reinterpret_cast<const T*>(grads[t]);
  T* m = reinterpret_cast<T*>(exp_avgs[t]);
  T* v = reinterpret_cast<T*>(exp_avg_sqs[t]);
  const int32_t* idx = reinterpret_cast<const int32_t*>(indices[t]);
  for (int64_t j = start + threadIdx.x; j < start + length; j += blockDim.x) {
    const int64_t e = idx[j], s = compact_state ? j : e;
    adamw_element(p[e], g[e], m[s], v[s], h);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) masked_sgd_kernel(const int64_t* __restrict__ items, const int64_t* __restrict__ params,
                                  const int64_t* __restrict__ grads, const int64_t* __restrict__ buffers,
                                  const int64_t* __restrict__ indices, bool compact_state, SGDHyper h) {
  const int64_t w = blockIdx.x, t = items[3 * w], start = items[3 * w + 1], length = items[3 * w + 2];
  T* p = reinterpret_cast<T*>(params[t]);
  const T* g = reinterpret_cast<const T*>(grads[t]);
  T* buf = buffers ? reinterpret_cast<T*>(buffers[t]) : nullptr;
  const int32_t* idx = reinterpret_cast<const int32_t*>(indices[t]);
  for (int64_t j = start + threadIdx.x; j < start + length; j += blockDim.x) {
    const int64_t e = idx[j];
    sgd_element(p[e], g[e], buf ? buf + (compact_state ? j : e) : nullptr, h);
  }
}

void masked_adamw_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                       at::TensorList exp_avg_sqs, at::TensorList indices, bool compact_state, double lr,
                       double beta1, double beta2, double eps, double weight_decay, int64_t step, bool validate) {
  TORCH_CHECK(step >= 1, "step must be >= 1, got ", step);
  const auto counts = check_masked_lists(params, grads, {exp_avgs, exp_avg_sqs}, {"exp_avgs", "exp_avg_sqs"},
                                         indices, compact_state);
  if (validate) check_index_values(params, indices);
  const WorkItems items = make_work_items(counts);
  if (items.size() == 0) return;
  const auto device = params[0].device();
  const c10::cuda::CUDAGuard guard(device);
  const auto table = items.table(device);
  const auto p = pointer_table(as_vector(params), device), g = pointer_table(as_vector(grads), device);
  const auto m = pointer_table(as_vector(exp_avgs), device), v = pointer_table(as_vector(exp_avg_sqs), device);
  const auto idx = pointer_table(as_vector(indices), device);
  const AdamWHyper h = make_adamw_hyper(lr, beta1, beta2, eps, weight_decay, step);
  UE_DISPATCH_FLOAT_HALF_BF16(params[0].scalar_type(), "masked_adamw_cuda", [&] {
    UE_LAUNCH(items.size(), kThreads, 0, at::cuda::getCurrentCUDAStream(), masked_adamw_kernel<scalar_t>)(
        table.data_ptr<int64_t>(), p.data_ptr<int64_t>(), g.data_ptr<int64_t>(), m.data_ptr<int64_t>(),
        v.data_ptr<int64_t>(), idx.data_ptr<int64_t>(), compact_state, h);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void masked_sgd_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                     at::TensorList indices, bool compact_state, double lr, double momentum, double dampening,
                     double weight_decay, bool nesterov, bool first_step, bool validate) {
  const bool with_buffers = momentum != 0.0;
  const auto counts = check_sgd_lists(params, grads, momentum_buffers, indices, compact_state, momentum);
  if (validate) check_index_values(params, indices);
  const WorkItems items = make_work_items(counts);
  if (items.size() == 0) return;
  const auto device = params[0].device();
  const c10::cuda::CUDAGuard guard(device);
  const auto table = items.table(device);
  const auto p = pointer_table(as_vector(params), device), g = pointer_table(as_vector(grads), device);
  const auto idx = pointer_table(as_vector(indices), device);
  at::Tensor buf;
  if (with_buffers) buf = pointer_table(as_vector(momentum_buffers), device);
  const SGDHyper h = make_sgd_hyper(lr, momentum, dampening, weight_decay, nesterov, first_step);
  UE_DISPATCH_FLOAT_HALF_BF16(params[0].scalar_type(), "masked_sgd_cuda", [&] {
    UE_LAUNCH(items.size(), kThreads, 0, at::cuda::getCurrentCUDAStream(), masked_sgd_kernel<scalar_t>)(
        table.data_ptr<int64_t>(), p.data_ptr<int64_t>(), g.data_ptr<int64_t>(),
        with_buffers ? buf.data_ptr<int64_t>() : nullptr, idx.data_ptr<int64_t>(), compact_state, h);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(unlearn_engine, CUDA, m) {
  m.impl("masked_adamw_", &masked_adamw_cuda);
  m.impl("masked_sgd_", &masked_sgd_cuda);
}

}  // namespace unlearn_engine
