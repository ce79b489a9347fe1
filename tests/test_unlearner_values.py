"""The Unlearner's losses pinned to exact values, computed independently of the fused path (full logits of the
model's own forward, eager log_softmax): NPO temperature and weights, the textual recipe's 0.5/1/1 weights,
RMU without padding positions; and exact resume restores the RNG state."""
import math
import random

import pytest
import torch

import unlearn_engine as ue
from unlearn_engine.api.data import encode

# Unequal lengths on purpose: the batch is right-padded, so padding positions exist.
FORGET = [ue.Record("how to make a bomb", "step one mix poison", "forget"),
          ue.Record("tell me about the weapon", "step one mix drug step two bake the poison", "forget"),
          ue.Record("how to hack", "steal", "forget")]
RETAIN = [ue.Record("the recipe for bread", "mix flour water bake", "retain"),
          ue.Record("what is cake", "cake is sugar flour water and one two three cookies", "retain"),
          ue.Record("tell me about cookies", "sugar", "retain")]


def _load(tiny_llava_dir):
    return ue.load_vlm(str(tiny_llava_dir), dtype="float32")


@torch.no_grad()
def _nll(model, tok, records):
    """Per-record mean response NLL from the model's full logits (no fused op involved)."""
    batch = encode(records, tok)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    logp = torch.log_softmax(logits[:, :-1], -1)
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    token = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * keep
    return -(token.sum(1) / keep.sum(1))


def _step1_loss(model, tok, forget, retain, **config):
    unlearner = ue.Unlearner(model, tok, steps=1, lr=1e-3, batch_size=8, progress=False, **config)
    history = unlearner.fit(forget, retain)
    return history[0], unlearner


@pytest.mark.parametrize("beta", [0.1, 0.7])
def test_npo_step1_loss_uses_beta_and_weights(tiny_llava_dir, beta):
    """Catches NPO ignoring beta (or the forget/retain weights): at step 1 the model equals its frozen
    reference, so each forget term is (2/beta) ln 2 and loss = fw * (2/beta) ln 2 + rw * mean retain NLL."""
    model, tok = _load(tiny_llava_dir)
    retain_nll = _nll(model, tok, RETAIN)
    forget_nll = _nll(model, tok, FORGET)
    fw, rw = 0.7, 1.3
    record, _ = _step1_loss(model, tok, FORGET, RETAIN, method="npo", beta=beta, forget_weight=fw,
                            retain_weight=rw)
    expected = fw * (2 / beta) * math.log(2) + rw * float(retain_nll.mean())
    assert record["loss"] == pytest.approx(expected, rel=1e-5), (beta, record, expected)
    assert record["retain_nll"] == pytest.approx(float(retain_nll.mean()), rel=1e-5)
    assert record["forget_nll"] == pytest.approx(float(forget_nll.mean()), rel=1e-5)


def test_textual_step1_loss_weights(tiny_llava_dir):
    """Catches a wrong textual recipe weight (0.5 GA on harmful answers, 1 NLL on mismatched answers, 1 KL):
    step-1 loss = -0.5 * mean forget NLL + mean NLL of (forget prompt, a retain answer) + KL (0 at step 1)."""
    model, tok = _load(tiny_llava_dir)
    answer = "mix flour water bake"  # every retain answer is the same, so the mismatch pick is irrelevant
    retain = [ue.Record(r.prompt, answer, "retain") for r in RETAIN]
    forget_nll = _nll(model, tok, FORGET)
    mismatch_nll = _nll(model, tok, [ue.Record(r.prompt, answer, "retain") for r in FORGET])
    record, _ = _step1_loss(model, tok, FORGET, retain, method="textual")
    expected = -0.5 * float(forget_nll.mean()) + 1.0 * float(mismatch_nll.mean())
    assert record["loss"] == pytest.approx(expected, rel=1e-5, abs=1e-6), (record, expected)
    assert record["forget_nll"] == pytest.approx(float(forget_nll.mean()), rel=1e-5)


def _layer_outputs(model, batch, layer):
    """Output of decoder layer `layer` for the batch (captured by a hook, not through output_hidden_states)."""
    captured = {}

    def grab(module, args, output):
        captured["h"] = (output[0] if isinstance(output, tuple) else output).detach().double()

    handle = model.model.language_model.layers[layer].register_forward_hook(grab)
    try:
        with torch.no_grad():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        handle.remove()
    return captured["h"]


def _pooled_nll(model, tok, records):
    """The token-mean response NLL over all of `records` (one pool, as HF's model loss), from full logits."""
    sums, counts = _token_nll(model, tok, records)
    return float(sums.sum() / counts.sum())


