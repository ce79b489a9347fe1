// RMU loss on CPU: one parallel pass for the loss, one for the gradients.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../rmu.h"
#include "common/dispatch.h"

namespace unlearn_engine {
namespace {

// sum over rows of (a_row - b_row)^2, b broadcast along rows when b_is_row.
template <typename T>
double sum_sq_diff(const T* a, const T* b, int64_t rows, int64_t H, bool b_is_row) {
  return at::parallel_reduce(
      0, rows, 1, 0.0,
      [&](int64_t begin, int64_t end, double acc) {
        for (int64_t i = begin; i < end; ++i) {
          const T* bi = b_is_row ? b : b + i * H;
          for (int64_t j = 0; j < H; ++j) {
            const double d = static_cast<double>(a[i * H + j]) - static_cast<double>(bi[j]);
            acc += d * d;
          }
        }
        return acc;
      },
      std::plus<double>());
}

at::Tensor rmu_loss_cpu(const at::Tensor& forget_act, const at::Tensor& control, const at::Tensor& retain_act,
                        const at::Tensor& retain_ref, double alpha) {
  check_rmu_args(forget_act, control, retain_act, retain_ref);
  const auto f = forget_act.contiguous(), c = control.contiguous();
  const auto r = retain_act.contiguous(), rr = retain_ref.contiguous();
  double loss = 0.0;
  UE_DISPATCH_FLOAT_HALF_BF16_DOUBLE(f.scalar_type(), "rmu_loss_cpu", [&] {
    const int64_t H = f.size(1);
    loss = mean_scale(f) * sum_sq_diff(f.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(), f.size(0), H, true) +
           alpha * mean_scale(r) * sum_sq_diff(r.data_ptr<scalar_t>(), rr.data_ptr<scalar_t>(), r.size(0), H, false);
  });
  return at::scalar_tensor(loss, f.options().dtype(at::kFloat));
}

std::tuple<at::Tensor, at::Tensor> rmu_loss_backward_cpu(const at::Tensor& grad, const at::Tensor& forget_act,
                                                         const at::Tensor& control, const at::Tensor& retain_act,
                                                         const at::Tensor& retain_ref, double alpha) {
  check_rmu_args(forget_act, control, retain_act, retain_ref);
  const auto f = forget_act.contiguous(), c = control.contiguous();
  const auto r = retain_act.contiguous(), rr = retain_ref.contiguous();
  auto gf = at::empty_like(f), gr = at::empty_like(r);
  const float g = grad.item<float>();
  const float sf = static_cast<float>(2.0 * mean_scale(f)) * g;
  const float sr = static_cast<float>(2.0 * alpha * mean_scale(r)) * g;
  UE_DISPATCH_FLOAT_HALF_BF16_DOUBLE(f.scalar_type(), "rmu_loss_backward_cpu", [&] {
    const int64_t H = f.size(1);
    const scalar_t *fp = f.data_ptr<scalar_t>(), *cp = c.data_ptr<scalar_t>();
    const scalar_t *rp = r.data_ptr<scalar_t>(), *rrp = rr.data_ptr<scalar_t>();
    scalar_t *gfp = gf.data_ptr<scalar_t>(), *grp = gr.data_ptr<scalar_t>();
    at::parallel_for(0, f.numel(), 4096, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i)
        gfp[i] = static_cast<scalar_t>(sf * (static_cast<float>(fp[i]) - static_cast<float>(cp[i % H])));
    });
    at::parallel_for(0, r.numel(), 4096, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i)
        grp[i] = static_cast<scalar_t>(sr * (static_cast<float>(rp[i]) - static_cast<float>(rrp[i])));
    });
  });
  return {gf, gr};
}

}  // namespace

TORCH_LIBRARY_IMPL(unlearn_engine, CPU, m) {
  m.impl("rmu_loss", &rmu_loss_cpu);
  m.impl("rmu_loss_backward", &rmu_loss_backward_cpu);
}

}  // namespace unlearn_engine
