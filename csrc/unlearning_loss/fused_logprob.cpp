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

#include <cmath>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "common/launch.h"
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

// A chunk's (C, V) logits. On the CPU they are made transposed, z^T = W h^T (V x C), and handed on as its (C, V)
// view, column-major: MKL runs the three GEMMs of a chunk ~10% faster in that layout (W h^T against h W^T, and
// dW += dz^T h with dz^T contiguous; README.md, Benchmarks), and the CPU row pass loads consecutive tokens. CUDA kernels
// (the simulator's too) take row-major logits.
at::Tensor chunk_logits(const at::Tensor& h, const at::Tensor& weight, const OptTensor& bias) {
  if (!uses_cuda_kernels(h.device()))
    return (bias ? at::addmm(bias->unsqueeze(1), weight, h.t()) : at::mm(weight, h.t())).t();
  return bias ? at::addmm(*bias, h, weight.t()) : at::mm(h, weight.t());
}

void row_pass(const RowPass& pass) {
#ifdef WITH_CUDA
  if (uses_cuda_kernels(pass.logits.device())) return row_pass_cuda(pass);
#endif
  row_pass_cpu(pass);
}

// The checked, contiguous inputs of one walk (the model's and, for KL, the frozen reference's).
struct Inputs {
  at::Tensor hidden, weight;
  OptTensor bias, ref_hidden, ref_weight, ref_bias;
  int64_t N = 0, V = 0;
  bool with_ref = false, low_precision = false;
  // fp16 gradients made in the forward walk are returned in fp32: the backward's grad_output (an fp16 loss scale)
  // multiplies them before they are rounded, so small entries do not flush to zero first.
  bool fp32_grads = false;
  // false when the LM head is frozen (LoRA, a trained body): no V x H gradient is allocated or accumulated (the walk
  // then does 4 N H V flop instead of 6).
  bool weight_grad = true;
  at::ScalarType dtype, acc_type;  // acc_type: W and bias gradients accumulate in fp32 (fp64 for fp64 inputs)
  at::TensorOptions f32;
};

Inputs prepare(const at::Tensor& hidden_in, const at::Tensor& weight_in, const OptTensor& bias_in,
               const at::Tensor& labels, const OptTensor& ref_hidden_in, const OptTensor& ref_weight_in,
               const OptTensor& ref_bias_in, const OptTensor& coef_kl, int64_t chunk_size) {
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
  if (coef_kl) {
    TORCH_CHECK(with_ref, "coef_kl needs ref_hidden and ref_weight");
    check_token_vector(*coef_kl, N, at::kFloat, device, "coef_kl");
  }
  Inputs in;
  in.hidden = hidden_in.contiguous();
  in.weight = weight_in.contiguous();
  if (bias_in) in.bias = bias_in->contiguous();
  if (with_ref) in.ref_hidden = ref_hidden_in->contiguous(), in.ref_weight = ref_weight_in->contiguous();
  if (ref_bias_in) in.ref_bias = ref_bias_in->contiguous();
  in.N = N;
  in.V = V;
  in.with_ref = with_ref;
  in.dtype = in.hidden.scalar_type();
  in.low_precision = in.dtype == at::kHalf || in.dtype == at::kBFloat16;
  in.acc_type = in.dtype == at::kDouble ? at::kDouble : at::kFloat;
  in.f32 = in.hidden.options().dtype(at::kFloat);
  return in;
}

struct Outputs {
  at::Tensor logp, kl, grad_hidden, grad_weight, grad_bias;
  // The first chunk writes dW with beta = 0 (no V x H zero fill, no read of it); zeroed at the end if no chunk ran.
  bool weight_written = false;
};

Outputs make_outputs(const Inputs& in, bool want_grad) {
  Outputs out;
  out.logp = at::zeros({in.N}, in.f32);
  out.kl = in.with_ref ? at::zeros({in.N}, in.f32) : at::empty({0}, in.f32);
  if (want_grad) {
    const auto acc = in.hidden.options().dtype(in.acc_type);
    out.grad_hidden = in.fp32_grads ? at::zeros(in.hidden.sizes(), in.f32) : at::zeros_like(in.hidden);
    out.grad_weight = in.weight_grad ? at::empty({in.V, in.hidden.size(1)}, acc) : at::empty({0}, in.f32);
    out.grad_bias = in.bias && in.weight_grad ? at::zeros({in.V}, acc) : at::empty({0}, in.f32);
  }
  return out;
}

