"""Presets reproduce the peers' losses: for every (preset, method), a pure-PyTorch re-derivation of the peer's formula
(full logits of the model's own forward, the peer's own batching: a forget batch and a retain batch, each padded)
equals our loss and its gradients on the same samples (fp32, 1e-5 relative).

The peers' formulas, as their code computes them (issue 13; open-unlearning src/trainer/unlearn/*.py and
src/trainer/utils.py, Safety Mirage LLaVAUnlearnTrainer.training_step):
- model_loss(batch): the model's loss, the mean NLL over every labelled token of the batch (pooled);
- batch_nll(batch): per sample, the SUM of its labelled tokens' NLL (compute_batch_nll).
Our batch mixes them: forget samples of unequal answer lengths, retain samples of unequal lengths, an IGNORE sample
and an emptied forget sample (no labelled token) that the peer's batches do not hold (the peers give it a constant
NPO term or NaN; our contract leaves it out)."""
import copy
import dataclasses
import json
import re
import types

import pytest
import torch
import torch.nn.functional as F

import unlearn_engine as ue
from unlearn_engine.api.config import UnlearnConfig
from unlearn_engine.api.methods import PRESETS, RMU, language_model, resolve_settings
from unlearn_engine.api.unlearner import HeadLoss, Unlearner

transformers = pytest.importorskip("transformers")

VOCAB, T = 97, 12
# (role, prompt length, answer length) per sample; answer 0 = emptied (e.g. truncated away)
SAMPLES = [(ue.FORGET, 3, 5), (ue.FORGET, 4, 2), (ue.RETAIN, 2, 7), (ue.RETAIN, 5, 3), (ue.IGNORE, 2, 4),
           (ue.FORGET, 4, 0), (ue.FORGET, 2, 8)]


def tiny_llama(seed):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).float()


@pytest.fixture(scope="module")
def models():
    model = tiny_llama(0)
    ref = copy.deepcopy(model).requires_grad_(False).eval()
    with torch.no_grad():  # the reference differs from the model (as after some unlearning steps)
        g = torch.Generator().manual_seed(3)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.train(), ref


def make_batch(samples, tokens=None):
    """Right-padded (B, T) batch: prompt tokens unlabelled, answer tokens labelled, padding masked out; token ids
    drawn from `tokens` (a list) when given, else from 1..VOCAB-1."""
    g = torch.Generator().manual_seed(11)
    b = len(samples)
    input_ids = torch.zeros(b, T, dtype=torch.int64)
    attention = torch.zeros(b, T, dtype=torch.int64)
    labels = torch.full((b, T), -100)
    for i, (_, prompt, answer) in enumerate(samples):
        length = prompt + answer
        if tokens is None:
            input_ids[i, :length] = torch.randint(1, VOCAB, (length,), generator=g)
        else:
            input_ids[i, :length] = torch.tensor(tokens)[torch.randint(len(tokens), (length,), generator=g)]
        attention[i, :length] = 1
        labels[i, prompt:length] = input_ids[i, prompt:length]
    roles = torch.tensor([role for role, _, _ in samples])
    return dict(input_ids=input_ids, attention_mask=attention, labels=labels, roles=roles,
                role_list=[role for role, _, _ in samples])


def sub_batch(batch, role):
    """The peer's own batch of one role: the samples with at least one labelled token, re-padded to their length."""
    keep = [i for i, r in enumerate(batch["role_list"]) if r == role and (batch["labels"][i] != -100).any()]
    length = int(batch["attention_mask"][keep].sum(1).max())
    return {k: batch[k][keep, :length] for k in ("input_ids", "attention_mask", "labels")}


def token_nll(model, inputs):
    logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits[:, :-1].float()
    labels = inputs["labels"][:, 1:]
    nll = F.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
    return nll * (labels != -100), (labels != -100).sum(1)


def model_loss(model, inputs):
    """HF's model(**inputs).loss: the token mean over the whole batch."""
    nll, n = token_nll(model, inputs)
    return nll.sum() / n.sum()


