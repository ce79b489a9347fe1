"""RiskAwareness on a tiny LLaVA loaded through our loader: only visual tokens change; detach restores."""
import pytest
import torch

import unlearn_engine as ue


@pytest.fixture()
def model_and_tok(tiny_llava_dir):
    return ue.load_vlm(str(tiny_llava_dir), dtype="float32")


def _inputs(model, text_len=6):
    image_id = model.config.image_token_id
    ids = torch.tensor([[2] + [image_id] * 4 + list(range(9, 9 + text_len))])
    return dict(input_ids=ids, pixel_values=torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(2)))


def _layer0_input(model, inputs):
    captured = {}
    layer0 = model.model.language_model.layers[0]
    def grab(module, args, kwargs):
        captured.setdefault("h", (args[0] if args else kwargs["hidden_states"]).clone())

    handle = layer0.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        logits = model(**inputs).logits
    handle.remove()
    return captured["h"], logits


@pytest.mark.parametrize("mode,options", [("subspace", dict(top_fraction=0.5, strength=3.0)),
                                          ("subspace", dict(threshold=0.0, strength=1.0)),
                                          ("prototypes", dict(threshold=-1.0, strength=0.5))])
def test_hooks_change_only_visual_tokens_and_detach_restores(model_and_tok, mode, options):
    model, tok = model_and_tok
    inputs = _inputs(model)
    base_h, base_logits = _layer0_input(model, inputs)
    rai = ue.RiskAwareness(model, tokenizer=tok, rank=4, mode=mode, **options)
    with rai:
        assert rai.attached
        h, logits = _layer0_input(model, inputs)
    visual = inputs["input_ids"][0] == model.config.image_token_id
    assert not torch.equal(h[0, visual], base_h[0, visual])
    assert torch.equal(h[0, ~visual], base_h[0, ~visual])  # text tokens bit-identical
    assert len(rai.records) == 1 and rai.records[0].shape == (1, 4)
    after_h, after_logits = _layer0_input(model, inputs)
    assert not rai.attached
    assert torch.equal(after_h, base_h) and torch.equal(after_logits, base_logits)


@pytest.mark.parametrize("mode,options", [("subspace", dict(top_fraction=0.3, strength=3.0)),
                                          ("subspace", dict(top_fraction=0.25, strength=-0.5)),
                                          ("subspace", dict(threshold=0.09, strength=2.0)),
                                          ("prototypes", dict(threshold=0.25, strength=0.5))])
def test_hooked_visual_tokens_equal_reference_projection(model_and_tok, mode, options):
    """Catches a flipped strength sign or top_fraction being ignored: the first decoder layer sees exactly the
    reference projection of the unhooked projector output, with ceil(top_fraction * T) tokens amplified."""
    import math

    from unlearn_engine.reference import risk_project_reference, risk_prototypes_reference

    model, tok = model_and_tok
    inputs = _inputs(model)
    raw = {}
    # registered before RAI's hook, so it sees the projector output before RAI rewrites it
    grab = model.model.multi_modal_projector.register_forward_hook(
        lambda module, args, output: raw.setdefault("x", output.detach().clone()))
    rank = 4
    rai = ue.RiskAwareness(model, tokenizer=tok, rank=rank, mode=mode, **options)
    try:
        with rai:
            h, _ = _layer0_input(model, inputs)
    finally:
        grab.remove()
    x = raw["x"]  # (1, T, H): one image's visual tokens
    rows = ue.concept_embeddings(tok, model.get_input_embeddings().weight)  # the default unsafe keywords
    if mode == "subspace":
        basis = ue.unsafe_subspace(rows, rank)
        torch.testing.assert_close(rai.basis, basis)
        expected, scores = risk_project_reference(x, basis, **options)
    else:
        expected, scores = risk_prototypes_reference(x, rows, **options)
    visual = inputs["input_ids"][0] == model.config.image_token_id
    torch.testing.assert_close(h[0, visual], expected[0], rtol=1e-5, atol=1e-5)
    assert len(rai.records) == 1
    torch.testing.assert_close(rai.records[0], scores, rtol=1e-5, atol=1e-6)
    changed = int((h[0, visual] != x[0]).any(-1).sum())
    t = x.shape[1]
    if "top_fraction" in options:
        assert changed == math.ceil(options["top_fraction"] * t), (changed, t, scores)
        top = torch.sort(scores[0], descending=True, stable=True).indices[:changed]
        assert bool((h[0, visual][top] != x[0][top]).any(-1).all()), "the amplified tokens are not the top-scored ones"
    else:
        selected = scores >= options["threshold"] if mode == "subspace" else scores > options["threshold"]
        assert changed == int(selected.sum()) and 0 < changed < t, (changed, t, scores)


def test_generation_runs_with_hooks(model_and_tok):
    model, tok = model_and_tok
    inputs = _inputs(model)
    with ue.RiskAwareness(model, tokenizer=tok, rank=2, top_fraction=0.25, strength=2.0) as rai:
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, min_new_tokens=4)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4
    assert len(rai.records) == 1  # the projector ran once: prefill only


def test_model_without_visual_tokens(toy_tokenizer):
    import transformers

    lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=len(toy_tokenizer), hidden_size=16,
                                                                intermediate_size=32, num_hidden_layers=1,
                                                                num_attention_heads=2))
    with pytest.raises(ValueError, match="no detectable visual tokens"):
        ue.RiskAwareness(lm, tokenizer=toy_tokenizer)


def test_concept_embeddings_average_known_keywords(model_and_tok):
    model, tok = model_and_tok
    E = model.get_input_embeddings().weight
    rows = ue.concept_embeddings(tok, E, ["bomb", "zzz-unknown", "kill"])
    assert rows.shape == (2, E.shape[1])
    torch.testing.assert_close(rows[0], E[tok.convert_tokens_to_ids("bomb")].float())
    with pytest.raises(ValueError, match="none of the keywords"):
        ue.concept_embeddings(tok, E, ["zzz-unknown"])
