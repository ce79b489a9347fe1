// CPU row pass: rows in parallel (OpenMP through at::parallel_for), fp32 math per row.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>

#include "../row_pass.h"

namespace unlearn_engine {
namespace {

template <typename T>
float row_logsumexp(const T* z, int64_t V) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < V; ++j) m = std::max(m, static_cast<float>(z[j]));
  if (std::isinf(m)) return m;  // all -inf (or a +inf logit): nothing finite to normalise
  float s = 0.f;
  for (int64_t j = 0; j < V; ++j) s += std::exp(static_cast<float>(z[j]) - m);
  return m + std::log(s);
}

template <typename T>
void row_pass_typed(const RowPass& a) {
  const int64_t C = a.logits.size(0), V = a.logits.size(1);
  T* logits = a.logits.data_ptr<T>();
  const T* ref = a.ref_logits.defined() ? a.ref_logits.data_ptr<T>() : nullptr;
  const int64_t* labels = a.labels.data_ptr<int64_t>();
  const float* coef_logp = a.coef_logp.defined() ? a.coef_logp.data_ptr<float>() : nullptr;
  const float* coef_kl = a.coef_kl.defined() ? a.coef_kl.data_ptr<float>() : nullptr;
  float* logp = a.logp.data_ptr<float>();
  float* kl = a.kl.defined() ? a.kl.data_ptr<float>() : nullptr;

  at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      T* z = logits + c * V;
      const T* r = ref ? ref + c * V : nullptr;
      const int64_t y = labels[c];
      const bool label_ok = y >= 0 && y < V;
      const float lse = row_logsumexp(z, V);
      logp[c] = label_ok ? static_cast<float>(z[y]) - lse : std::numeric_limits<float>::quiet_NaN();
      float lse_q = 0.f;
      if (r) {
        lse_q = row_logsumexp(r, V);
        // KL(q || p) = sum_j q_j (r_j - z_j) + lse_p - lse_q
        float acc = 0.f;
        for (int64_t j = 0; j < V; ++j) {
          const float rj = static_cast<float>(r[j]);
          acc += std::exp(rj - lse_q) * (rj - static_cast<float>(z[j]));
        }
        kl[c] = acc + lse - lse_q;
      }
      if (coef_logp) {
        const float ca = coef_logp[c];
        const float ck = coef_kl ? coef_kl[c] : 0.f;
        for (int64_t j = 0; j < V; ++j) {
          const float p = std::exp(static_cast<float>(z[j]) - lse);
          const float q = r ? std::exp(static_cast<float>(r[j]) - lse_q) : 0.f;
          const float g = (ck - ca) * p - ck * q;
          z[j] = static_cast<T>(j == y ? g + ca : g);
        }
      }
    }
  });
}

}  // namespace

void row_pass_cpu(const RowPass& args) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.logits.scalar_type(), "row_pass_cpu",
                                  [&] { row_pass_typed<scalar_t>(args); });
}

}  // namespace unlearn_engine