def batch_nll(model, inputs):
    """open-unlearning compute_batch_nll: per sample, the sum of its tokens' NLL."""
    return token_nll(model, inputs)[0].sum(1)


# ----------------------------------------------------------------------------- the peers' formulas
def ou_grad_ascent(model, ref, f, r, hp):
    return -model_loss(model, f)


def ou_grad_diff(model, ref, f, r, hp):
    return hp["gamma"] * -model_loss(model, f) + hp["alpha"] * model_loss(model, r)


def ou_npo(model, ref, f, r, hp):
    with torch.no_grad():
        ref_nll = batch_nll(ref, f)
    lose_log_ratio = -(batch_nll(model, f) - ref_nll)
    forget = -2 / hp["beta"] * F.logsigmoid(hp["beta"] * (0.0 - lose_log_ratio)).mean()
    return hp["gamma"] * forget + hp["alpha"] * model_loss(model, r)


def ou_simnpo(model, ref, f, r, hp):
    nll, n = token_nll(model, f)
    forget = nll.sum(1) / n - hp["delta"]
    forget = -F.logsigmoid(hp["beta"] * forget).mean() * 2 / hp["beta"]
    return hp["gamma"] * forget + hp["alpha"] * model_loss(model, r)


def sm_npo(model, ref, f, r, hp):
    beta = hp["npo_beta"]
    with torch.no_grad():
        f_oracle, r_oracle = model_loss(ref, f), model_loss(ref, r)
    neg_log_ratios = model_loss(model, f) - f_oracle
    forget = hp["npo_forget_alpha"] * (-F.logsigmoid(beta * neg_log_ratios).mean() * 2 / beta)
    retain_neg_log_ratios = model_loss(model, r) - r_oracle
    retain = hp["npo_retain_alpha"] * (F.logsigmoid(beta * retain_neg_log_ratios).mean() * 2 / beta)
    return forget + retain + hp["npo_llava_loss_weight"] * model_loss(model, r)


# (preset, our forget, our retain, peer formula, the peer's hyper-parameters at their shipped defaults)
FUSED_CASES = [
    ("open-unlearning", "ga", None, ou_grad_ascent, {}),
    ("open-unlearning", "ga", "nll", ou_grad_diff, dict(gamma=1.0, alpha=1.0)),
    ("open-unlearning", "npo", "nll", ou_npo, dict(beta=0.1, gamma=1.0, alpha=1.0)),
    ("open-unlearning", "simnpo", "nll", ou_simnpo, dict(beta=4.5, delta=0.0, gamma=0.125, alpha=1.0)),
    ("safety-mirage", "npo", "nll", sm_npo, dict(npo_beta=0.9, npo_forget_alpha=1.0, npo_llava_loss_weight=1.0,
                                                 npo_retain_alpha=1.0)),
]


def with_ref_logp(batch, ref, forget_normalize, retain_normalize):
    """ref_logp (B,) for trainer_loss: each sample's reference in its group's normalize setting."""
    values = {n: ue.reference_logp(ref, batch["input_ids"], batch["labels"], normalize=n,
                                   attention_mask=batch["attention_mask"]) for n in ("mean", "sum")}
    pick = [values[retain_normalize if role == ue.RETAIN else forget_normalize][i]
            for i, role in enumerate(batch["role_list"])]
    return dict(batch, ref_logp=torch.stack(pick))


