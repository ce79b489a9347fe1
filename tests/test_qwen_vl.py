"""Qwen2-VL and Qwen2.5-VL as the second VLM family, on tiny configs saved as safetensors: load/save (single
file and sharded), the supported-architecture refusal, every unlearning method, RAI on the patch merger."""
import json

import pytest
import torch

import unlearn_engine as ue
from unlearn_engine.api.demo.toy import qwen_tokenizer, tiny_qwen2_vl
from unlearn_engine.api.loading import SUPPORTED_VLMS
from unlearn_engine.api.methods import multimodal_projector

WORDS = "how to make a bomb weapon poison drug bread cake cookies step one mix two flour sugar water".split()
FORGET = [ue.Record(f"how to make a {w}", f"step one mix {a} step two {b}", "forget")
          for w, a, b in [("bomb", "poison", "weapon"), ("weapon", "drug", "poison")]]
RETAIN = [ue.Record(f"how to make a {w}", f"step one mix {a} step two {b}", "retain")
          for w, a, b in [("bread", "flour", "water"), ("cake", "sugar", "flour")]]
VERSIONS = {"2": "Qwen2VLForConditionalGeneration", "2.5": "Qwen2_5_VLForConditionalGeneration"}


@pytest.fixture(scope="module")
def qwen_tok():
    return qwen_tokenizer(WORDS)


@pytest.fixture(scope="module", params=list(VERSIONS))
def qwen_dir(request, tmp_path_factory, qwen_tok):
    path = tmp_path_factory.mktemp(f"qwen{request.param}") / "model"
    ue.save_vlm(tiny_qwen2_vl(qwen_tok, version=request.param), str(path), processor=qwen_tok)
    return request.param, path


def _inputs(model, tok):
    """One 16x16 image: a 4x4 grid of 4x4 patches merged 2x2 -> 4 visual tokens, then text."""
    c = model.config
    ids = torch.tensor([[tok.bos_token_id, c.vision_start_token_id] + [c.image_token_id] * 4
                        + [c.vision_end_token_id] + tok.convert_tokens_to_ids(["how", "to", "make", "bomb"])])
    pixels = torch.randn(16, 3 * 2 * 4 * 4, generator=torch.Generator().manual_seed(1))
    return dict(input_ids=ids, pixel_values=pixels, image_grid_thw=torch.tensor([[1, 4, 4]]),
                mm_token_type_ids=(ids == c.image_token_id).int())


def test_roundtrip_single_and_sharded(qwen_dir, qwen_tok, tmp_path):
    version, path = qwen_dir
    model, tok = ue.load_vlm(str(path), dtype="float32")
    assert type(model).__name__ == VERSIONS[version] and not model.training
    assert tok.convert_tokens_to_ids("<|image_pad|>") == model.config.image_token_id
    fresh = tiny_qwen2_vl(qwen_tok, version=version)  # same seed, same weights
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    ue.save_vlm(model, str(tmp_path / "sharded"), max_shard_bytes=30_000)
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    sharded, _ = ue.load_vlm(str(tmp_path / "sharded"), dtype="float32")
    with torch.no_grad():
        want = fresh(**_inputs(fresh, tok)).logits
        assert torch.equal(model(**_inputs(model, tok)).logits, want)
        assert torch.equal(sharded(**_inputs(sharded, tok)).logits, want)
    bf16, _ = ue.load_vlm(str(tmp_path / "sharded"), dtype="bfloat16")
    assert next(bf16.parameters()).dtype == torch.bfloat16


def test_supported_list_and_refusal(tmp_path):
    assert {"llava", "qwen2_vl", "qwen2_5_vl"} <= set(SUPPORTED_VLMS)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "paligemma"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ue.CheckpointError, match=r"model_type='paligemma' is a vision-language model .*"
                                                 r"supported: llava .*qwen2_vl .*qwen2_5_vl"):
        ue.load_vlm(str(tmp_path))


def test_projector_is_the_merger(qwen_dir):
    model, _ = ue.load_vlm(str(qwen_dir[1]), dtype="float32")
    assert multimodal_projector(model) is model.model.visual.merger
    assert ue.api.rai.find_projector(model) == ("model.visual.merger", model.model.visual.merger)


@pytest.mark.parametrize("method,extra", [("ga", {}), ("gd", {}), ("npo", {"beta": 0.5}), ("kl", {}),
                                          ("rmu", {"rmu_coeff": 20.0, "rmu_alpha": 10.0, "rmu_layer": 1}),
                                          ("textual", {})])
