// RMU loss: mean((forget_act - control)^2) + alpha * mean((retain_act - retain_ref)^2).
// An empty group (no rows) contributes 0.
#pragma once

#include <ATen/ATen.h>

namespace unlearn_engine {

inline void check_rmu_args(const at::Tensor& forget_act, const at::Tensor& control, const at::Tensor& retain_act,
                           const at::Tensor& retain_ref) {
  TORCH_CHECK(forget_act.dim() == 2, "forget_act must be 2-D (Nf, H), got shape ", forget_act.sizes());
  const int64_t H = forget_act.size(1);
  TORCH_CHECK(control.dim() == 1 && control.size(0) == H, "control must have shape (H=", H, ",), got ",
              control.sizes());
  TORCH_CHECK(retain_act.dim() == 2 && retain_act.size(1) == H, "retain_act must have shape (Nr, H=", H,
              "), got ", retain_act.sizes());
  TORCH_CHECK(retain_ref.sizes() == retain_act.sizes(), "retain_ref must have the shape of retain_act ",
              retain_act.sizes(), ", got ", retain_ref.sizes());
  TORCH_CHECK(at::isFloatingType(forget_act.scalar_type()), "forget_act must be floating point");
  for (const auto* t : {&control, &retain_act, &retain_ref}) {
    TORCH_CHECK(t->scalar_type() == forget_act.scalar_type(), "rmu_loss inputs must share forget_act's dtype ",
                forget_act.scalar_type(), ", got ", t->scalar_type());
    TORCH_CHECK(t->device() == forget_act.device(), "rmu_loss inputs must share forget_act's device ",
                forget_act.device(), ", got ", t->device());
  }
}

// Scale of each squared-error term's mean; 0 for an empty group.
inline double mean_scale(const at::Tensor& t) { return t.numel() == 0 ? 0.0 : 1.0 / static_cast<double>(t.numel()); }

}  // namespace unlearn_engine