// Low precision: the logit gradient is stored in the logits' dtype. Its entries are coefficient x probability,
// and per-token coefficients are ~1/(samples x tokens), so in fp16 most entries would flush to zero. The row
// pass gets coefficients divided by this scale (a bound on max |coef|, kept on the device: no host sync), and the
// scale is applied once to the accumulated gradients. Undefined (no scaling) for fp32 / fp64.
at::Tensor gradient_scale(const Inputs& in, const at::Tensor& coef_bound, const OptTensor& coef_kl) {
  if (!in.low_precision || in.N == 0) return at::Tensor();
  at::Tensor scale = coef_bound.numel() ? coef_bound.abs().max() : at::zeros({}, in.f32);
  if (coef_kl) scale = at::maximum(scale, coef_kl->abs().max());
  return at::where(scale > 0, scale, at::ones_like(scale));
}

// The rows of one chunk: a slice of the token rows when they are consecutive, else gathered by index.
struct ChunkRows {
  at::Tensor idx;  // (count,) token rows
  int64_t start = 0, count = 0;
  bool slice = false;
  at::Tensor take(const at::Tensor& t) const { return slice ? t.narrow(0, start, count) : t.index_select(0, idx); }
  void put(at::Tensor& dst, const at::Tensor& src) const {
    if (slice) {
      dst.narrow(0, start, count).copy_(src);
    } else {
      dst.index_copy_(0, idx, src);
    }
  }
};

// Capturable walks (no device-to-host read, so a CUDA graph can hold them) cover every row in order, in a plan
// made from the shapes alone. An unlabelled row (-100) gets label 0, coefficients 0 and zero hidden states (a
// padded position may hold NaN), so it adds nothing; its log-likelihood and KL are reported as 0.
struct StaticRows {
  at::Tensor valid;   // (N,) bool: labels != -100
  at::Tensor labels;  // (N,) with -100 replaced by 0
  at::Tensor masked(const at::Tensor& t) const { return at::where(valid, t, at::zeros({}, t.options())); }
  at::Tensor hidden_rows(const ChunkRows& rows, const at::Tensor& hidden) const {
    return at::where(rows.take(valid).unsqueeze(1), rows.take(hidden), at::zeros({}, hidden.options()));
  }
};

StaticRows static_rows(const at::Tensor& labels) {
  StaticRows s;
  s.valid = labels.ne(-100);
  s.labels = at::where(s.valid, labels, at::zeros({}, labels.options()));
  return s;
}

// Turns the chunk's logit gradient dz (written over the logits by the row pass) into dL/dh rows and accumulates
// dL/dW and dL/db (fp32, fp64 for fp64 inputs).
void accumulate_gradients(const Inputs& in, Outputs& out, const at::Tensor& dz, const at::Tensor& h,
                          const ChunkRows& rows, bool& cuda_accumulate) {
  rows.put(out.grad_hidden, at::mm(dz, in.weight).to(out.grad_hidden.scalar_type()));
  if (!in.weight_grad) return;
  const double beta = out.weight_written ? 1.0 : 0.0;  // beta 0: the fresh (uninitialised) buffer is not read
  if (cuda_accumulate) {
    try {
      at::addmm_out(out.grad_weight, out.grad_weight, dz.t(), h, at::kFloat, beta);
    } catch (const c10::Error&) {
      cuda_accumulate = false;  // some 2.8/2.9 builds refuse an fp32 out for bf16 operands: widen instead
      out.grad_weight.addmm_(dz.t().to(at::kFloat), h.to(at::kFloat), beta);
    }
  } else if (in.dtype == in.acc_type) {
    out.grad_weight.addmm_(dz.t(), h, beta);
  } else {
    out.grad_weight.addmm_(dz.t().to(in.acc_type), h.to(in.acc_type), beta);
  }
  out.weight_written = true;
  if (in.bias) out.grad_bias.add_(dz.sum({0}, /*keepdim=*/false, out.grad_bias.scalar_type()));
}

