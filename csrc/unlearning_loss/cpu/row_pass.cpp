// CPU row pass: rows in parallel (OpenMP through at::parallel_for), fp32 math per row.
//
// The per-row loops are written in fixed 16-lane blocks with a branch-free exp so the compiler
// vectorises them, and are compiled for AVX-512, AVX2 and baseline x86-64 (picked at load time).
// Half and bfloat16 rows are widened into a per-thread fp32 buffer first.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <cstring>
#include <limits>
#include <vector>

#include "../row_pass.h"
#include "common/dispatch.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define UE_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define UE_MULTIVERSION
#endif

namespace unlearn_engine {
namespace {

constexpr int kLanes = 16;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// exp(x) to ~2 ulp for x in [-87, 88]: 2^n * p(r), n = round(x / ln 2), |r| <= ln2 / 2. Branch-free so it
// vectorises; inputs below -87.3 (including -inf, a banned token) give exactly 0.
inline float exp_fast(float x_in) {
  const float x = std::min(std::max(x_in, -87.3f), 88.3f);
  const float n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round to nearest
  const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  float p = 1.f / 5040.f;
  p = p * r + 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x_in < -87.3f ? 0.f : p * scale;  // NaN stays NaN
}

// Row maximum; NaN when the row holds a NaN or a +inf (exp_fast's clamp would otherwise hide it). -inf is a
// valid logit (a bias of -inf bans a token): it is ignored unless the whole row is -inf.
UE_MULTIVERSION float row_max(const float* z, int64_t V) {
  constexpr float kMaxFinite = std::numeric_limits<float>::max();
  float lane[kLanes], check[kLanes] = {0};
  std::fill(lane, lane + kLanes, kNegInf);
  int64_t j = 0;
  for (; j + kLanes <= V; j += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      lane[l] = std::max(lane[l], z[j + l]);
      check[l] += z[j + l] <= kMaxFinite ? 0.f : 1.f;  // 1 for NaN or +inf
    }
  float m = kNegInf, bad = 0.f;
  for (int l = 0; l < kLanes; ++l) m = std::max(m, lane[l]), bad += check[l];
  for (; j < V; ++j) m = std::max(m, z[j]), bad += z[j] <= kMaxFinite ? 0.f : 1.f;
  return bad > 0.f ? std::numeric_limits<float>::quiet_NaN() : m;
}

// sum_j exp(z_j - m) and, when w is given, sum_j exp(z_j - m) * (z_j - w_j), where a z_j of -inf contributes 0
// (a token the reference bans carries no KL mass, whatever the model's logit for it).
UE_MULTIVERSION void row_exp_sums(const float* z, const float* w, int64_t V, float m, float* sum, float* weighted) {
  float s[kLanes] = {0}, t[kLanes] = {0};
  int64_t j = 0;
  if (w) {
    for (; j + kLanes <= V; j += kLanes)
      for (int l = 0; l < kLanes; ++l) {
        const float e = exp_fast(z[j + l] - m);
        s[l] += e;
        t[l] += z[j + l] == kNegInf ? 0.f : e * (z[j + l] - w[j + l]);
      }
  } else {
    for (; j + kLanes <= V; j += kLanes)
      for (int l = 0; l < kLanes; ++l) s[l] += exp_fast(z[j + l] - m);
  }
  float total = 0.f, total_w = 0.f;
  for (int l = 0; l < kLanes; ++l) total += s[l], total_w += t[l];
  for (; j < V; ++j) {
    const float e = exp_fast(z[j] - m);
    total += e;
    if (w && z[j] != kNegInf) total_w += e * (z[j] - w[j]);
  }
  *sum = total;
  if (weighted) *weighted = total_w;
}

// g_j = (ck - ca) p_j - ck q_j, p = exp(z - lse), q = exp(r - lse_q) (q = 0 without r).
UE_MULTIVERSION void row_gradient(const float* z, const float* r, int64_t V, float lse, float lse_q, float ca, float ck,
                                  float* g) {
  if (r) {
    for (int64_t j = 0; j < V; ++j) g[j] = (ck - ca) * exp_fast(z[j] - lse) - ck * exp_fast(r[j] - lse_q);
  } else {
    for (int64_t j = 0; j < V; ++j) g[j] = -ca * exp_fast(z[j] - lse);
  }
}

float logsumexp(const float* z, int64_t V) {
  const float m = row_max(z, V);
  if (!std::isfinite(m)) return m;  // NaN: a NaN or +inf logit (the caller's checks report it); -inf: all banned
  float s;
  row_exp_sums(z, nullptr, V, m, &s, nullptr);
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
  constexpr bool is_float = std::is_same_v<T, float>;

  at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> z_buf(is_float ? 0 : V), r_buf(is_float || !ref ? 0 : V);
    for (int64_t c = begin; c < end; ++c) {
      T* z_row = logits + c * V;
      const T* r_row = ref ? ref + c * V : nullptr;
      float* z = reinterpret_cast<float*>(z_row);
      const float* r = reinterpret_cast<const float*>(r_row);
      if constexpr (!is_float) {
        std::copy(z_row, z_row + V, z_buf.begin());
        z = z_buf.data();
        if (r_row) {
          std::copy(r_row, r_row + V, r_buf.begin());
          r = r_buf.data();
        }
      }
      const int64_t y = labels[c];
      const bool label_ok = y >= 0 && y < V;
      const float lse = logsumexp(z, V);
      logp[c] = label_ok ? z[y] - lse : std::numeric_limits<float>::quiet_NaN();
      float lse_q = 0.f;
      if (r) {
        // KL(q || p) = sum_j q_j (r_j - z_j) + lse_p - lse_q
        const float m_q = row_max(r, V);
        float s_q, t_q;
        row_exp_sums(r, z, V, m_q, &s_q, &t_q);
        lse_q = m_q + std::log(s_q);
        kl[c] = t_q / s_q + lse - lse_q;
      }
      if (coef_logp) {
        const float ca = coef_logp[c], ck = coef_kl ? coef_kl[c] : 0.f;
        row_gradient(z, r, V, lse, lse_q, ca, ck, z);  // in place over the fp32 row
        if (label_ok) z[y] += ca;
        if constexpr (!is_float) std::copy(z, z + V, z_row);
      }
    }
  });
}

}  // namespace

void row_pass_cpu(const RowPass& args) {
  UE_DISPATCH_FLOAT_HALF_BF16_DOUBLE(args.logits.scalar_type(), "row_pass_cpu",
                                  [&] { row_pass_typed<scalar_t>(args); });
}

}  // namespace unlearn_engine