def grads_of(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    out = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    model.zero_grad(set_to_none=True)
    return out


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def assert_same_loss_and_grads(model, ours, peer):
    assert ours.item() == pytest.approx(peer.item(), rel=1e-5, abs=1e-7), (ours.item(), peer.item())
    ours_g, peer_g = grads_of(model, ours), grads_of(model, peer)
    assert ours_g.shape == peer_g.shape and peer_g.norm() > 0
    assert rel(ours_g, peer_g) < 1e-5, rel(ours_g, peer_g)


def our_trainer_loss(model, ref, batch, preset, forget, retain, **given):
    method = {("ga", None): "ga", ("ga", "nll"): "gd", ("npo", "nll"): "npo", ("simnpo", "nll"): "simnpo"}
    s = resolve_settings(method[(forget, retain)], preset, given)
    inputs = with_ref_logp(batch, ref, s["forget_normalize"], s["retain_normalize"])
    return ue.trainer_loss(model, inputs, forget=forget, retain=retain, preset=preset, **given)


@pytest.mark.parametrize("preset,forget,retain,peer,hp", FUSED_CASES,
                         ids=[f"{c[0]}-{c[3].__name__}" for c in FUSED_CASES])
def test_trainer_loss_preset_equals_peer_formula(models, preset, forget, retain, peer, hp):
    model, ref = models
    batch = make_batch(SAMPLES)
    ours = our_trainer_loss(model, ref, batch, preset, forget, retain)
    theirs = peer(model, ref, sub_batch(batch, ue.FORGET), sub_batch(batch, ue.RETAIN), hp)
    assert_same_loss_and_grads(model, ours, theirs)


def test_without_preset_the_losses_differ(models):
    """The presets matter on this batch: our defaults (per-sample means) give other values than each peer."""
    model, ref = models
    batch = make_batch(SAMPLES)
    f, r = sub_batch(batch, ue.FORGET), sub_batch(batch, ue.RETAIN)
    for _preset, forget, retain, peer, hp in FUSED_CASES:
        inputs = with_ref_logp(batch, ref, "mean", "mean")
        beta = hp.get("beta", hp.get("npo_beta", 0.1))
        weights = dict(forget_weight=hp.get("gamma", 1.0)) if forget == "simnpo" else {}
        ours = ue.trainer_loss(model, inputs, forget=forget, retain=retain, beta=beta, **weights)
        assert ours.item() != pytest.approx(peer(model, ref, f, r, hp).item(), rel=1e-3), peer.__name__


def test_user_settings_win_over_the_preset(models):
    """beta, delta and the weights given explicitly replace the preset's; the rest of the preset still holds."""
    model, ref = models
    batch = make_batch(SAMPLES)
    hp = dict(beta=1.5, delta=0.2, gamma=0.5, alpha=2.0)
    ours = our_trainer_loss(model, ref, batch, "open-unlearning", "simnpo", "nll", beta=1.5, delta=0.2,
                            forget_weight=0.5, retain_weight=2.0)
    theirs = ou_simnpo(model, ref, sub_batch(batch, ue.FORGET), sub_batch(batch, ue.RETAIN), hp)
    assert_same_loss_and_grads(model, ours, theirs)
    hp = dict(npo_beta=0.3, npo_forget_alpha=1.0, npo_llava_loss_weight=1.0, npo_retain_alpha=0.25)
    ours = our_trainer_loss(model, ref, batch, "safety-mirage", "npo", "nll", beta=0.3, retain_npo_weight=0.25)
    theirs = sm_npo(model, ref, sub_batch(batch, ue.FORGET), sub_batch(batch, ue.RETAIN), hp)
    assert_same_loss_and_grads(model, ours, theirs)


def test_safety_mirage_npo_at_batch_size_one_is_the_per_sample_npo():
    """At one forget and one retain sample pooling changes nothing: the preset equals plain per-sample NPO with
    the same weights (the issue's 'at batch size 1 our defaults agree')."""
    model = tiny_llama(1)
    ref = copy.deepcopy(model).requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.02)
    batch = with_ref_logp(make_batch([(ue.FORGET, 3, 5), (ue.RETAIN, 2, 4)]), ref, "mean", "mean")
    preset = ue.trainer_loss(model, batch, forget="npo", retain="nll", preset="safety-mirage")
    plain = ue.trainer_loss(model, batch, forget="npo", retain="nll", beta=0.9, retain_npo_weight=1.0)
    assert preset.item() == pytest.approx(plain.item(), rel=1e-6)


