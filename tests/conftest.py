import os

import pytest
import torch


class SimDevice(str):
    """The device parameter "sim": tensors live on the CPU and the ops run the CUDA kernels on the simulated CUDA
    execution model (unlearn_engine._C_sim, csrc/common/sim/). It equals "cpu", so tensors go to the CPU."""


SIM = SimDevice("cpu")


def is_sim(device) -> bool:
    return isinstance(device, SimDevice)


DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")),
    pytest.param(SIM, id="sim", marks=pytest.mark.sim),
]


def pytest_configure(config):
    config.addinivalue_line("markers", "sim: the CUDA kernels run on the simulator (unlearn_engine._C_sim)")


def pytest_collection_modifyitems(config, items):
    """UE_SIM_TIER=quick (the default: make test and CI) runs, of each test function's simulator cases, the first one
    per dtype (tests/test_cuda_sim.py runs whole): a simulated case costs seconds on one core, and every case would
    take CI's 2 cores well past its time. UE_SIM_TIER=full runs every case on the simulator."""
    if os.environ.get("UE_SIM_TIER", "quick") == "full":
        return
    seen, keep, drop = set(), [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if item.get_closest_marker("sim") is None or item.path.name == "test_cuda_sim.py":
            keep.append(item)
            continue
        if params.get("scheme", "gpu") != "gpu":  # skipped on the simulator anyway (test_weight_masking.cpu_choice)
            drop.append(item)
            continue
        key = (item.path, item.originalname, str(params.get("dtype")))
        (drop if key in seen else keep).append(item)
        seen.add(key)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def load_simulator():
    """unlearn_engine._C_sim, or the build at $UE_SIM_LIBRARY (make sanitize-sim: its ASan + UBSan variant)."""
    import importlib.util
    import os
    import sys

    path = os.environ.get("UE_SIM_LIBRARY")
    if not path:
        try:
            from unlearn_engine import _C_sim
        except ImportError as err:
            pytest.fail(f"unlearn_engine._C_sim is not built (make build, or setup.py build_ext --inplace): {err}")
        return _C_sim
    import unlearn_engine  # noqa: F401  (_C: the CPU ops that tests/test_cuda_sim.py compares with)

    if "unlearn_engine._C_sim" not in sys.modules:
        spec = importlib.util.spec_from_file_location("unlearn_engine._C_sim", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules["unlearn_engine._C_sim"] = module
    return sys.modules["unlearn_engine._C_sim"]


def _bit_views(value):
    """Every tensor in an op's output or arguments, as raw bytes (NaN payloads and -0.0 included)."""
    if isinstance(value, torch.Tensor):
        return [value.detach().reshape(-1).contiguous().view(torch.uint8)]
    if isinstance(value, (list, tuple)):
        return [v for item in value for v in _bit_views(item)]
    return []


def _clone(value):
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v) for v in value)
    return value


class SimulatedOps:
    """torch.ops.unlearn_engine_sim in place of torch.ops.unlearn_engine: each call runs twice, on copies of its
    arguments from one seed and on the arguments from the next (other block and thread orders, the other
    shared-memory fill), and the two outputs and in-place results must be bit-identical."""

    def __init__(self, sim):
        self._sim = sim
        self._ops = torch.ops.unlearn_engine_sim

    def __getattr__(self, name):
        op = getattr(self._ops, name)

        def run_twice(*args, **kwargs):
            seed = 2 * sum(self._sim.launches().values())  # new seeds as launches accumulate; even, then odd
            copies, copies_kw = _clone(args), _clone(kwargs)
            self._sim.configure(seed)
            first = op(*copies, **copies_kw)
            self._sim.configure(seed + 1)
            second = op(*args, **kwargs)
            pairs = (("output", first, second),
                     ("in-place arguments", [copies, list(copies_kw.values())], [args, list(kwargs.values())]))
            for what, a, b in pairs:
                a_bits, b_bits = _bit_views(a), _bit_views(b)
                assert len(a_bits) == len(b_bits) and all(torch.equal(x, y) for x, y in zip(a_bits, b_bits)), \
                    f"simulated {name}: the {what} differ between seeds {seed} and {seed + 1}"
            return second

        return run_twice


