// Masked AdamW / SGD on CPU: work items over the selected indices of all tensors, in parallel.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../masked_optim.h"
#include "../work_items.h"
#include "common/dispatch.h"

namespace unlearn_engine {
namespace {

void masked_adamw_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                      at::TensorList exp_avg_sqs, at::TensorList indices, bool compact_state, double lr, double beta1,
                      double beta2, double eps, double weight_decay, int64_t step, bool validate) {
  TORCH_CHECK(step >= 1, "step must be >= 1, got ", step);
  const auto counts = check_masked_lists(params, grads, {exp_avgs, exp_avg_sqs}, {"exp_avgs", "exp_avg_sqs"},
                                         indices, compact_state);
  if (validate) check_index_values(params, indices);
  const WorkItems items = make_work_items(counts);
  const AdamWHyper h = make_adamw_hyper(lr, beta1, beta2, eps, weight_decay, step);
  UE_DISPATCH_FLOAT_HALF_BF16(params[0].scalar_type(), "masked_adamw_cpu", [&] {
    at::parallel_for(0, items.size(), 1, [&](int64_t begin, int64_t end) {
      for (int64_t w = begin; w < end; ++w) {
        const int64_t t = items.tensor[w];
        scalar_t* p = params[t].data_ptr<scalar_t>();
        const scalar_t* g = grads[t].data_ptr<scalar_t>();
        scalar_t* m = exp_avgs[t].data_ptr<scalar_t>();
        scalar_t* v = exp_avg_sqs[t].data_ptr<scalar_t>();
        const int32_t* idx = indices[t].data_ptr<int32_t>();
        for (int64_t j = items.start[w]; j < items.start[w] + items.length[w]; ++j) {
          const int64_t e = idx[j], s = compact_state ? j : e;
          adamw_element(p[e], g[e], m[s], v[s], h);
        }
      }
    });
  });
}

void masked_sgd_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                    at::TensorList indices, bool compact_state, double lr, double momentum, double dampening,
                    double weight_decay, bool nesterov, bool first_step, bool validate) {
  const bool with_buffers = momentum != 0.0;
  const auto counts = check_sgd_lists(params, grads, momentum_buffers, indices, compact_state, momentum);
  if (validate) check_index_values(params, indices);
  const WorkItems items = make_work_items(counts);
  const SGDHyper h = make_sgd_hyper(lr, momentum, dampening, weight_decay, nesterov, first_step);
  UE_DISPATCH_FLOAT_HALF_BF16(params[0].scalar_type(), "masked_sgd_cpu", [&] {
    at::parallel_for(0, items.size(), 1, [&](int64_t begin, int64_t end) {
      for (int64_t w = begin; w < end; ++w) {
        const int64_t t = items.tensor[w];
        scalar_t* p = params[t].data_ptr<scalar_t>();
        const scalar_t* g = grads[t].data_ptr<scalar_t>();
        scalar_t* buf = with_buffers ? momentum_buffers[t].data_ptr<scalar_t>() : nullptr;
        const int32_t* idx = indices[t].data_ptr<int32_t>();
        for (int64_t j = items.start[w]; j < items.start[w] + items.length[w]; ++j) {
          const int64_t e = idx[j];
          sgd_element(p[e], g[e], buf ? buf + (compact_state ? j : e) : nullptr, h);
        }
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(unlearn_engine, CPU, m) {
  m.impl("masked_adamw_", &masked_adamw_cpu);
  m.impl("masked_sgd_", &masked_sgd_cpu);
}

}  // namespace unlearn_engine