void finish_gradients(const Inputs& in, Outputs& out, const at::Tensor& grad_scale) {
  if (in.weight_grad && !out.weight_written) out.grad_weight.zero_();  // no labelled row: no chunk wrote it
  if (grad_scale.defined()) {
    out.grad_hidden.mul_(grad_scale);  // opmath fp32, rounded once to the model dtype
    if (in.weight_grad) out.grad_weight.mul_(grad_scale);
    if (in.bias && in.weight_grad) out.grad_bias.mul_(grad_scale);
  }
  if (in.fp32_grads || !in.weight_grad) return;  // fp16: rounded by the caller after grad_output has scaled them
  out.grad_weight = out.grad_weight.to(in.weight.scalar_type());
  if (in.bias) out.grad_bias = out.grad_bias.to(in.bias->scalar_type());
}

// A chunk's logits (and reference logits), labels and output buffers, ready for the row pass.
// With `fixed` (a capturable walk) the reference rows of unlabelled tokens are zeroed like the model's.
RowPass chunk_pass(const Inputs& in, const at::Tensor& labels, const ChunkRows& rows, const at::Tensor& h,
                   const StaticRows* fixed = nullptr) {
  RowPass pass;
  pass.logits = chunk_logits(h, in.weight, in.bias);
  if (in.with_ref) {
    const at::Tensor ref_h = fixed ? fixed->hidden_rows(rows, *in.ref_hidden) : rows.take(*in.ref_hidden);
    pass.ref_logits = chunk_logits(ref_h, *in.ref_weight, in.ref_bias);
  }
  pass.labels = rows.take(labels).contiguous();
  pass.logp = at::empty({rows.count}, in.f32);
  if (in.with_ref) pass.kl = at::empty({rows.count}, in.f32);
  return pass;
}

// cuBLAS accumulates a bf16/fp16 GEMM straight into the fp32 gradient; elsewhere the operands are widened.
bool cuda_accumulates(const Inputs& in) { return in.hidden.is_cuda() && in.low_precision; }

// The linear walk into `out`: the labelled rows (capturable: every row, StaticRows) in chunks, their log-likelihoods
// and KLs and, given coef_logp, the gradients of sum_t coef_logp_t logp_t + coef_kl_t KL_t.
void walk_linear(const Inputs& in, Outputs& out, const at::Tensor& labels, const OptTensor& coef_logp,
                 const OptTensor& coef_kl, int64_t chunk_size, bool capturable) {
  const bool want_grad = coef_logp.has_value();
  at::Tensor grad_scale;
  OptTensor coef_a = coef_logp, coef_k = coef_kl;
  if (want_grad) {
    grad_scale = gradient_scale(in, *coef_logp, coef_kl);
    if (grad_scale.defined()) {
      coef_a = *coef_logp / grad_scale;
      if (coef_kl) coef_k = *coef_kl / grad_scale;
    }
  }

  // Only labelled tokens are computed (prompts and padding, label -100, cost nothing), unless capturable: then
  // every row is walked and the unlabelled ones are neutralised (StaticRows).
  std::optional<StaticRows> fixed;
  at::Tensor rows, walk_labels = labels;
  int64_t n_rows = in.N;
  if (capturable) {
    fixed = static_rows(labels);
    walk_labels = fixed->labels;
    if (coef_a) coef_a = fixed->masked(*coef_a);
    if (coef_k) coef_k = fixed->masked(*coef_k);
  } else {
    rows = labels.ne(-100).nonzero().squeeze(1);
    n_rows = rows.size(0);
  }
  const bool all_rows = n_rows == in.N;
  bool cuda_accumulate = cuda_accumulates(in);

  for (int64_t start = 0; start < n_rows; start += chunk_size) {
    ChunkRows chunk;
    chunk.count = std::min(chunk_size, n_rows - start);
    chunk.start = start;
    chunk.slice = all_rows;
    if (!all_rows) chunk.idx = rows.narrow(0, start, chunk.count);

    const at::Tensor h = fixed ? fixed->hidden_rows(chunk, in.hidden) : chunk.take(in.hidden);
    RowPass pass = chunk_pass(in, walk_labels, chunk, h, fixed ? &*fixed : nullptr);
    if (want_grad) pass.coef_logp = chunk.take(*coef_a).contiguous();
    if (coef_k) pass.coef_kl = chunk.take(*coef_k).contiguous();
    row_pass(pass);

    chunk.put(out.logp, pass.logp);
    if (in.with_ref) chunk.put(out.kl, pass.kl);
    if (want_grad) accumulate_gradients(in, out, pass.logits, h, chunk, cuda_accumulate);
  }
  if (want_grad) finish_gradients(in, out, grad_scale);
  if (fixed) {
    out.logp = fixed->masked(out.logp);
    if (in.with_ref) out.kl = fixed->masked(out.kl);
  }
}