@pytest.mark.parametrize("preset,forget,retain", [("safety-mirage", "ga", "nll"), ("safety-mirage", "simnpo", "nll"),
                                                  ("open-unlearning", "ga", "kl"), ("open-unlearning", "npo", "kl")])
def test_unsupported_pair_names_preset_and_method(models, preset, forget, retain):
    model, ref = models
    with pytest.raises(ValueError, match=rf"preset '{preset}' has no counterpart of forget='{forget}', "
                                         rf"retain='{retain}'.*supports"):
        ue.trainer_loss(model, make_batch(SAMPLES), forget=forget, retain=retain, preset=preset, ref_model=ref)


def test_unlearn_config_preset_resolution():
    c = UnlearnConfig(method="simnpo", preset="open-unlearning").validate()
    assert (c.beta, c.delta, c.forget_weight, c.retain_weight) == (4.5, 0.0, 0.125, 1.0)
    assert (c.forget_pooling, c.forget_normalize, c.retain_pooling, c.retain_normalize) == \
        ("sample", "mean", "batch", "mean")
    c = UnlearnConfig(method="npo", preset="safety-mirage", beta=0.2).validate()
    assert (c.beta, c.retain_npo_weight, c.forget_pooling, c.retain_pooling) == (0.2, 1.0, "batch", "batch")
    assert c.validate() == c  # a resolved config resolves to itself
    # a copy with another preset or method re-resolves the filled-in values, never the ones given
    c = dataclasses.replace(UnlearnConfig(method="npo", retain_weight=0.5), preset="safety-mirage").validate()
    assert (c.beta, c.retain_npo_weight, c.retain_weight) == (0.9, 1.0, 0.5)
    c = dataclasses.replace(UnlearnConfig(method="npo", preset="open-unlearning"), method="simnpo").validate()
    assert (c.beta, c.forget_weight, c.forget_normalize) == (4.5, 0.125, "mean")
    assert json.loads(json.dumps(dataclasses.asdict(c)))["beta"] == 4.5
    c = UnlearnConfig(method="npo").validate()  # no preset: today's defaults
    assert (c.beta, c.retain_npo_weight, c.forget_pooling, c.forget_normalize) == (0.1, 0.0, "sample", "mean")
    assert UnlearnConfig(method="rmu").validate().forget_pooling == "batch"
    for bad, match in [(dict(method="textual", preset="open-unlearning"),
                        r"preset 'open-unlearning' has no counterpart of method 'textual': it supports 'ga', 'gd', "
                        r"'npo', 'simnpo', 'rmu'"),
                       (dict(method="gd", preset="safety-mirage"), r"preset 'safety-mirage' .* 'gd': it supports "
                                                                     r"'npo', 'rmu'"),
                       (dict(preset="tofu"), "preset must be one of"),
                       (dict(forget_pooling="token"), "forget_pooling must be one of"),
                       (dict(retain_npo_weight=-1.0), "retain_npo_weight must be >= 0")]:
        with pytest.raises(ValueError, match=match):
            UnlearnConfig(**bad).validate()


# ----------------------------------------------------------------------------- RMU
def peer_layer_acts(model, inputs, module_regex):
    """The peers' forward_with_cache: a forward hook on the one module whose name fully matches module_regex
    (open-unlearning's module_regex; Safety Mirage's base_model.layers[rmu_layer_id]), output[0] of a tuple, during
    the full model's forward."""
    (layer,) = [m for name, m in model.named_modules() if re.fullmatch(module_regex, name)]
    cache = []
    handle = layer.register_forward_hook(lambda m, args, out: cache.append(out[0] if isinstance(out, tuple) else out))
    try:
        model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    finally:
        handle.remove()
    return cache[0]


def hidden_states_acts(model, inputs, layer):
    """What RMU read before issue 25: hidden_states[layer + 1], the final norm's output at the last layer."""
    return model.base_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                            output_hidden_states=True).hidden_states[layer + 1]