def test_each_method_runs_through_the_fused_loss(qwen_dir, method, extra):
    model, tok = ue.load_vlm(str(qwen_dir[1]), dtype="float32")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    nll_f, nll_r = ue.mean_nll(model, tok, FORGET), ue.mean_nll(model, tok, RETAIN)
    history = ue.Unlearner(model, tok, method=method, steps=2, lr=1e-2, batch_size=2, progress=False,
                           **extra).fit(FORGET, RETAIN)
    # step 1, model == its reference: KL is 0, NPO's per-sample term is (2/beta) ln 2
    want = {"ga": -nll_f, "gd": -nll_f + nll_r, "npo": 4 * torch.log(torch.tensor(2.0)).item() + nll_r,
            "kl": -nll_f}.get(method)
    if want is not None:
        assert history[0]["loss"] == pytest.approx(want, rel=1e-5, abs=1e-5)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert not any(k.startswith("model.visual.blocks") for k in changed)  # the vision encoder is never trained
    assert any(k.startswith("model.language_model.") for k in changed)


def _layer0_input(model, inputs):
    captured = {}

    def grab(module, args, kwargs):
        captured.setdefault("h", (args[0] if args else kwargs["hidden_states"]).clone())

    handle = model.model.language_model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    return captured["h"]


def test_rai_on_the_merger_equals_reference_projection(qwen_dir):
    """Only the visual tokens change, and they are exactly the reference projection of the merger output
    (Qwen2.5-VL reorders the merger's rows by its window index afterwards: compared as sets of rows)."""
    from unlearn_engine.reference import risk_project_reference

    model, tok = ue.load_vlm(str(qwen_dir[1]), dtype="float32")
    inputs = _inputs(model, tok)
    base = _layer0_input(model, inputs)
    raw = {}
    grab = model.model.visual.merger.register_forward_hook(lambda m, a, out: raw.setdefault("x", out.clone()))
    options = dict(top_fraction=0.5, strength=3.0)
    rai = ue.RiskAwareness(model, tokenizer=tok, rank=4, **options)
    try:
        with rai:
            h = _layer0_input(model, inputs)
    finally:
        grab.remove()
    visual = inputs["input_ids"][0] == model.config.image_token_id
    assert torch.equal(h[0, ~visual], base[0, ~visual])  # text tokens bit-identical
    expected, scores = risk_project_reference(raw["x"][None], rai.basis, **options)
    got, want = h[0, visual], expected[0]
    order = lambda t: t[torch.argsort(t[:, 0])]  # noqa: E731
    torch.testing.assert_close(order(got), order(want), rtol=1e-5, atol=1e-5)
    assert int((want != raw["x"]).any(-1).sum()) == 2  # ceil(0.5 * 4) tokens amplified
    assert len(rai.records) == 1 and rai.records[0].shape == (1, 4)
    assert torch.equal(_layer0_input(model, inputs), base)  # detached: back to the original


def test_image_tokens_per_image_size(qwen_dir):
    """One token per 2x2 merged 4x4 patches: the count the model checks against its <|image_pad|> tokens."""
    from unlearn_engine.api.data import image_tokens

    model, tok = ue.load_vlm(str(qwen_dir[1]), dtype="float32")
    assert image_tokens(model, (16, 16)) == 4 and image_tokens(model, (16, 24)) == 6
    inputs = _inputs(model, tok)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == image_tokens(model, (16, 16))
    assert image_tokens(model) == 0  # no fixed count: each encoded image carries its own
    with pytest.raises(ValueError, match=r"multiples of patch_size \* spatial_merge_size = 8, got \(12, 16\)"):
        image_tokens(model, (12, 16))


def test_generate_with_an_image(qwen_dir):
    """Greedy decoding on an image prompt (the inputs evaluation.generate would have to pass: pixel patches,
    image_grid_thw, mm_token_type_ids): its first token is the forward's argmax, and RAI's hook runs in
    prefill only (decoding steps reuse the cache and never run the merger)."""
    model, tok = ue.load_vlm(str(qwen_dir[1]), dtype="float32")
    inputs = _inputs(model, tok)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
        step = model(**inputs).logits[0, -1].argmax()
    assert out.shape == (1, inputs["input_ids"].shape[1] + 4) and out[0, inputs["input_ids"].shape[1]] == step
    with ue.RiskAwareness(model, tokenizer=tok, rank=4, top_fraction=0.5) as rai:
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert len(rai.records) == 1
