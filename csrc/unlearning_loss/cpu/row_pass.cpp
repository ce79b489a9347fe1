// CPU row pass over a chunk of logits stored column-major: element (c, v) of the (C, V) chunk sits at z[v * ld + c]
// (the driver makes z^T = W h^T, the GEMM layout MKL runs fastest; fused_logprob.cpp says why). Every loop runs
// along a vocabulary row, over the chunk's C tokens, contiguous in memory: the hardware prefetcher streams it and
// the compiler vectorises it. The vocabulary is split into one range per thread (OpenMP through at::parallel_for):
//   1. per range and token, a running max and sum of exp (online, per tile of kTileRows rows), and for KL the
//      reference's; the ranges combine into each token's log-sum-exp (and KL);
//   2. per range, the logit gradient written over the logits; then the label entries.
// Two passes over the chunk's memory in all. fp32 math per token; half, bfloat16 and double tiles are widened into a
// per-range fp32 buffer (and the gradient rounded once on the way back).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
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

// Rows folded at a time: a tile (kTileRows x C fp32) stays in L1/L2 between its max and its sum, and the running
// sums are rescaled once per tile. Each tile's terms are summed apart first (two-level summation: a sum over V
// carries the rounding of ~kTileRows + V / kTileRows terms, not V).
constexpr int64_t kTileRows = 16;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

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

// The running per-token state of one vocabulary range: max m, sum s of exp(z - m), and (KL, folding the reference
// with w = the model's logits) t = sum of exp(z - m) (z - w); bad counts NaN and +inf logits.
struct Running {
  std::vector<float> m, s, t, bad;
  explicit Running(int64_t C) : m(C, kNegInf), s(C, 0.f), t(C, 0.f), bad(C, 0.f) {}
};