Outputs run(const at::Tensor& hidden_in, const at::Tensor& weight_in, const OptTensor& bias_in,
            const at::Tensor& labels, const OptTensor& ref_hidden_in, const OptTensor& ref_weight_in,
            const OptTensor& ref_bias_in, const OptTensor& coef_logp, const OptTensor& coef_kl,
            int64_t chunk_size, bool capturable, bool made_in_forward = false) {
  Inputs in = prepare(hidden_in, weight_in, bias_in, labels, ref_hidden_in, ref_weight_in, ref_bias_in, coef_kl,
                      chunk_size);
  in.fp32_grads = made_in_forward && in.dtype == at::kHalf;
  const bool want_grad = coef_logp.has_value();
  if (want_grad) check_token_vector(*coef_logp, in.N, at::kFloat, in.hidden.device(), "coef_logp");
  const c10::DeviceGuard guard(in.hidden.device());
  Outputs out = make_outputs(in, want_grad);
  walk_linear(in, out, labels, coef_logp, coef_kl, chunk_size, capturable);
  return out;
}

// ----------------------------------------------------------------------------- the group objective
// sum_g linear_g m_g + sigmoid_g (2/beta) softplus(beta (m_g + shift_g)) + sum_t coef_kl_t KL_t, m_g = S_g / denom_g,
// S_g = sum of the log-likelihoods of group g's labelled tokens; group_index -1 = no group. dL/dS_g is
//   (linear_g + 2 sigmoid_g sigmoid(beta (m_g + shift_g))) / denom_g,
// known before the walk for a linear group (sigmoid_g = 0) and once S_g is complete for a "nonlinear" one.
//
// One walk makes the gradients (6 N H V flop, plus the reference logits for KL): the labelled rows are ordered so
// that every nonlinear group lies whole inside one chunk (its rows first in the chunk, sorted by group; linear
// rows fill the rest). Per chunk: the logits by GEMM; a row pass without coefficients over the nonlinear rows
// (their log-likelihoods; the logits stay intact); S_g and the coefficients of the chunk's nonlinear groups; a
// row pass with coefficients over the whole chunk (logit gradient in place; it recomputes the log-sum-exp, cheap
// next to the GEMMs); the two gradient GEMMs. A nonlinear group with more labelled rows than the chunk gets a
// forward-only pre-pass over its own rows (its S_g, hence its coefficient), then walks as a linear one.
struct GroupOutputs {
  at::Tensor loss, group_logp;
  Outputs tokens;
};

at::Tensor group_coefficients(const at::Tensor& S, const at::Tensor& linear, const at::Tensor& sigmoid,
                              const at::Tensor& shift, const at::Tensor& denom, double beta) {
  return (linear + 2 * sigmoid * at::sigmoid(beta * (S / denom + shift))) / denom;
}

// (G,) -> (G+1,) with a trailing 0: slot G collects the tokens of no group.
at::Tensor with_no_group_slot(const at::Tensor& per_group) {
  return at::cat({per_group, at::zeros({1}, per_group.options())});
}

// One call's group vectors (checked) and each token's slot: its group, or G for "no group" (-1), so that
// per-group sums need no masking.
struct Groups {
  at::Tensor index, slot, linear, sigmoid, shift, denom;
  int64_t G = 0;
  double beta = 1;
};

// What a walk that reads no group data on the host cannot check there, asserted on the device: group_index in
// [-1, G), and sigmoid all zero when the caller says the objective is linear (nonlinear = false).
void assert_groups_on_device(const Groups& gr, bool nonlinear) {
  const std::string range = "group_index values must be -1 (no group) or in [0, G=" + std::to_string(gr.G) + ")";
  at::_assert_async(gr.index.ge(-1).logical_and(gr.index.lt(gr.G)).all(), range);
  if (!nonlinear) at::_assert_async(gr.sigmoid.eq(0).all(), "nonlinear=False needs sigmoid all zero");
}