LAYER_1 = r"model\.layers\.1"  # the last decoder layer of tiny_llama (open-unlearning's module_regex form)


def ou_activation_loss(acts, target, mask):
    """open-unlearning compute_activation_loss as intended: per sample, the mean over its labelled positions of the
    mean over d of the squared difference; then the mean over samples (its (b,) / (b, 1) broadcast not reproduced)."""
    sq = F.mse_loss(acts, target.expand_as(acts), reduction="none").mean(2)
    return ((sq * mask).sum(1) / mask.sum(1)).mean()


def ou_activation_loss_literal(acts, target, mask):
    """open-unlearning's code as written: a (b,) sum divided by a (b, 1) count broadcasts to (b, b)."""
    squared_diff = F.mse_loss(acts, target.expand_as(acts), reduction="none")
    squared_diff_sum = (squared_diff * mask.unsqueeze(-1).expand_as(squared_diff)).mean(dim=2).sum(dim=1)
    return (squared_diff_sum / mask.sum(dim=-1, keepdim=True)).mean()


def rmu_run(model, ref, batch, **config):
    """Just what RMU.loss reads of the Unlearner (its fused_loss too, for the retain NLL)."""
    class Run:
        pass
    run = Run()
    config.setdefault("rmu_layer", 1)
    run.config = UnlearnConfig(method="rmu", **config).validate()
    run.model, run.ref_model, run.device = model, ref, torch.device("cpu")
    kinds = {ue.FORGET: "f", ue.RETAIN: "r", ue.IGNORE: "x"}
    batch = dict(batch, ids=[(kinds[role], i) for i, role in enumerate(batch["role_list"])])
    run.batch = lambda forget, retain, step: batch
    run.model_inputs, run.host_roles = Unlearner.model_inputs, Unlearner.host_roles
    run.head_loss, run._forget_nll = HeadLoss(model.get_output_embeddings()), {}
    run.fused_loss, run._hidden = (types.MethodType(f, run) for f in (Unlearner.fused_loss, Unlearner._hidden))
    return run


def ou_rmu(model, ref, batch, control, hp, activation_loss=ou_activation_loss, acts=None):
    acts = acts or (lambda m, x: peer_layer_acts(m, x, hp.get("module_regex", LAYER_1)))
    f, r = sub_batch(batch, ue.FORGET), sub_batch(batch, ue.RETAIN)
    forget = activation_loss(acts(model, f), control, f["labels"] != -100)
    with torch.no_grad():
        ref_acts = acts(ref, r)
    retain = activation_loss(acts(model, r), ref_acts, r["labels"] != -100)
    return hp["gamma"] * forget + hp["alpha"] * retain


def sm_rmu(model, ref, batch, control, hp):
    """Safety Mirage training_step (llava_unlearn_full_trainer.py): compute_unlearn_loss, + compute_retain_loss
    only when rmu_retain_alpha != 0, + rmu_llava_loss_weight * the model loss of a retain batch. mse_loss over every
    element of the rows (its padding positions are left out here, as in ours: see the README); their NLL batch is
    drawn apart from the retain activation batch, here both are the same retain samples."""
    f, r = sub_batch(batch, ue.FORGET), sub_batch(batch, ue.RETAIN)
    fa = peer_layer_acts(model, f, LAYER_1)
    fm, rm = f["attention_mask"].bool(), r["attention_mask"].bool()
    loss = F.mse_loss(fa[fm], control.expand_as(fa)[fm])
    if hp["rmu_retain_alpha"] != 0:
        ra = peer_layer_acts(model, r, LAYER_1)
        with torch.no_grad():
            rr = peer_layer_acts(ref, r, LAYER_1)
        loss = loss + hp["rmu_retain_alpha"] * F.mse_loss(ra[rm], rr[rm])
    return loss + hp["rmu_llava_loss_weight"] * model_loss(model, r)


