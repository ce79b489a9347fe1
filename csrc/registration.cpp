// The one place where unlearn_engine's operators are declared (TORCH_LIBRARY) and where the
// Python module unlearn_engine._C reports how it was built. Kernels register their CPU/CUDA
// implementations next to their sources with TORCH_LIBRARY_IMPL.
#include <Python.h>
#include <pybind11/pybind11.h>
#include <torch/library.h>

#if defined(WITH_CUDA) && !defined(UE_SIM)
#include <cuda_runtime_api.h>
#endif

#ifndef UE_VERSION
#define UE_VERSION "unknown"
#endif

TORCH_LIBRARY(unlearn_engine, m) {
  // Family 1: fused per-sample unlearning loss (csrc/unlearning_loss).
  m.def("fused_logprob(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, Tensor? ref_hidden, "
        "Tensor? ref_weight, Tensor? ref_bias, int chunk_size, bool capturable=False) -> (Tensor logp, Tensor kl)");
  m.def("fused_logprob_backward(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, Tensor? ref_hidden, "
        "Tensor? ref_weight, Tensor? ref_bias, Tensor grad_logp, Tensor? grad_kl, int chunk_size, "
        "bool capturable=False) -> (Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)");
  m.def("fused_linear_objective(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, Tensor? ref_hidden, "
        "Tensor? ref_weight, Tensor? ref_bias, Tensor coef_logp, Tensor? coef_kl, int chunk_size) "
        "-> (Tensor loss, Tensor logp, Tensor kl, Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)");
  m.def("fused_group_objective(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, Tensor group_index, "
        "Tensor linear, Tensor sigmoid, Tensor shift, Tensor denom, float beta, Tensor? ref_hidden, "
        "Tensor? ref_weight, Tensor? ref_bias, Tensor? coef_kl, int chunk_size, bool weight_grad=True, "
        "bool capturable=False, bool nonlinear=True) -> "
        "(Tensor loss, Tensor group_logp, Tensor logp, Tensor kl, Tensor grad_hidden, Tensor grad_weight, "
        "Tensor grad_bias)");
  m.def("rmu_loss(Tensor forget_act, Tensor control, Tensor retain_act, Tensor retain_ref, float alpha) -> Tensor");
  m.def("rmu_loss_backward(Tensor grad, Tensor forget_act, Tensor control, Tensor retain_act, Tensor retain_ref, "
        "float alpha) -> (Tensor grad_forget, Tensor grad_retain)");

  // Family 2: visual-token risk projection, RAI (csrc/risk_projection). kind 0 = subspace, 1 = prototypes.
  m.def("risk_scores(Tensor x, Tensor basis, int kind) -> Tensor");
  m.def("risk_project_rows(Tensor x, Tensor basis, Tensor? select, int kind, float threshold, float strength) "
        "-> (Tensor out, Tensor scores)");
  m.def("risk_project_rows_(Tensor(a!) x, Tensor basis, Tensor? select, int kind, float threshold, "
        "float strength) -> Tensor scores");

  // Family 3: selective weight masking (csrc/weight_masking).
  m.def("topk_mask(Tensor[] tensors, int[] k, bool per_tensor) -> Tensor[]");
  m.def("masked_adamw_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
        "Tensor[] indices, bool compact_state, float lr, float beta1, float beta2, float eps, float weight_decay, "
        "int step, bool validate=True) -> ()");
  m.def("masked_sgd_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, Tensor[] indices, "
        "bool compact_state, float lr, float momentum, float dampening, float weight_decay, bool nesterov, "
        "bool first_step, bool validate=True) -> ()");
}

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["version"] = UE_VERSION;
#if defined(WITH_CUDA) && !defined(UE_SIM)
  info["cuda"] = true;
  info["cuda_version"] = std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION % 1000 / 10);
  info["cuda_arch_list"] = UE_CUDA_ARCH_LIST;
#else
  info["cuda"] = false;
  info["cuda_version"] = pybind11::none();
  info["cuda_arch_list"] = pybind11::none();
#endif
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  return info;
}

}  // namespace

#ifdef UE_SIM
void bind_simulator(pybind11::module_& m);  // csrc/common/sim/bindings.cpp
#endif

// _C, or _C_sim for the simulator build (its operators live under torch.ops.unlearn_engine_sim).
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "unlearn_engine native kernels (operators live under torch.ops.unlearn_engine)";
  m.def("build_info", &build_info, "How this extension was built: version, CUDA, arch list, OpenMP.");
#ifdef UE_SIM
  bind_simulator(m);
#endif
}