// The one-walk plan of the module comment. A nonlinear objective reads the labelled rows per group on the host
// (one sync, beside the labelled-row list's); a linear one walks the labelled rows in order and reads nothing more.
void walk_groups_packed(const Inputs& in, Outputs& out, const at::Tensor& labels, const Groups& gr,
                        const OptTensor& coef_kl, int64_t chunk_size, bool nonlinear) {
  const auto device = in.hidden.device();
  const int64_t G = gr.G;
  const at::Tensor &group_index = gr.index, &slot = gr.slot, &linear = gr.linear, &sigmoid = gr.sigmoid,
                   &shift = gr.shift, &denom = gr.denom;
  const double beta = gr.beta;
  const at::Tensor rows = labels.ne(-100).nonzero().squeeze(1);  // only labelled tokens are computed
  const int64_t n_rows = rows.size(0);
  const bool all_rows = n_rows == in.N;
  const at::Tensor row_slot = all_rows ? slot : slot.index_select(0, rows);

  // One transfer to the host: labelled rows per group, which groups are nonlinear, and the bad group indices
  // (linear objective: none; every row then walks in order).
  at::Tensor host;
  if (nonlinear) {
    const at::Tensor counts = at::zeros({G + 1}, group_index.options()).index_add_(0, row_slot,
                                                                                at::ones_like(row_slot));
    const at::Tensor bad = group_index.ge(-1).logical_and(group_index.lt(G)).logical_not().sum().view({1});
    host = at::cat({counts.narrow(0, 0, G), sigmoid.ne(0).to(at::kLong), bad}).cpu();
  } else {
    assert_groups_on_device(gr, nonlinear);
    host = at::zeros({2 * G + 1}, at::TensorOptions().dtype(at::kLong));
  }
  const int64_t* host_counts = host.data_ptr<int64_t>();
  const int64_t* host_nonlinear = host_counts + G;
  TORCH_CHECK(host_counts[2 * G] == 0, "group_index values must be -1 (no group) or in [0, G=", G, "), got ",
              host_counts[2 * G], " outside");

  // Sort keys: g for a nonlinear group that fits a chunk ("packed"), G+1+g for one that does not ("oversized"),
  // 2G+2 for every other row (linear groups and no group); a stable sort keeps token order within each.
  const int64_t rest_key = 2 * G + 2;
  at::Tensor key_of_slot = at::full({G + 1}, rest_key, at::TensorOptions().dtype(at::kLong));
  int64_t* keys = key_of_slot.data_ptr<int64_t>();
  int64_t n_packed = 0, n_over = 0;
  for (int64_t g = 0; g < G; ++g) {
    if (!host_nonlinear[g] || host_counts[g] == 0) continue;
    if (host_counts[g] <= chunk_size) {
      keys[g] = g;
      n_packed += host_counts[g];
    } else {
      keys[g] = G + 1 + g;
      n_over += host_counts[g];
    }
  }
  const bool reorder = n_packed + n_over > 0;
  const at::Tensor ordered =
      reorder ? rows.index_select(
                    0, std::get<1>(at::sort(key_of_slot.to(device).index_select(0, row_slot), std::optional<bool>(true), 0)))
              : rows;
  // Rows in walk order are a plain slice of the tokens when every token is labelled and nothing is reordered.
  const bool identity = all_rows && !reorder;

  // Per-token coefficient of the log-likelihood, known before the walk for linear groups: linear_g / denom_g.
  const at::Tensor linear_coef = with_no_group_slot(linear / denom);
  at::Tensor token_coef = linear_coef.index_select(0, slot);

  // Forward-only pre-pass over the oversized groups' rows: their S_g, hence their coefficients.
  for (int64_t start = 0; start < n_over; start += chunk_size) {
    ChunkRows chunk;
    chunk.count = std::min(chunk_size, n_over - start);
    chunk.idx = ordered.narrow(0, n_packed + start, chunk.count);
    RowPass pass;
    pass.logits = chunk_logits(chunk.take(in.hidden), in.weight, in.bias);
    pass.labels = chunk.take(labels).contiguous();
    pass.logp = at::empty({chunk.count}, in.f32);
    row_pass(pass);
    out.logp.index_copy_(0, chunk.idx, pass.logp);
  }
  if (n_over > 0) {
    const at::Tensor over_rows = ordered.narrow(0, n_packed, n_over);
    const at::Tensor over_slot = slot.index_select(0, over_rows);
    const at::Tensor S = at::zeros({G + 1}, in.f32).index_add_(0, over_slot, out.logp.index_select(0, over_rows));
    const at::Tensor coef = with_no_group_slot(group_coefficients(S.narrow(0, 0, G), linear, sigmoid, shift, denom,
                                                                  beta));
    token_coef.index_copy_(0, over_rows, coef.index_select(0, over_slot));
  }

  // Gradient scale (low precision): a bound on |coef| known before the walk, (|linear| + 2 |sigmoid|) / denom.
  const at::Tensor coef_bound = with_no_group_slot((linear.abs() + 2 * sigmoid.abs()) / denom.abs());
  const at::Tensor grad_scale = gradient_scale(in, coef_bound.index_select(0, row_slot), coef_kl);
  OptTensor coef_k = coef_kl;
  if (grad_scale.defined()) {
    token_coef = token_coef / grad_scale;
    if (coef_kl) coef_k = *coef_kl / grad_scale;
  }

  // The walk's plan: whole packed groups (in group order) per chunk, then linear rows (the oversized groups' and
  // the rest, in ordered[n_packed:]) filling each chunk up to chunk_size.
  struct Chunk {
    int64_t packed_start, packed_count, rest_start, rest_count;
  };
  std::vector<Chunk> plan;
  {
    int64_t pos = 0, chunk_start = 0, filled = 0;
    for (int64_t g = 0; g < G; ++g) {
      if (keys[g] != g) continue;
      if (filled + host_counts[g] > chunk_size) {
        plan.push_back({chunk_start, filled, 0, 0});
        chunk_start = pos, filled = 0;
      }
      filled += host_counts[g], pos += host_counts[g];
    }
    if (filled > 0) plan.push_back({chunk_start, filled, 0, 0});
    const int64_t n_rest = n_rows - n_packed;
    int64_t rest = 0;
    for (Chunk& c : plan) {
      c.rest_start = rest;
      c.rest_count = std::min(chunk_size - c.packed_count, n_rest - rest);
      rest += c.rest_count;
    }
    for (; rest < n_rest; rest += chunk_size) plan.push_back({0, 0, rest, std::min(chunk_size, n_rest - rest)});
  }

  bool cuda_accumulate = cuda_accumulates(in);
  for (const Chunk& c : plan) {
    ChunkRows chunk;
    chunk.count = c.packed_count + c.rest_count;
    const at::Tensor rest = ordered.narrow(0, n_packed + c.rest_start, c.rest_count);
    chunk.idx = c.packed_count == 0 ? rest : at::cat({ordered.narrow(0, c.packed_start, c.packed_count), rest});
    chunk.start = c.rest_start;  // a slice only when nothing is reordered (then there are no packed rows)
    chunk.slice = identity;

    const at::Tensor h = chunk.take(in.hidden);
    RowPass pass = chunk_pass(in, labels, chunk, h);
    at::Tensor coef = chunk.take(token_coef).contiguous();
    if (c.packed_count > 0) {
      // The packed groups' log-likelihoods first (logits left intact), then their coefficients.
      RowPass first;
      first.logits = pass.logits.narrow(0, 0, c.packed_count);
      first.labels = pass.labels.narrow(0, 0, c.packed_count);
      first.logp = at::empty({c.packed_count}, in.f32);
      row_pass(first);
      const at::Tensor packed_slot = slot.index_select(0, chunk.idx.narrow(0, 0, c.packed_count));
      const at::Tensor S = at::zeros({G + 1}, in.f32).index_add_(0, packed_slot, first.logp);
      at::Tensor group_coef = group_coefficients(S.narrow(0, 0, G), linear, sigmoid, shift, denom, beta);
      if (grad_scale.defined()) group_coef = group_coef / grad_scale;
      coef.narrow(0, 0, c.packed_count).copy_(with_no_group_slot(group_coef).index_select(0, packed_slot));
    }
    pass.coef_logp = coef;  // (index_select made coef a fresh tensor whenever there are packed rows)
    if (coef_k) pass.coef_kl = chunk.take(*coef_k).contiguous();
    row_pass(pass);

    out.logp.index_copy_(0, chunk.idx, pass.logp);
    if (in.with_ref) out.kl.index_copy_(0, chunk.idx, pass.kl);
    accumulate_gradients(in, out, pass.logits, h, chunk, cuda_accumulate);
  }
  finish_gradients(in, out, grad_scale);
}