@pytest.mark.parametrize("preset,given,peer,hp,coeff", [
    ("open-unlearning", {}, ou_rmu, dict(gamma=1.0, alpha=1.0), 2.0),
    # their trainer's defaults: no retain activation term, NLL of a retain batch at weight 1, steering 300
    ("safety-mirage", {}, sm_rmu, dict(rmu_retain_alpha=0.0, rmu_llava_loss_weight=1.0), 300.0),
    ("safety-mirage", dict(rmu_alpha=1.0, rmu_nll_weight=0.5), sm_rmu,
     dict(rmu_retain_alpha=1.0, rmu_llava_loss_weight=0.5), 300.0),
], ids=["open-unlearning", "safety-mirage", "safety-mirage-alpha1-nll0.5"])
def test_rmu_preset_equals_peer_formula(models, preset, given, peer, hp, coeff):
    """At rmu_layer 1, the last decoder layer of the model: the peers hook the layer's own output."""
    model, ref = models
    batch = make_batch([s for s in SAMPLES if s[2] > 0])  # (RMU: the Unlearner skips records left unlabelled)
    run = rmu_run(model, ref, batch, preset=preset, **given)
    control = RMU().control(run)
    assert float(control.norm()) == pytest.approx(coeff, rel=1e-5)
    ours, stats = RMU().loss(run, [], [], 0)
    assert not any(layer._forward_hooks for layer in model.base_model.layers), "the hook was left on the layer"
    assert_same_loss_and_grads(model, ours, peer(model, ref, batch, control, hp))
    if run.config.rmu_nll_weight > 0:  # the stat: the mean over retain samples of each one's mean token NLL
        nll, n = token_nll(model, sub_batch(batch, ue.RETAIN))
        assert stats["retain_nll"] == pytest.approx((nll.sum(1) / n).mean().item(), rel=1e-5)


def test_rmu_weights_win_and_literal_open_unlearning_at_equal_lengths(models):
    """User-set gamma (forget_weight) and alpha (rmu_alpha) replace the preset's; at equal answer lengths
    open-unlearning's literal broadcast gives the same value as the per-sample mean we reproduce."""
    model, ref = models
    batch = make_batch([(ue.FORGET, 3, 4), (ue.RETAIN, 2, 4), (ue.FORGET, 5, 4), (ue.RETAIN, 4, 4)])
    run = rmu_run(model, ref, batch, preset="open-unlearning", forget_weight=0.5, rmu_alpha=3.0)
    control = RMU().control(run)
    ours, _ = RMU().loss(run, [], [], 0)
    hp = dict(gamma=0.5, alpha=3.0)
    assert_same_loss_and_grads(model, ours, ou_rmu(model, ref, batch, control, hp,
                                                   activation_loss=ou_activation_loss_literal))


def _vlm(kind):
    """(model, its frozen copy, tokens to draw, open-unlearning's module_regex for its last decoder layer)."""
    from unlearn_engine.api.demo.toy import qwen_tokenizer, tiny_llava, tiny_qwen2_vl, word_tokenizer

    words = [f"w{i}" for i in range(40)]
    if kind == "llava":
        tok = word_tokenizer(words)
        model = tiny_llava(tok).float()
    else:
        tok = qwen_tokenizer(words)
        model = tiny_qwen2_vl(tok, version=kind[len("qwen"):]).float()
    ref = copy.deepcopy(model).requires_grad_(False).eval()
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.train(), ref, tok.convert_tokens_to_ids(words), r"model\.language_model\.layers\.1"


