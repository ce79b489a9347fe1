// CUDA row pass: one block per row. One read of the row makes an online log-sum-exp (and, with
// reference logits, the KL terms); a second pass writes the logit gradient in place. fp32 math.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <cmath>

#include "../row_pass.h"
#include "common/dispatch.h"
#include "common/launch.h"
#include "common/shared.h"

namespace unlearn_engine {
namespace {

constexpr float kNegInf = -INFINITY;
constexpr int kMaxRowThreads = 512;  // the widest block row_pass_cuda launches (V >= 8192)

// Running (max, sum of exp(x - max), sum of exp(x - max) * w): merging two partial states.
struct Online {
  float m = kNegInf, s = 0.f, t = 0.f;
  __device__ void merge(float m2, float s2, float t2) {
    if (m2 == kNegInf) return;
    if (m == kNegInf) { m = m2; s = s2; t = t2; return; }
    if (m2 > m) {
      const float scale = expf(m - m2);
      s = s * scale + s2; t = t * scale + t2; m = m2;
    } else {
      const float scale = expf(m2 - m);
      s += s2 * scale; t += t2 * scale;
    }
  }
  // A +inf logit (an overflow) makes the whole row NaN, as the CPU row pass does: logp, KL and the gradient.
  __device__ float lse() const { return m == kNegInf ? kNegInf : (m == INFINITY ? NAN : m + logf(s)); }
};

__device__ Online warp_merge(Online o) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float m2 = __shfl_down_sync(0xffffffff, o.m, offset);
    const float s2 = __shfl_down_sync(0xffffffff, o.s, offset);
    const float t2 = __shfl_down_sync(0xffffffff, o.t, offset);
    o.merge(m2, s2, t2);
  }
  return o;
}

// Block-wide merge; every thread gets the result.
__device__ Online block_merge(Online o, Online* shared) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  o = warp_merge(o);
  if (lane == 0) shared[warp] = o;
  __syncthreads();
  if (warp == 0) {
    Online w = lane < warps ? shared[lane] : Online{};
    w = warp_merge(w);
    if (lane == 0) shared[32] = w;
  }
  __syncthreads();
  const Online result = shared[32];
  __syncthreads();  // shared[] may be reused by the caller's next merge
  return result;
}

template <typename T>
__global__ void __launch_bounds__(kMaxRowThreads) row_pass_kernel(T* __restrict__ logits, const T* __restrict__ ref, int64_t V,
                                const int64_t* __restrict__ labels, const float* __restrict__ coef_logp,
                                const float* __restrict__ coef_kl, float* __restrict__ logp_out,
                                float* __restrict__ kl_out) {
  UE_SHARED(Online, shared, [33]);
  const int64_t row = blockIdx.x;
  T* z = logits + row * V;
  const T* r = ref ? ref + row * V : nullptr;

  Online p, q;  // p: the model's row; q: the reference row, with t accumulating exp(r - m) * (r - z)
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
    const float zj = static_cast<float>(z[j]);
    p.merge(zj, 1.f, 0.f);
    if (r) {
      const float rj = static_cast<float>(r[j]);
      q.merge(rj, 1.f, rj - zj);
    }
  }
  p = block_merge(p, shared);
  if (r) q = block_merge(q, shared);
  const float lse = p.lse(), lse_q = r ? q.lse() : 0.f;

  const int64_t y = labels[row];
  const bool label_ok = y >= 0 && y < V;
  if (threadIdx.x == 0) {
    logp_out[row] = label_ok ? static_cast<float>(z[y]) - lse : NAN;
    if (r) kl_out[row] = q.t / q.s + lse - lse_q;
  }
  if (!coef_logp) return;
  __syncthreads();  // z[y] is read above before the row is overwritten

  const float ca = coef_logp[row];
  const float ck = coef_kl ? coef_kl[row] : 0.f;
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
    const float pj = expf(static_cast<float>(z[j]) - lse);
    const float qj = r ? expf(static_cast<float>(r[j]) - lse_q) : 0.f;
    const float g = (ck - ca) * pj - ck * qj;
    z[j] = static_cast<T>(j == y ? g + ca : g);
  }
}

}  // namespace

void row_pass_cuda(const RowPass& a) {
  const int64_t C = a.logits.size(0), V = a.logits.size(1);
  if (C == 0) return;
  const c10::cuda::CUDAGuard guard(a.logits.device());
  const int threads = V >= 8192 ? kMaxRowThreads : (V >= 1024 ? 256 : 64);
  auto stream = at::cuda::getCurrentCUDAStream();
  UE_DISPATCH_FLOAT_HALF_BF16_DOUBLE(a.logits.scalar_type(), "row_pass_cuda", [&] {
    UE_LAUNCH(C, threads, 0, stream, row_pass_kernel<scalar_t>)(
        a.logits.data_ptr<scalar_t>(),
        a.ref_logits.defined() ? a.ref_logits.data_ptr<scalar_t>() : nullptr, V,
        a.labels.data_ptr<int64_t>(),
        a.coef_logp.defined() ? a.coef_logp.data_ptr<float>() : nullptr,
        a.coef_kl.defined() ? a.coef_kl.data_ptr<float>() : nullptr,
        a.logp.data_ptr<float>(), a.kl.defined() ? a.kl.data_ptr<float>() : nullptr);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace unlearn_engine