// The capturable plan: no host read. A nonlinear objective gets a forward-only walk over every row first (its S_g,
// hence every coefficient: 8 N H V flop instead of 6); then the linear walk over every row with those per-token
// coefficients. `nonlinear` = false promises sigmoid is all zero (checked on the device).
void walk_groups_static(const Inputs& in, Outputs& out, const at::Tensor& labels, const Groups& gr,
                        const OptTensor& coef_kl, int64_t chunk_size, bool nonlinear) {
  const int64_t G = gr.G;
  assert_groups_on_device(gr, nonlinear);
  // (unlabelled rows need no care here: the capturable walk reports their logp as 0 and zeroes their coefficients)
  at::Tensor group_coef = gr.linear / gr.denom;
  if (nonlinear) {
    Inputs model_only = in;
    model_only.with_ref = false;
    Outputs first = make_outputs(model_only, /*want_grad=*/false);
    walk_linear(model_only, first, labels, std::nullopt, std::nullopt, chunk_size, /*capturable=*/true);
    const at::Tensor S = at::zeros({G + 1}, in.f32).index_add_(0, gr.slot, first.logp);
    group_coef = group_coefficients(S.narrow(0, 0, G), gr.linear, gr.sigmoid, gr.shift, gr.denom, gr.beta);
  }
  walk_linear(in, out, labels, with_no_group_slot(group_coef).index_select(0, gr.slot), coef_kl, chunk_size,
              /*capturable=*/true);
}

