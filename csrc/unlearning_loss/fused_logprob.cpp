// Chunked fused linear + log-likelihood: the device-agnostic driver.
//
// Walks the labelled tokens in chunks; for each chunk it makes the logits with the vendor GEMM
// (ATen: MKL/OpenBLAS on CPU, cuBLAS on CUDA), runs the fused row pass (row_pass.h), and, when
// gradient coefficients are given, turns the in-place logit gradient into dL/dh and dL/dW
// (fp32 accumulation for W and bias). Peak extra memory is O(chunk x V), never N x V.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>
#include <torch/version.h>

#include <optional>
#include <tuple>

#include "row_pass.h"

// at::addmm_out(out, self, mat1, mat2, out_dtype) (fp32 accumulation of bf16/fp16 GEMMs) exists from torch 2.8 on;
// setup.py refuses an older torch with the same message before any compiler runs.
#if TORCH_VERSION_MAJOR < 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR < 8)
#error "unlearn_engine needs torch>=2.8: csrc/unlearning_loss/fused_logprob.cpp uses at::addmm_out(..., out_dtype)"
#endif

namespace unlearn_engine {
namespace {

using OptTensor = std::optional<at::Tensor>;

void check_matrix_pair(const at::Tensor& hidden, const at::Tensor& weight, const OptTensor& bias,
                       const char* hidden_name, const char* weight_name, const char* bias_name) {
  TORCH_CHECK(hidden.dim() == 2, hidden_name, " must be 2-D (N, H), got shape ", hidden.sizes());
  TORCH_CHECK(weight.dim() == 2, weight_name, " must be 2-D (V, H), got shape ", weight.sizes());
  TORCH_CHECK(hidden.size(1) == weight.size(1), hidden_name, " (N, H=", hidden.size(1), ") and ",
              weight_name, " (V, H=", weight.size(1), ") must share H");
  TORCH_CHECK(hidden.scalar_type() == weight.scalar_type(), hidden_name, " and ", weight_name,
              " must have the same dtype, got ", hidden.scalar_type(), " and ", weight.scalar_type());
  TORCH_CHECK(at::isFloatingType(hidden.scalar_type()), hidden_name, " must be floating point");
  TORCH_CHECK(hidden.device() == weight.device(), hidden_name, " and ", weight_name,
              " must be on the same device");
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), bias_name, " must have shape (V=",
                weight.size(0), ",), got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == weight.scalar_type(), bias_name, " must have dtype ",
                weight.scalar_type(), ", got ", bias->scalar_type());
    TORCH_CHECK(bias->device() == weight.device(), bias_name, " must be on ", weight.device());
  }
}

void check_token_vector(const at::Tensor& t, int64_t n, at::ScalarType dtype, const at::Device& device,
                        const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, name, " must have shape (N=", n, ",), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must have dtype ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == device, name, " must be on ", device, ", got ", t.device());
}

at::Tensor chunk_logits(const at::Tensor& h, const at::Tensor& weight, const OptTensor& bias) {
  return bias ? at::addmm(*bias, h, weight.t()) : at::mm(h, weight.t());
}

struct Outputs {
  at::Tensor logp, kl, grad_hidden, grad_weight, grad_bias;
};

