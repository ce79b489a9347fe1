"""reference_device='cpu': the frozen reference of KL, textual and RMU held in host memory, each module's weights
copied to the compute device only while it runs; same results as the on-device reference. RMU with rmu_alpha 0
keeps no reference at all."""
import copy

import pytest
import torch
from test_unlearner_reference import FORGET, RETAIN

import unlearn_engine as ue
from unlearn_engine.api.cli import build_parser
from unlearn_engine.api.offload import cpu_reference, stream_weights


@pytest.fixture(scope="module")
def base(tiny_llava_dir):
    return ue.load_vlm(str(tiny_llava_dir), dtype="float32")


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, vocab_size=50,
                                        num_attention_heads=2, num_key_value_heads=2)).eval()


def _devices(model):
    return {t.device.type for t in list(model.parameters()) + list(model.buffers())}


@torch.no_grad()
def test_stream_weights_moves_each_module_only_while_it_runs():
    """Catches a module (or a buffer) left out of the streaming, weights left on the device after the forward, or
    left there when a hook stops the forward early (RMU's layer_output): computing on the meta device, any tensor
    not moved makes the forward fail with a device mismatch, and after it every tensor is back on the CPU."""
    model = stream_weights(_tiny_llama(), "meta")
    seen = {}  # what each module's own parameters and buffers are while it runs (pre-hooks run after streaming's)

    def record(module, args, name):
        seen[name] = {t.device.type for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))}

    for name, module in model.named_modules():
        module.register_forward_pre_hook(lambda m, args, name=name: record(m, args, name))
    ids = torch.zeros(1, 5, dtype=torch.long, device="meta")
    assert model(input_ids=ids).logits.device.type == "meta"
    assert _devices(model) == {"cpu"}
    assert {name: kinds for name, kinds in seen.items() if kinds - {"meta"}} == {}
    assert "model.rotary_emb" in seen and seen["model.rotary_emb"] == {"meta"}  # a module with only a buffer

    class Stop(Exception):
        pass

    def stop(module, args, output):
        raise Stop

    # a module with its own tensors whose child's hook stops the forward (as CLIP's embeddings, which own the class
    # embedding and call their patch embedding; RMU's layer_output stops a forward the same way)
    outer = torch.nn.Module()
    outer.scale, outer.inner = torch.nn.Parameter(torch.ones(3)), torch.nn.Linear(3, 3)
    outer.forward = lambda x: outer.inner(x) * outer.scale
    stream_weights(outer, "meta")
    outer.inner.register_forward_hook(stop)
    with pytest.raises(Stop):
        outer(torch.zeros(2, 3, device="meta"))
    assert _devices(outer) == {"cpu"}, "a forward stopped by a hook left weights on the device"


def test_cpu_reference_is_a_separate_frozen_copy():
    """Catches a reference sharing storage with the model (it would move as the model trains) or untied weights."""
    model = _tiny_llama()
    model.lm_head.weight = model.model.embed_tokens.weight  # tied: the copy keeps them tied
    ref = cpu_reference(model, "cpu")
    assert not any(p.requires_grad for p in ref.parameters()) and not ref.training
    assert ref.lm_head.weight is ref.model.embed_tokens.weight
    mine = {p.data_ptr() for p in model.parameters()}
    assert not any(p.data_ptr() in mine for p in ref.parameters())
    for a, b in zip(model.state_dict().values(), ref.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("method", ["kl", "textual", "rmu"])
def test_cpu_reference_gives_the_on_device_results(base, method):
    """Catches a CPU-held reference that is not the starting model (shared with the trained one, a stale or wrong
    copy) or not used: 3 steps with reference_device='cpu' end with the losses and weights of the on-device run."""
    runs = {}
    for where in ("model", "cpu"):
        model = copy.deepcopy(base[0])
        run = ue.Unlearner(model, base[1], method=method, steps=3, lr=1e-2, batch_size=2, reference_device=where,
                           progress=False)
        assert run.ref_model is not None and _devices(run.ref_model) == {"cpu"}
        runs[where] = (run.fit(FORGET, RETAIN), model.state_dict())
    (hist_a, state_a), (hist_b, state_b) = runs["model"], runs["cpu"]
    assert [h["loss"] for h in hist_a] == [h["loss"] for h in hist_b]
    assert any(not torch.equal(state_a[k], base[0].state_dict()[k]) for k in state_a), "nothing trained"
    differ = [k for k in state_a if not torch.equal(state_a[k], state_b[k])]
    assert not differ, differ[:5]


def test_rmu_without_retain_term_keeps_no_reference(base):
    """Catches RMU deep-copying the frozen model when rmu_alpha is 0 (it never runs it then)."""
    model, tok = copy.deepcopy(base[0]), base[1]
    assert ue.Unlearner(model, tok, method="rmu", rmu_alpha=0.0, progress=False).ref_model is None
    assert ue.Unlearner(model, tok, method="rmu", rmu_alpha=1.0, progress=False).ref_model is not None


def test_reference_device_setting_and_flag():
    """Catches the setting missing from the CLI or accepting an unknown place."""
    args = build_parser().parse_args(["unlearn", "--model", "m", "--forget", "f.jsonl", "--out", "o",
                                      "--reference-device", "cpu"])
    assert args.reference_device == "cpu"
    with pytest.raises(ValueError, match="reference_device must be one of"):
        ue.UnlearnConfig(reference_device="disk").validate()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_reference_holds_no_gpu_memory(base):
    """On a GPU: the CPU-held reference adds no device memory after construction, and KL's steps equal the
    on-device reference's to round-off."""
    results = {}
    for where in ("model", "cpu"):
        model = copy.deepcopy(base[0]).cuda()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        run = ue.Unlearner(model, base[1], method="kl", steps=2, lr=1e-2, batch_size=2, reference_device=where,
                           progress=False)
        added = torch.cuda.memory_allocated() - before
        size = sum(p.numel() * p.element_size() for p in model.parameters())
        assert added == 0 if where == "cpu" else added >= size
        results[where] = [h["loss"] for h in run.fit(FORGET, RETAIN)]
    assert results["cpu"] == pytest.approx(results["model"], rel=1e-5)