GroupOutputs run_groups(const at::Tensor& hidden_in, const at::Tensor& weight_in, const OptTensor& bias_in,
                        const at::Tensor& labels, const at::Tensor& group_index, const at::Tensor& linear,
                        const at::Tensor& sigmoid, const at::Tensor& shift, const at::Tensor& denom, double beta,
                        const OptTensor& ref_hidden_in, const OptTensor& ref_weight_in, const OptTensor& ref_bias_in,
                        const OptTensor& coef_kl, int64_t chunk_size, bool weight_grad, bool capturable,
                        bool nonlinear) {
  Inputs in = prepare(hidden_in, weight_in, bias_in, labels, ref_hidden_in, ref_weight_in, ref_bias_in, coef_kl,
                      chunk_size);
  in.fp32_grads = in.dtype == at::kHalf;  // gradients made in the forward walk
  in.weight_grad = weight_grad;
  const auto device = in.hidden.device();
  check_token_vector(group_index, in.N, at::kLong, device, "group_index");
  TORCH_CHECK(linear.dim() == 1, "linear must be 1-D (G,), got shape ", linear.sizes());
  const int64_t G = linear.size(0);
  auto check_group_vector = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == G, name, " must have shape (G=", G, ",) like linear, got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must have dtype Float, got ", t.scalar_type());
    TORCH_CHECK(t.device() == device, name, " must be on ", device, ", got ", t.device());
  };
  check_group_vector(linear, "linear");
  check_group_vector(sigmoid, "sigmoid");
  check_group_vector(shift, "shift");
  check_group_vector(denom, "denom");
  TORCH_CHECK(std::isfinite(beta) && beta > 0, "beta must be finite and > 0, got ", beta);
  const c10::DeviceGuard guard(device);

  Outputs out = make_outputs(in, /*want_grad=*/true);
  GroupOutputs result;

  Groups gr{group_index, at::Tensor(), linear, sigmoid, shift, denom, G, beta};
  const at::Tensor in_range = group_index.ge(0).logical_and(group_index.lt(G));
  gr.slot = at::where(in_range, group_index, at::full({}, G, group_index.options()));
  const at::Tensor& slot = gr.slot;
  if (capturable) {
    walk_groups_static(in, out, labels, gr, coef_kl, chunk_size, nonlinear);
  } else {
    walk_groups_packed(in, out, labels, gr, coef_kl, chunk_size, nonlinear);
  }

  // The loss from the complete sums.
  const at::Tensor S = at::zeros({G + 1}, in.f32).index_add_(0, slot, out.logp).narrow(0, 0, G).contiguous();
  const at::Tensor mean = S / denom;
  at::Tensor loss = (linear * mean + sigmoid * (2.0 / beta) * at::softplus(beta * (mean + shift))).sum();
  if (coef_kl) loss = loss + (out.kl * *coef_kl).sum();
  result.loss = loss;
  result.group_logp = S;
  result.tokens = std::move(out);
  return result;
}

