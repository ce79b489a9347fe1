// Visual-token risk projection (RAI), one fused pass per token row.
//
// basis A (H, J) fp32. For a row x:  c_j = sum_h x_h A[h, j],  n2 = ||x||^2.
//   subspace mode  (A = U, orthonormal):      score = ||c||^2 / n2;  selected rows: x += strength * A c
//   prototype mode (A = P^T, unit columns):   cos_j = c_j / ||x||;   score = max_j cos_j;
//                                             x += strength * sum_{j: cos_j > threshold} cos_j A[:, j]
// A zero row scores 0 and is never changed. With `select` (bool per row) given, it decides which rows
// change (subspace mode, per-sequence top fraction) instead of the threshold.
#pragma once

#include <ATen/ATen.h>

#include <cmath>

#ifdef __CUDACC__
#define UE_RISK_HD __host__ __device__
#else
#define UE_RISK_HD
#endif

namespace unlearn_engine {

constexpr int kMaxBasis = 64;  // J (rank or prototypes) handled in registers per row
enum RiskMode : int64_t { kSubspace = 0, kPrototypes = 1 };

// From the row's coefficients c[0..J) and squared norm: the score, and the update weights w[0..J)
// (x += sum_j w_j A[:, j]); returns whether the row changes.
UE_RISK_HD inline bool risk_weights(const float* c, int J, float norm2, int64_t mode, float threshold,
                                    float strength, int select, float* score, float* w) {
  bool changed = false;
  if (!(norm2 > 0.f)) {
    *score = 0.f;
    for (int j = 0; j < J; ++j) w[j] = 0.f;
    return false;
  }
  if (mode == kSubspace) {
    float proj = 0.f;
    for (int j = 0; j < J; ++j) proj += c[j] * c[j];
    *score = proj / norm2;
    changed = select >= 0 ? select != 0 : *score >= threshold;
    for (int j = 0; j < J; ++j) w[j] = changed ? strength * c[j] : 0.f;
  } else {
    const float inv_norm = 1.f / sqrtf(norm2);
    float best = -INFINITY;
    for (int j = 0; j < J; ++j) {
      const float cos = c[j] * inv_norm;
      best = fmaxf(best, cos);
      const bool on = cos > threshold;
      w[j] = on ? strength * cos : 0.f;
      changed = changed || on;
    }
    *score = J > 0 ? best : 0.f;
  }
  return changed;
}

inline void check_risk_args(const at::Tensor& x, const at::Tensor& basis, const c10::optional<at::Tensor>& select) {
  TORCH_CHECK(x.dim() == 2, "x must be 2-D (rows, H) here, got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "x must be float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(basis.dim() == 2 && basis.size(0) == x.size(1), "basis must have shape (H=", x.size(1), ", J), got ",
              basis.sizes());
  TORCH_CHECK(basis.scalar_type() == at::kFloat, "basis must be float32, got ", basis.scalar_type());
  TORCH_CHECK(basis.size(1) >= 1 && basis.size(1) <= kMaxBasis, "basis must have 1..", kMaxBasis,
              " columns (rank or prototypes), got ", basis.size(1));
  TORCH_CHECK(basis.device() == x.device(), "basis must be on ", x.device(), ", got ", basis.device());
  if (select) {
    TORCH_CHECK(select->dim() == 1 && select->size(0) == x.size(0) && select->scalar_type() == at::kBool &&
                    select->device() == x.device(),
                "select must be a bool tensor of shape (", x.size(0), ",) on ", x.device());
  }
}

}  // namespace unlearn_engine