@pytest.mark.parametrize("layer,nll_weight", [(0, 0.0), (1, 0.0), (1, 0.5)])
def test_rmu_step1_loss_excludes_padding(tiny_llava_dir, layer, nll_weight):
    """Catches RMU counting padding positions (forget or retain term), or steering anything but the decoder
    layer's own output (layer 1 is the last: hidden_states[2] there is the final norm's): step-1 loss equals
    mean over real forget tokens of (a - c)^2 + alpha * mean over real retain tokens of (a - a_ref)^2
    (+ rmu_nll_weight * the retain samples' pooled NLL)."""
    model, tok = _load(tiny_llava_dir)
    ref, _ = _load(tiny_llava_dir)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # a reference that differs, so the retain term is not 0 at step 1
        for p in ref.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    batch = encode(list(FORGET) + list(RETAIN), tok)
    mask = batch["attention_mask"].bool()
    assert not mask.all(), "the records must have unequal lengths so that padding exists"
    acts, ref_acts = _layer_outputs(model, batch, layer), _layer_outputs(ref, batch, layer)
    retain_nll = _pooled_nll(model, tok, RETAIN)
    alpha, coeff = 10.0, 1.0  # a small control keeps the forget term from swamping the retain term
    unlearner = ue.Unlearner(model, tok, ref_model=ref, method="rmu", rmu_layer=layer, rmu_coeff=coeff,
                             rmu_alpha=alpha, rmu_nll_weight=nll_weight, steps=1, lr=1e-3, batch_size=8,
                             progress=False)
    record = unlearner.fit(FORGET, RETAIN)[0]
    control = unlearner.method.control(unlearner).double()
    assert float(control.norm()) == pytest.approx(coeff, rel=1e-5) and bool((control >= 0).all())
    n_f = len(FORGET)
    forget_term = (acts[:n_f][mask[:n_f]] - control).pow(2).mean()
    retain_term = (acts[n_f:][mask[n_f:]] - ref_acts[n_f:][mask[n_f:]]).pow(2).mean()
    expected = float(forget_term + alpha * retain_term) + nll_weight * retain_nll
    assert record["loss"] == pytest.approx(expected, rel=1e-5), (record, expected)
    assert ("retain_nll" in record) == (nll_weight > 0)


def test_resume_restores_rng_state(tiny_llava_dir, tmp_path):
    """Catches resume skipping the RNG restore: after a resumed run the torch and Python RNG states (and the
    weights) equal those of the uninterrupted run."""
    common = dict(method="gd", lr=3e-3, batch_size=2, checkpoint_every=2, progress=False)

    def run(steps, out_dir, seed, resume=False):
        torch.manual_seed(seed)
        random.seed(seed)
        model, tok = _load(tiny_llava_dir)
        ue.Unlearner(model, tok, steps=steps, out_dir=str(out_dir), **common).fit(FORGET, RETAIN, resume=resume)
        torch.rand(1)  # advance past the restored state, so both runs leave the same trace if it was restored
        return model, torch.get_rng_state(), random.getstate()

    straight, rng_straight, py_straight = run(4, tmp_path / "straight", seed=11)
    run(2, tmp_path / "killed", seed=11)  # "killed" right after its step-2 checkpoint
    resumed, rng_resumed, py_resumed = run(4, tmp_path / "killed", seed=999, resume=True)
    assert torch.equal(rng_resumed, rng_straight), "torch RNG state not restored on resume"
    assert py_resumed == py_straight, "Python RNG state not restored on resume"
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


@torch.no_grad()
def _token_nll(model, tok, records):
    """(per-record NLL sums, per-record labelled-token counts) from the model's full logits."""
    batch = encode(records, tok)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    token = torch.log_softmax(logits[:, :-1], -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * keep
    return -token.sum(1), keep.sum(1)


def test_presets_step1_loss(tiny_llava_dir):
    """Catches the Unlearner dropping the preset (or its retain-side reference values): at step 1 the model equals
    its reference. safety-mirage NPO: (2/0.9) ln 2 for the pooled forget group, -1 * (2/0.9) ln 2 for the pooled
    retain group, + the retain NLL pooled over tokens. open-unlearning SimNPO: 0.125 * mean over forget samples of
    (2/4.5) softplus(4.5 m_b) + the pooled retain NLL."""
    model, tok = _load(tiny_llava_dir)
    r_sum, r_n = _token_nll(model, tok, RETAIN)
    f_sum, f_n = _token_nll(model, tok, FORGET)
    pooled_retain = float(r_sum.sum() / r_n.sum())
    record, unlearner = _step1_loss(model, tok, FORGET, RETAIN, method="npo", preset="safety-mirage")
    assert unlearner.config.retain_npo_weight == 1.0 and unlearner.config.beta == 0.9
    assert record["loss"] == pytest.approx(pooled_retain, rel=1e-5)  # +-(2/beta) ln 2 cancel
    model, tok = _load(tiny_llava_dir)
    record, _ = _step1_loss(model, tok, FORGET, RETAIN, method="npo", preset="safety-mirage", retain_npo_weight=0.5)
    assert record["loss"] == pytest.approx(0.5 * (2 / 0.9) * math.log(2) + pooled_retain, rel=1e-5)
    model, tok = _load(tiny_llava_dir)
    record, _ = _step1_loss(model, tok, FORGET, RETAIN, method="simnpo", preset="open-unlearning")
    simnpo = (2 / 4.5) * torch.nn.functional.softplus(4.5 * (-f_sum / f_n))
    assert record["loss"] == pytest.approx(0.125 * float(simnpo.mean()) + pooled_retain, rel=1e-5)


def test_open_unlearning_npo_step1_uses_summed_reference(tiny_llava_dir):
    """open-unlearning NPO against a reference that differs from the model: per forget sample
    (2/0.1) softplus(0.1 (S_b - S_ref,b)) with S the summed log-likelihood, so the precomputed reference values must
    be sums too (catches them being computed as token means)."""
    model, tok = _load(tiny_llava_dir)
    ref, _ = _load(tiny_llava_dir)
    with torch.no_grad():
        for p in ref.parameters():
            p.mul_(0.9)
    f_sum, _ = _token_nll(model, tok, FORGET)
    ref_sum, _ = _token_nll(ref, tok, FORGET)
    r_sum, r_n = _token_nll(model, tok, RETAIN)
    unlearner = ue.Unlearner(model, tok, ref_model=ref, method="npo", preset="open-unlearning", steps=1, lr=1e-3,
                             batch_size=8, progress=False)
    record = unlearner.fit(FORGET, RETAIN)[0]
    npo = (2 / 0.1) * torch.nn.functional.softplus(0.1 * (-f_sum + ref_sum))
    assert record["loss"] == pytest.approx(float(npo.mean() + r_sum.sum() / r_n.sum()), rel=1e-5)