_SIM_AUTOGRAD = []


def _register_sim_autograd():
    """The simulator's ops get the autograd formulas of the real ones (the same Python functions), once."""
    if _SIM_AUTOGRAD:
        return
    import importlib

    fused_logprob = importlib.import_module("unlearn_engine.fused_logprob")  # the modules, not the facade's functions
    unlearning_loss = importlib.import_module("unlearn_engine.unlearning_loss")
    torch.library.register_autograd("unlearn_engine_sim::fused_logprob", fused_logprob._fused_logprob_backward,
                                    setup_context=fused_logprob._fused_logprob_setup)
    torch.library.register_autograd("unlearn_engine_sim::rmu_loss", unlearning_loss._rmu_backward,
                                    setup_context=unlearning_loss._rmu_setup)
    _SIM_AUTOGRAD.append(True)


# The modules that call the native ops (each through its module-level `ops`).
OPS_USERS = ("unlearn_engine.fused_logprob", "unlearn_engine.risk_projection", "unlearn_engine.unlearning_loss",
             "unlearn_engine.weight_masking", "unlearn_engine")


@pytest.fixture(autouse=True)
def _simulated_kernels(request, monkeypatch):
    """For a test parametrised with the "sim" device: its ops run on the simulator."""
    if request.node.get_closest_marker("sim") is None:
        yield
        return
    import importlib

    proxy = SimulatedOps(load_simulator())
    _register_sim_autograd()
    for name in OPS_USERS:
        monkeypatch.setattr(importlib.import_module(name), "ops", proxy)
    yield


def assert_masked_steps_match_torch(params, mask, algorithm, make_grad, *, compact, rtol, steps=2):
    """ue.MaskedOptimizer on copies of `params` against torch.optim (AdamW or SGD, same hyper-parameters) with the
    unselected elements restored after each step (reference.masked_step_reference): equal after every step.
    make_grad(p) gives a fresh gradient like p."""
    import unlearn_engine as ue
    from unlearn_engine.reference import masked_step_reference

    dense = [mask.dense(i) for i in range(len(params))]
    kw = dict(lr=0.01, weight_decay=0.1) if algorithm == "adamw" else dict(lr=0.05, momentum=0.9, weight_decay=0.0)
    make = torch.optim.AdamW if algorithm == "adamw" else torch.optim.SGD
    ref, ours = [p.clone().requires_grad_() for p in params], [p.clone() for p in params]
    torch_opt = make(ref, foreach=False, **kw)
    opt = ue.MaskedOptimizer(ours, mask, algorithm=algorithm, compact_state=compact, **kw)
    for _ in range(steps):
        grads = [make_grad(p) for p in params]
        for r, o, gr in zip(ref, ours, grads):
            r.grad, o.grad = gr.clone(), gr.clone()
        opt.step()
        masked_step_reference(torch_opt, ref, dense)
        for r, o in zip(ref, ours):
            torch.testing.assert_close(o, r.detach(), rtol=rtol, atol=1e-6)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


TOY_WORDS = ("how to make a bomb kill steal hack the recipe for bread cake step one two three mix bake "
             "what is tell me about poison weapon drug cookies water flour sugar").split()


@pytest.fixture(scope="session")
def toy_tokenizer():
    from unlearn_engine.api.demo.toy import word_tokenizer
    return word_tokenizer(TOY_WORDS)


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory, toy_tokenizer):
    """A tiny LLaVA built from transformers configs, saved as safetensors (single file) with its tokenizer."""
    import unlearn_engine as ue
    from unlearn_engine.api.demo.toy import tiny_llava

    path = tmp_path_factory.mktemp("ckpt") / "tiny-llava"
    ue.save_vlm(tiny_llava(toy_tokenizer).float(), str(path), processor=toy_tokenizer)
    return path