// Folds `rows` vocabulary rows (row v at z + v * ldz, C tokens each) into the running state. -inf is a valid logit
// (a bias of -inf bans a token): it adds nothing, and to the KL sum nothing either (a token the reference bans carries
// no KL mass, whatever the model's logit for it). scratch: 3 C floats.
UE_MULTIVERSION void fold_tile(const float* z, int64_t ldz, const float* w, int64_t ldw, int64_t rows, int64_t C,
                               float* m, float* s, float* t, float* bad, float* scratch) {
  constexpr float kMaxFinite = std::numeric_limits<float>::max();
  float* tile_max = scratch;
  float* tile_s = scratch + C;
  float* tile_t = scratch + 2 * C;
  for (int64_t c = 0; c < C; ++c) tile_max[c] = kNegInf, tile_s[c] = 0.f, tile_t[c] = 0.f;
  for (int64_t v = 0; v < rows; ++v) {
    const float* zr = z + v * ldz;
    for (int64_t c = 0; c < C; ++c) {
      tile_max[c] = std::max(tile_max[c], zr[c]);
      bad[c] += zr[c] <= kMaxFinite ? 0.f : 1.f;  // 1 for NaN or +inf
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    const float m_new = std::max(m[c], tile_max[c]);
    const float rescale = m[c] == kNegInf ? 0.f : exp_fast(m[c] - m_new);  // s = t = 0 while m is -inf
    s[c] *= rescale;
    t[c] *= rescale;
    m[c] = m_new;
  }
  if (w) {
    for (int64_t v = 0; v < rows; ++v) {
      const float* zr = z + v * ldz;
      const float* wr = w + v * ldw;
      for (int64_t c = 0; c < C; ++c) {
        const float e = zr[c] == kNegInf ? 0.f : exp_fast(zr[c] - m[c]);
        tile_s[c] += e;
        tile_t[c] += zr[c] == kNegInf ? 0.f : e * (zr[c] - wr[c]);
      }
    }
  } else {
    for (int64_t v = 0; v < rows; ++v) {
      const float* zr = z + v * ldz;
      for (int64_t c = 0; c < C; ++c) tile_s[c] += zr[c] == kNegInf ? 0.f : exp_fast(zr[c] - m[c]);
    }
  }
  for (int64_t c = 0; c < C; ++c) s[c] += tile_s[c], t[c] += tile_t[c];
}

// In place over `rows` vocabulary rows: g = (ck - ca) p - ck q, p = exp(z - lse), q = exp(r - lse_q) (no r: q = 0).
UE_MULTIVERSION void gradient_tile(float* z, int64_t ldz, const float* r, int64_t ldr, int64_t rows, int64_t C,
                                   const float* lse, const float* lse_q, const float* ca, const float* ck) {
  for (int64_t v = 0; v < rows; ++v) {
    float* zr = z + v * ldz;
    if (r) {
      const float* rr = r + v * ldr;
      for (int64_t c = 0; c < C; ++c)
        zr[c] = (ck[c] - ca[c]) * exp_fast(zr[c] - lse[c]) - ck[c] * exp_fast(rr[c] - lse_q[c]);
    } else {
      for (int64_t c = 0; c < C; ++c) zr[c] = -ca[c] * exp_fast(zr[c] - lse[c]);
    }
  }
}

// The combined state of all ranges, per token: (max, sum, t) rescaled to the overall max. A token with a NaN or
// +inf logit gets max NaN (then its log-sum-exp, log-likelihood, KL and gradient are NaN, for the caller's checks).
void combine(const std::vector<Running>& parts, int64_t C, float* m, float* s, float* t) {
  for (int64_t c = 0; c < C; ++c) {
    float mc = kNegInf, bad = 0.f;
    for (const Running& p : parts) mc = std::max(mc, p.m[c]), bad += p.bad[c];
    float sc = 0.f, tc = 0.f;
    for (const Running& p : parts) {
      const float f = std::exp(p.m[c] - mc);  // a range of banned tokens only (m -inf) has s = t = 0: adds 0
      sc += p.s[c] * f;
      tc += p.t[c] * f;
    }
    m[c] = bad > 0.f ? kNaN : mc;
    s[c] = sc;
    t[c] = tc;
  }
}

// A tile of `rows` rows from v0 as fp32: the chunk itself for fp32, else widened into buf (ld C).
template <typename T>
const float* fp32_tile(const T* src, int64_t ld, int64_t v0, int64_t rows, int64_t C, std::vector<float>& buf,
                       int64_t* ld_out) {
  if constexpr (std::is_same_v<T, float>) {
    *ld_out = ld;
    return src + v0 * ld;
  } else {
    buf.resize(rows * C);
    for (int64_t v = 0; v < rows; ++v)
      for (int64_t c = 0; c < C; ++c) buf[v * C + c] = static_cast<float>(src[(v0 + v) * ld + c]);
    *ld_out = C;
    return buf.data();
  }
}

template <typename T>
void row_pass_typed(const RowPass& a) {
  const int64_t C = a.logits.size(0), V = a.logits.size(1);
  T* logits = a.logits.data_ptr<T>();
  const T* ref = a.ref_logits.defined() ? a.ref_logits.data_ptr<T>() : nullptr;
  const int64_t ld = a.logits.stride(1), ld_ref = ref ? a.ref_logits.stride(1) : 0;
  const int64_t* labels = a.labels.data_ptr<int64_t>();
  constexpr bool is_float = std::is_same_v<T, float>;

  // One vocabulary range per thread (at least a tile each).
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t span = std::max(kTileRows, (V + threads - 1) / threads);
  const int64_t n_ranges = std::max<int64_t>(1, (V + span - 1) / span);
  auto for_each_tile = [&](auto&& body) {  // body(v0, rows, range) over every tile, ranges in parallel
    at::parallel_for(0, n_ranges, 1, [&](int64_t begin, int64_t end) {
      for (int64_t range = begin; range < end; ++range)
        for (int64_t v0 = range * span; v0 < std::min(V, (range + 1) * span); v0 += kTileRows)
          body(v0, std::min(kTileRows, std::min(V, (range + 1) * span) - v0), range);
    });
  };

  // 1. Log-sum-exp (and the reference's, and the KL numerator) per token.
  std::vector<Running> model(n_ranges, Running(C)), reference(ref ? n_ranges : 0, Running(C));
  for_each_tile([&](int64_t v0, int64_t rows, int64_t range) {
    thread_local std::vector<float> z_buf, r_buf, scratch;
    scratch.resize(3 * C);
    int64_t ldz, ldr;
    const float* z = fp32_tile(logits, ld, v0, rows, C, z_buf, &ldz);
    Running& p = model[range];
    fold_tile(z, ldz, nullptr, 0, rows, C, p.m.data(), p.s.data(), p.t.data(), p.bad.data(), scratch.data());
    if (ref) {
      const float* r = fp32_tile(ref, ld_ref, v0, rows, C, r_buf, &ldr);
      Running& q = reference[range];
      fold_tile(r, ldr, z, ldz, rows, C, q.m.data(), q.s.data(), q.t.data(), q.bad.data(), scratch.data());
    }
  });
  std::vector<float> m(C), s(C), t(C), lse(C), lse_q(C, 0.f);
  combine(model, C, m.data(), s.data(), t.data());
  for (int64_t c = 0; c < C; ++c) lse[c] = std::isfinite(m[c]) ? m[c] + std::log(s[c]) : m[c];  // -inf: all banned
  float* logp = a.logp.data_ptr<float>();
  for (int64_t c = 0; c < C; ++c) {
    const int64_t y = labels[c];
    logp[c] = y >= 0 && y < V ? static_cast<float>(logits[y * ld + c]) - lse[c] : kNaN;
  }
  if (ref) {
    // KL(q || p) = sum_v q_v (r_v - z_v) + lse_p - lse_q
    combine(reference, C, m.data(), s.data(), t.data());
    float* kl = a.kl.data_ptr<float>();
    for (int64_t c = 0; c < C; ++c) {
      lse_q[c] = m[c] + std::log(s[c]);
      kl[c] = t[c] / s[c] + lse[c] - lse_q[c];
    }
  }
  if (!a.coef_logp.defined()) return;

  // 2. The logit gradient in place; the label entries add ca (in fp32 before rounding, for a narrow dtype).
  std::vector<float> ca(a.coef_logp.data_ptr<float>(), a.coef_logp.data_ptr<float>() + C), ck(C, 0.f);
  if (a.coef_kl.defined()) std::copy(a.coef_kl.data_ptr<float>(), a.coef_kl.data_ptr<float>() + C, ck.begin());
  for_each_tile([&](int64_t v0, int64_t rows, int64_t) {
    thread_local std::vector<float> z_buf, r_buf;
    int64_t ldz, ldr = 0;
    float* z = const_cast<float*>(fp32_tile(logits, ld, v0, rows, C, z_buf, &ldz));
    const float* r = ref ? fp32_tile(ref, ld_ref, v0, rows, C, r_buf, &ldr) : nullptr;
    gradient_tile(z, ldz, r, ldr, rows, C, lse.data(), lse_q.data(), ca.data(), ck.data());
    if constexpr (!is_float) {
      for (int64_t c = 0; c < C; ++c)
        if (labels[c] >= v0 && labels[c] < v0 + rows) z[(labels[c] - v0) * ldz + c] += ca[c];
      for (int64_t v = 0; v < rows; ++v)
        for (int64_t c = 0; c < C; ++c) logits[(v0 + v) * ld + c] = static_cast<T>(z[v * ldz + c]);
    }
  });
  if constexpr (is_float) {
    for (int64_t c = 0; c < C; ++c)
      if (labels[c] >= 0 && labels[c] < V) logits[labels[c] * ld + c] += ca[c];
  }
}

// (C, V) logits (and reference logits) whose tokens are contiguous: stride 1 along C.
void check_column_major(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2 && (t.stride(0) == 1 || t.size(0) == 1) && t.stride(1) >= t.size(0),
              "row_pass_cpu: ", name, " must be a column-major (C, V) chunk (strides (1, >= C)), got strides ",
              t.strides());
}

}  // namespace

void row_pass_cpu(const RowPass& args) {
  check_column_major(args.logits, "logits");
  if (args.ref_logits.defined()) check_column_major(args.ref_logits, "ref_logits");
  UE_DISPATCH_FLOAT_HALF_BF16_DOUBLE(args.logits.scalar_type(), "row_pass_cpu",
                                  [&] { row_pass_typed<scalar_t>(args); });
}

}  // namespace unlearn_engine
