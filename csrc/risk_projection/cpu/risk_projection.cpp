// Risk projection on CPU: rows in parallel, one read of each row and (if changed, or out of place) one write.
//
// A block of rows is read once: its squared norms, then its J coefficients (all rows of the block at once,
// the basis broadcast over rows: R x J/W vector accumulators in registers), then each row is written from
// cache, updated (x + A w, vectorised over H with the transposed basis) or copied. Out of place on large
// inputs the output is written with streaming stores (no read-for-ownership of the destination). The SIMD
// kernels (risk_rows_simd.inc) are compiled for AVX-512 and AVX2+FMA and picked at run time; other CPUs
// run the scalar loop below.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#if (defined(__x86_64__) || defined(__i386__)) && !defined(UE_NO_X86_SIMD)
#define UE_RISK_X86_SIMD 1  // AVX-512 / AVX2 kernels, picked at run time; other CPUs (e.g. aarch64) use the scalar one
#include <immintrin.h>
#endif
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "../risk_projection.h"
#include "common/dispatch.h"

namespace unlearn_engine {
namespace {

constexpr int64_t kBlockRows = 16;              // rows read together (a multiple of every kernel's R)
constexpr int64_t kStreamBytes = int64_t(8) << 20;  // out-of-place outputs at least this big bypass the cache

template <typename T>
struct RowJob {
  const T* in;
  T* out;  // nullptr: scores only; == in: in place (only changed rows are written)
  int64_t R, H;
  int J;
  const float* Ap;  // basis (H, JP), zero-padded columns (JP from the kernel's padded_cols)
  const float* At;  // basis transposed (J, H)
  const bool* sel;  // contiguous, or nullptr
  int64_t mode;
  float threshold, strength;
  bool stream;
  float* scores;
};

#ifdef UE_RISK_X86_SIMD
#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma")
namespace avx512 {
struct V {
  using T = __m512;
  static constexpr int W = 16;
  static inline T zero() { return _mm512_setzero_ps(); }
  static inline T load(const float* p) { return _mm512_loadu_ps(p); }
  static inline void store(float* p, T v) { _mm512_storeu_ps(p, v); }
  static inline void stream(float* p, T v) { _mm512_stream_ps(p, v); }
  static inline T set1(float s) { return _mm512_set1_ps(s); }
  static inline T fmadd(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  static inline T add(T a, T b) { return _mm512_add_ps(a, b); }
  static inline float sum(T v) {  // fixed order (not _mm512_reduce_add_ps: GCC 12 warns inside it)
    alignas(64) float f[16];
    _mm512_store_ps(f, v);
    float s = 0.f;
    for (int l = 0; l < 16; ++l) s += f[l];
    return s;
  }
  static inline void fence() { _mm_sfence(); }
};
#include "risk_rows_simd.inc"
}  // namespace avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
struct V {
  using T = __m256;
  static constexpr int W = 8;
  static inline T zero() { return _mm256_setzero_ps(); }
  static inline T load(const float* p) { return _mm256_loadu_ps(p); }
  static inline void store(float* p, T v) { _mm256_storeu_ps(p, v); }
  static inline void stream(float* p, T v) { _mm256_stream_ps(p, v); }  // p 32-byte aligned (64 checked)
  static inline T set1(float s) { return _mm256_set1_ps(s); }
  static inline T fmadd(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  static inline T add(T a, T b) { return _mm256_add_ps(a, b); }
  static inline float sum(T v) {
    const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    alignas(16) float f[4];
    _mm_store_ps(f, s);
    return (f[0] + f[1]) + (f[2] + f[3]);
  }
  static inline void fence() { _mm_sfence(); }
};
#include "risk_rows_simd.inc"
}  // namespace avx2
#pragma GCC pop_options
#endif  // UE_RISK_X86_SIMD

enum class Isa { kScalar, kAvx2, kAvx512 };

// The widest kernel this CPU runs; UE_RISK_CPU_ISA=avx2|scalar (read once) picks a narrower one, so that tests
// reach every kernel on one machine.
Isa cpu_isa() {
  static const Isa isa = [] {
#ifdef UE_RISK_X86_SIMD
    __builtin_cpu_init();
    const char* force = std::getenv("UE_RISK_CPU_ISA");
    const std::string want = force ? force : "";
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (want == "scalar") return Isa::kScalar;
    if (__builtin_cpu_supports("avx512f") && want != "avx2") return Isa::kAvx512;
    return avx2 ? Isa::kAvx2 : Isa::kScalar;
#else
    return Isa::kScalar;
#endif
  }();
  return isa;
}

// Any CPU: one row at a time, coefficients accumulated over h.
template <typename T>
void run_scalar(const RowJob<T>& job) {
  const int64_t H = job.H;
  const int J = job.J;
  at::parallel_for(0, job.R, 16, [&](int64_t begin, int64_t end) {
    float c[kMaxBasis], w[kMaxBasis];
    for (int64_t i = begin; i < end; ++i) {
      const T* row = job.in + i * H;
      for (int j = 0; j < J; ++j) c[j] = 0.f;
      float norm2 = 0.f;
      for (int64_t h = 0; h < H; ++h) {
        const float v = static_cast<float>(row[h]);
        norm2 += v * v;
        for (int j = 0; j < J; ++j) c[j] += v * job.At[j * H + h];
      }
      const bool changed = risk_weights(c, J, norm2, job.mode, job.threshold, job.strength,
                                        job.sel ? int(job.sel[i]) : -1, &job.scores[i], w);
      if (!job.out) continue;
      T* dst = job.out + i * H;
      if (!changed) {
        if (dst != row) std::copy(row, row + H, dst);
        continue;
      }
      for (int64_t h = 0; h < H; ++h) {
        float delta = 0.f;
        for (int j = 0; j < J; ++j) delta += job.At[j * H + h] * w[j];
        dst[h] = static_cast<T>(static_cast<float>(row[h]) + delta);
      }
    }
  });
}

// The kernels index select[i] as a flat array: a strided view (sel[:, 0]) must be made contiguous first.
c10::optional<at::Tensor> contiguous_select(const c10::optional<at::Tensor>& select) {
  return select ? c10::optional<at::Tensor>(select->contiguous()) : c10::nullopt;
}

// A fresh output like x. A large one is backed by transparent huge pages where the kernel offers them on
// request (THP "madvise" mode): first-touch faults on 4 KiB pages (each zeroed by the kernel) otherwise cost
// several times the copy itself. Best effort: madvise's failure leaves ordinary pages.
at::Tensor empty_output(const at::Tensor& x) {
  auto out = at::empty_like(x);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t p = reinterpret_cast<uintptr_t>(out.data_ptr()), n = out.nbytes();
  const uintptr_t begin = (p + kHuge - 1) & ~(kHuge - 1), end = (p + n) & ~(kHuge - 1);
  if (n >= 4 * kHuge && end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#endif
  return out;
}

// x (R, H) contiguous; out: nullptr (scores only), x's data (in place) or a fresh (R, H) buffer.
template <typename T>
void project_rows(const at::Tensor& x, T* out, const at::Tensor& basis, const c10::optional<at::Tensor>& select,
                  int64_t mode, float threshold, float strength, float* scores) {
  const int64_t R = x.size(0), H = x.size(1);
  const int J = static_cast<int>(basis.size(1));
  if (R == 0) return;
  const Isa isa = cpu_isa();
#ifdef UE_RISK_X86_SIMD
  const int JP = isa == Isa::kAvx512 ? avx512::padded_cols(J) : isa == Isa::kAvx2 ? avx2::padded_cols(J) : J;
#else
  const int JP = J;
#endif
  auto padded = at::zeros({H, JP}, basis.options());
  padded.narrow(1, 0, J).copy_(basis);
  const auto transposed = basis.t().contiguous();
  const T* in = x.data_ptr<T>();
  const bool stream = out != nullptr && out != in && R * H * int64_t(sizeof(T)) >= kStreamBytes;
  const RowJob<T> job{in, out, R, H, J, padded.data_ptr<float>(), transposed.data_ptr<float>(),
                      select ? select->data_ptr<bool>() : nullptr, mode, threshold, strength, stream, scores};
  switch (isa) {
#ifdef UE_RISK_X86_SIMD
    case Isa::kAvx512: return avx512::run(job);
    case Isa::kAvx2: return avx2::run(job);
#endif
    default: return run_scalar(job);
  }
}

at::Tensor risk_scores_cpu(const at::Tensor& x_in, const at::Tensor& basis_in, int64_t mode) {
  check_risk_args(x_in, basis_in, c10::nullopt);
  const auto x = x_in.contiguous(), basis = basis_in.contiguous();
  auto scores = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  UE_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "risk_scores_cpu", [&] {
    project_rows<scalar_t>(x, nullptr, basis, c10::nullopt, mode, 0.f, 0.f, scores.data_ptr<float>());
  });
  return scores;
}

std::tuple<at::Tensor, at::Tensor> risk_project_rows_cpu(const at::Tensor& x_in, const at::Tensor& basis_in,
                                                         const c10::optional<at::Tensor>& select, int64_t mode,
                                                         double threshold, double strength) {
  check_risk_args(x_in, basis_in, select);
  const auto x = x_in.contiguous(), basis = basis_in.contiguous();
  const auto sel = contiguous_select(select);
  auto out = empty_output(x);
  auto scores = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  UE_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "risk_project_rows_cpu", [&] {
    project_rows<scalar_t>(x, out.data_ptr<scalar_t>(), basis, sel, mode, threshold, strength,
                           scores.data_ptr<float>());
  });
  return {out, scores};
}

at::Tensor risk_project_rows_inplace_cpu(at::Tensor& x, const at::Tensor& basis_in,
                                         const c10::optional<at::Tensor>& select, int64_t mode, double threshold,
                                         double strength) {
  check_risk_args(x, basis_in, select);
  TORCH_CHECK(x.is_contiguous(), "x must be contiguous for the in-place risk projection");
  const auto basis = basis_in.contiguous();
  const auto sel = contiguous_select(select);
  auto scores = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  UE_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "risk_project_rows_inplace_cpu", [&] {
    project_rows<scalar_t>(x, x.data_ptr<scalar_t>(), basis, sel, mode, threshold, strength,
                           scores.data_ptr<float>());
  });
  return scores;
}

}  // namespace

TORCH_LIBRARY_IMPL(unlearn_engine, CPU, m) {
  m.impl("risk_scores", &risk_scores_cpu);
  m.impl("risk_project_rows", &risk_project_rows_cpu);
  m.impl("risk_project_rows_", &risk_project_rows_inplace_cpu);
}

}  // namespace unlearn_engine