std::tuple<at::Tensor, at::Tensor> fused_logprob(const at::Tensor& hidden, const at::Tensor& weight,
                                                 const OptTensor& bias, const at::Tensor& labels,
                                                 const OptTensor& ref_hidden, const OptTensor& ref_weight,
                                                 const OptTensor& ref_bias, int64_t chunk_size, bool capturable) {
  Outputs o = run(hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias, std::nullopt, std::nullopt,
                  chunk_size, capturable);
  return {o.logp, o.kl};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_logprob_backward(
    const at::Tensor& hidden, const at::Tensor& weight, const OptTensor& bias, const at::Tensor& labels,
    const OptTensor& ref_hidden, const OptTensor& ref_weight, const OptTensor& ref_bias,
    const at::Tensor& grad_logp, const OptTensor& grad_kl, int64_t chunk_size, bool capturable) {
  Outputs o = run(hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias, grad_logp, grad_kl, chunk_size,
                  capturable);
  return {o.grad_hidden, o.grad_weight, o.grad_bias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_linear_objective(
    const at::Tensor& hidden, const at::Tensor& weight, const OptTensor& bias, const at::Tensor& labels,
    const OptTensor& ref_hidden, const OptTensor& ref_weight, const OptTensor& ref_bias,
    const at::Tensor& coef_logp, const OptTensor& coef_kl, int64_t chunk_size) {
  Outputs o = run(hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias, coef_logp, coef_kl, chunk_size,
                  /*capturable=*/false, /*made_in_forward=*/true);
  at::Tensor loss = (o.logp * coef_logp).sum();
  if (coef_kl) loss = loss + (o.kl * *coef_kl).sum();
  return {loss, o.logp, o.kl, o.grad_hidden, o.grad_weight, o.grad_bias};
}

using SevenTensors = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

SevenTensors fused_group_objective(
    const at::Tensor& hidden, const at::Tensor& weight, const OptTensor& bias, const at::Tensor& labels,
    const at::Tensor& group_index, const at::Tensor& linear, const at::Tensor& sigmoid, const at::Tensor& shift,
    const at::Tensor& denom, double beta, const OptTensor& ref_hidden, const OptTensor& ref_weight,
    const OptTensor& ref_bias, const OptTensor& coef_kl, int64_t chunk_size, bool weight_grad, bool capturable,
    bool nonlinear) {
  GroupOutputs o = run_groups(hidden, weight, bias, labels, group_index, linear, sigmoid, shift, denom, beta,
                              ref_hidden, ref_weight, ref_bias, coef_kl, chunk_size, weight_grad, capturable,
                              nonlinear);
  return {o.loss, o.group_logp, o.tokens.logp, o.tokens.kl, o.tokens.grad_hidden, o.tokens.grad_weight,
          o.tokens.grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(unlearn_engine, CPU, m) {
  m.impl("fused_logprob", &fused_logprob);
  m.impl("fused_logprob_backward", &fused_logprob_backward);
  m.impl("fused_linear_objective", &fused_linear_objective);
  m.impl("fused_group_objective", &fused_group_objective);
}

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(unlearn_engine, CUDA, m) {
  m.impl("fused_logprob", &fused_logprob);
  m.impl("fused_logprob_backward", &fused_logprob_backward);
  m.impl("fused_linear_objective", &fused_linear_objective);
  m.impl("fused_group_objective", &fused_group_objective);
}
#endif

}  // namespace unlearn_engine
