// The per-row pass of the fused linear + log-likelihood op, shared by the CPU and CUDA kernels.
//
// For each row c of a chunk of logits z (C x V), with label y_c and optional reference logits r:
//   lse_c   = logsumexp(z_c)
//   logp_c  = z_c[y_c] - lse_c                         (NaN when y_c is outside [0, V))
//   kl_c    = KL(softmax(r_c) || softmax(z_c))          (only with reference logits)
// and, when coefficients a (coef_logp) and k (coef_kl) are given, the logit gradient of
//   a_c * logp_c + k_c * kl_c
// is written over z in place:  dz = a (onehot(y) - p) + k (p - q),  p = softmax(z), q = softmax(r).
#pragma once

#include <ATen/ATen.h>

namespace unlearn_engine {

struct RowPass {
  at::Tensor logits;      // (C, V): row-major for CUDA, column-major (strides (1, >= C)) on the CPU; overwritten
                          // with the gradient when coef_logp is defined
  at::Tensor ref_logits;  // (C, V) or undefined
  at::Tensor labels;      // (C,) int64
  at::Tensor coef_logp;   // (C,) float32 or undefined (no gradient wanted)
  at::Tensor coef_kl;     // (C,) float32 or undefined
  at::Tensor logp;        // (C,) float32 output
  at::Tensor kl;          // (C,) float32 output, or undefined
};

void row_pass_cpu(const RowPass& args);
#ifdef WITH_CUDA
void row_pass_cuda(const RowPass& args);
#endif

}  // namespace unlearn_engine