@pytest.mark.parametrize("kind", ["llama", "llava", "qwen2", "qwen2.5"])
def test_rmu_last_layer_is_the_layers_own_output(models, kind):
    """Issue 25: at the last decoder layer RMU steers the layer's own output (as the peers' hook takes it), not
    hidden_states[rmu_layer + 1] (the final norm's output); the layer is found in LLaVA's and Qwen-VL's language
    model as in a plain causal LM."""
    if kind == "llama":
        (model, ref), tokens, regex = models, None, LAYER_1
    else:
        model, ref, tokens, regex = _vlm(kind)
    batch = make_batch([s for s in SAMPLES if s[2] > 0], tokens=tokens)
    run = rmu_run(model, ref, batch, preset="open-unlearning", rmu_layer=1)
    assert len(language_model(model).layers) == 2
    control = RMU().control(run)
    ours, _ = RMU().loss(run, [], [], 0)
    hp = dict(gamma=1.0, alpha=1.0, module_regex=regex)
    old = ou_rmu(model, ref, batch, control, hp, acts=lambda m, x: hidden_states_acts(m, x, 1))
    assert abs(ours.item() - old.item()) > 0.5 * ours.item(), (ours.item(), old.item())
    assert_same_loss_and_grads(model, ours, ou_rmu(model, ref, batch, control, hp))


@pytest.mark.parametrize("nll_weight", [0.0, 0.7])
def test_rmu_without_preset(models, nll_weight):
    """No preset: every attended row of the batch weighing the same, alpha 10, and rmu_nll_weight times the
    retain samples' pooled token-mean NLL (retain_pooling batch, retain_normalize mean: RMU's own defaults)."""
    model, ref = models
    batch = make_batch([s for s in SAMPLES if s[2] > 0])
    run = rmu_run(model, ref, batch, rmu_coeff=5.0, rmu_nll_weight=nll_weight)
    control = RMU().control(run)
    ours, stats = RMU().loss(run, [], [], 0)
    acts = peer_layer_acts(model, batch, LAYER_1)
    with torch.no_grad():
        ref_acts = peer_layer_acts(ref, batch, LAYER_1)
    mask, roles = batch["attention_mask"].bool(), batch["roles"]
    fm, rm = mask & (roles == ue.FORGET)[:, None], mask & (roles == ue.RETAIN)[:, None]
    want = F.mse_loss(acts[fm], control.expand_as(acts)[fm]) + 10.0 * F.mse_loss(acts[rm], ref_acts[rm])
    if nll_weight:
        want = want + nll_weight * model_loss(model, sub_batch(batch, ue.RETAIN))
    assert_same_loss_and_grads(model, ours, want)
    assert set(stats) == ({"forget_nll", "retain_nll"} if nll_weight else set())


def test_rmu_settings_of_the_presets():
    """safety-mirage fills their trainer's defaults (steering 300, retain alpha 0, llava loss weight 1); a value
    given wins; no preset: no NLL term; a negative weight is refused."""
    c = UnlearnConfig(method="rmu", preset="safety-mirage").validate()
    assert (c.rmu_coeff, c.rmu_alpha, c.rmu_nll_weight, c.retain_pooling, c.retain_normalize) == \
        (300.0, 0.0, 1.0, "batch", "mean")
    assert {"rmu_coeff", "rmu_alpha", "rmu_nll_weight"} <= set(c.filled_in())
    c = UnlearnConfig(method="rmu", preset="safety-mirage", rmu_nll_weight=0.25).validate()
    assert c.rmu_nll_weight == 0.25 and "rmu_nll_weight" not in c.filled_in()
    c = UnlearnConfig(method="rmu", preset="open-unlearning").validate()
    assert (c.rmu_coeff, c.rmu_alpha, c.rmu_nll_weight) == (2.0, 1.0, 0.0)
    assert UnlearnConfig(method="rmu").validate().rmu_nll_weight == 0.0
    with pytest.raises(ValueError, match="rmu_nll_weight must be >= 0, got -1.0"):
        UnlearnConfig(method="rmu", rmu_nll_weight=-1.0).validate()


def test_presets_table_is_what_the_readme_documents():
    assert set(PRESETS) == {"open-unlearning", "safety-mirage"}
    assert set(PRESETS["open-unlearning"]) == {"ga", "gd", "npo", "simnpo", "rmu"}
    assert set(PRESETS["safety-mirage"]) == {"npo", "rmu"}