Outputs run(const at::Tensor& hidden_in, const at::Tensor& weight_in, const OptTensor& bias_in,
            const at::Tensor& labels, const OptTensor& ref_hidden_in, const OptTensor& ref_weight_in,
            const OptTensor& ref_bias_in, const OptTensor& coef_logp, const OptTensor& coef_kl,
            int64_t chunk_size) {
  check_matrix_pair(hidden_in, weight_in, bias_in, "hidden", "weight", "bias");
  const int64_t N = hidden_in.size(0), V = weight_in.size(0);
  const auto device = hidden_in.device();
  check_token_vector(labels, N, at::kLong, device, "labels");
  TORCH_CHECK(chunk_size > 0, "chunk_size must be positive, got ", chunk_size);
  const bool with_ref = ref_hidden_in.has_value() || ref_weight_in.has_value();
  if (with_ref) {
    TORCH_CHECK(ref_hidden_in && ref_weight_in, "ref_hidden and ref_weight must be given together");
    check_matrix_pair(*ref_hidden_in, *ref_weight_in, ref_bias_in, "ref_hidden", "ref_weight", "ref_bias");
    TORCH_CHECK(ref_hidden_in->size(0) == N, "ref_hidden must have N=", N, " rows, got ", ref_hidden_in->size(0));
    TORCH_CHECK(ref_weight_in->size(0) == V, "ref_weight must have V=", V, " rows, got ", ref_weight_in->size(0));
    TORCH_CHECK(ref_hidden_in->scalar_type() == hidden_in.scalar_type(), "ref_hidden must have dtype ",
                hidden_in.scalar_type(), ", got ", ref_hidden_in->scalar_type());
    TORCH_CHECK(ref_hidden_in->device() == device, "ref_hidden must be on ", device);
  } else {
    TORCH_CHECK(!ref_bias_in, "ref_bias given without ref_hidden/ref_weight");
  }
  const bool want_grad = coef_logp.has_value();
  if (want_grad) check_token_vector(*coef_logp, N, at::kFloat, device, "coef_logp");
  if (coef_kl) {
    TORCH_CHECK(with_ref, "coef_kl needs ref_hidden and ref_weight");
    check_token_vector(*coef_kl, N, at::kFloat, device, "coef_kl");
  }
  const c10::DeviceGuard guard(device);

  const at::Tensor hidden = hidden_in.contiguous(), weight = weight_in.contiguous();
  const OptTensor bias = bias_in ? OptTensor(bias_in->contiguous()) : std::nullopt;
  const OptTensor ref_hidden = with_ref ? OptTensor(ref_hidden_in->contiguous()) : std::nullopt;
  const OptTensor ref_weight = with_ref ? OptTensor(ref_weight_in->contiguous()) : std::nullopt;
  const OptTensor ref_bias = ref_bias_in ? OptTensor(ref_bias_in->contiguous()) : std::nullopt;
  const auto f32 = hidden.options().dtype(at::kFloat);
  const auto dtype = hidden.scalar_type();
  const bool low_precision = dtype == at::kHalf || dtype == at::kBFloat16;
  // W and bias gradients accumulate in fp32 (fp64 for fp64 inputs) across chunks.
  const at::ScalarType acc_type = dtype == at::kDouble ? at::kDouble : at::kFloat;
  const auto acc = hidden.options().dtype(acc_type);

  Outputs out;
  out.logp = at::zeros({N}, f32);
  out.kl = with_ref ? at::zeros({N}, f32) : at::empty({0}, f32);
  // Low precision: the logit gradient is stored in the logits' dtype. Its entries are coefficient x probability,
  // and per-token coefficients are ~1/(samples x tokens), so in fp16 most entries would flush to zero. The row
  // pass gets coefficients normalised to max |coef| = 1 (a device scalar: no host sync), and the scale is
  // applied once to the accumulated gradients.
  at::Tensor grad_scale;
  OptTensor coef_a = coef_logp, coef_k = coef_kl;
  if (want_grad) {
    out.grad_hidden = at::zeros_like(hidden);
    out.grad_weight = at::zeros({V, hidden.size(1)}, acc);
    out.grad_bias = bias ? at::zeros({V}, acc) : at::empty({0}, f32);
    if (low_precision && N > 0) {
      grad_scale = coef_logp->abs().max();
      if (coef_kl) grad_scale = at::maximum(grad_scale, coef_kl->abs().max());
      grad_scale = at::where(grad_scale > 0, grad_scale, at::ones_like(grad_scale));
      coef_a = *coef_logp / grad_scale;
      if (coef_kl) coef_k = *coef_kl / grad_scale;
    }
  }

  // Only labelled tokens are computed: prompts and padding (label -100) cost nothing.
  const at::Tensor labelled = labels.ne(-100);
  const at::Tensor rows = labelled.nonzero().squeeze(1);
  const int64_t n_rows = rows.size(0);
  const bool all_rows = n_rows == N;
  // cuBLAS accumulates a bf16/fp16 GEMM straight into the fp32 gradient; elsewhere the operands are widened.
  bool cuda_accumulate = hidden.is_cuda() && low_precision;

  for (int64_t start = 0; start < n_rows; start += chunk_size) {
    const int64_t count = std::min(chunk_size, n_rows - start);
    const at::Tensor idx = rows.narrow(0, start, count);
    auto take = [&](const at::Tensor& t) { return all_rows ? t.narrow(0, start, count) : t.index_select(0, idx); };

    const at::Tensor h = take(hidden);
    RowPass pass;
    pass.logits = chunk_logits(h, weight, bias).contiguous();
    if (with_ref) pass.ref_logits = chunk_logits(take(*ref_hidden), *ref_weight, ref_bias).contiguous();
    pass.labels = take(labels).contiguous();
    if (want_grad) pass.coef_logp = take(*coef_a).contiguous();
    if (coef_k) pass.coef_kl = take(*coef_k).contiguous();
    pass.logp = at::empty({count}, f32);
    if (with_ref) pass.kl = at::empty({count}, f32);

#ifdef WITH_CUDA
    if (hidden.is_cuda()) row_pass_cuda(pass); else
#endif
    row_pass_cpu(pass);

    out.logp.index_copy_(0, idx, pass.logp);
    if (with_ref) out.kl.index_copy_(0, idx, pass.kl);
    if (!want_grad) continue;

    const at::Tensor& dz = pass.logits;  // now holds dL/dlogits for the chunk (divided by grad_scale)
    out.grad_hidden.index_copy_(0, idx, at::mm(dz, weight));
    if (cuda_accumulate) {
      try {
        at::addmm_out(out.grad_weight, out.grad_weight, dz.t(), h, at::kFloat);
      } catch (const c10::Error&) {
        cuda_accumulate = false;  // some 2.8/2.9 builds refuse an fp32 out for bf16 operands: widen instead
        out.grad_weight.addmm_(dz.t().to(at::kFloat), h.to(at::kFloat));
      }
    } else if (dtype == acc_type) {
      out.grad_weight.addmm_(dz.t(), h);
    } else {
      out.grad_weight.addmm_(dz.t().to(acc_type), h.to(acc_type));
    }
    if (bias) out.grad_bias.add_(dz.sum({0}, /*keepdim=*/false, out.grad_bias.scalar_type()));
  }
  if (want_grad) {
    if (grad_scale.defined()) {
      out.grad_hidden.mul_(grad_scale);  // opmath fp32, rounded once to the model dtype
      out.grad_weight.mul_(grad_scale);
      if (bias) out.grad_bias.mul_(grad_scale);
    }
    out.grad_weight = out.grad_weight.to(weight.scalar_type());
    if (bias) out.grad_bias = out.grad_bias.to(bias->scalar_type());
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor> fused_logprob(const at::Tensor& hidden, const at::Tensor& weight,
                                                 const OptTensor& bias, const at::Tensor& labels,
                                                 const OptTensor& ref_hidden, const OptTensor& ref_weight,
                                                 const OptTensor& ref_bias, int64_t chunk_size) {
  Outputs o = run(hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias, std::nullopt, std::nullopt,
                  chunk_size);
  return {o.logp, o.kl};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_logprob_backward(
    const at::Tensor& hidden, const at::Tensor& weight, const OptTensor& bias, const at::Tensor& labels,
    const OptTensor& ref_hidden, const OptTensor& ref_weight, const OptTensor& ref_bias,
    const at::Tensor& grad_logp, const OptTensor& grad_kl, int64_t chunk_size) {
  Outputs o = run(hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias, grad_logp, grad_kl, chunk_size);
  return {o.grad_hidden, o.grad_weight, o.grad_bias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_linear_objective(
    const at::Tensor& hidden, const at::Tensor& weight, const OptTensor& bias, const at::Tensor& labels,
    const OptTensor& ref_hidden, const OptTensor& ref_weight, const OptTensor& ref_bias,
    const at::Tensor& coef_logp, const OptTensor& coef_kl, int64_t chunk_size) {
  Outputs o = run(hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias, coef_logp, coef_kl, chunk_size);
  at::Tensor loss = (o.logp * coef_logp).sum();
  if (coef_kl) loss = loss + (o.kl * *coef_kl).sum();
  return {loss, o.logp, o.kl, o.grad_hidden, o.grad_weight, o.grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(unlearn_engine, CPU, m) {
  m.impl("fused_logprob", &fused_logprob);
  m.impl("fused_logprob_backward", &fused_logprob_backward);
  m.impl("fused_linear_objective", &fused_linear_objective);
}

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(unlearn_engine, CUDA, m) {
  m.impl("fused_logprob", &fused_logprob);
  m.impl("fused_logprob_backward", &fused_logprob_backward);
  m.impl("fused_linear_objective", &fused_linear_objective);
}
#endif

}  // namespace unlearn_engine
