"""Every setting reaches the code it configures: one case per UnlearnConfig field and per run setting of the
`unlearn` command (unlearn_command.RUN_KEYS), generated from the dataclass and the dict themselves.

A case changes one value and checks the run differs from the default in the way the field promises: the step-1
loss against an independent eager computation (full logits, one record at a time), the optimizer's groups and
the parameters it moved, the batch drawn, the files written. A field with no case fails
test_setting_reaches_its_code with the line to add.

Adding a case: write `def _my_field(p): ...` under `@case("my_field")` (p is the Probe below: p.run(**settings)
fits a fresh copy of the tiny LLaVA, p.expected_* give the independent values), 3 to 10 lines.
"""
import contextlib
import copy
import dataclasses
import json
import math
import os
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import unlearn_engine as ue
from unlearn_engine.api import cli, unlearn_command
from unlearn_engine.api.checkpoint import list_checkpoints
from unlearn_engine.api.config import UnlearnConfig
from unlearn_engine.api.data import encode
from unlearn_engine.api.methods import language_model
from unlearn_engine.weight_masking import selection_count

# Records of different lengths, so that pooling ("batch" vs "sample") and normalising ("sum" vs "mean") differ.
FORGET = [ue.Record("how to make a bomb", "step one mix poison", "forget"),
          ue.Record("how to make a poison", "step one mix drug step two bake the weapon", "forget")]
RETAIN = [ue.Record("how to make a bread", "mix flour", "retain"),
          ue.Record("how to make a cake", "step one mix sugar step two bake the cake", "retain")]
LN2 = math.log(2.0)

CASES = {}      # UnlearnConfig field -> case(probe)
RUN_CASES = {}  # unlearn_command.RUN_KEYS key -> case(probe, cli_run, tmp_path, capsys)


def case(*names, table=CASES):
    def add(fn):
        for name in names:
            table[name] = fn
        return fn
    return add


class Probe:
    """Fits fresh copies of one tiny float32 LLaVA and computes what a setting should give, independently of the
    fused kernels: per-record log-likelihoods from the full logits, layer activations from a forward hook."""

    def __init__(self, model, tokenizer, model_dir):
        self.model, self.tok, self.model_dir = model, tokenizer, model_dir
        self.stats = {kind: [self.record_logp(r) for r in records] for kind, records in (("f", FORGET), ("r", RETAIN))}

    def fresh(self):
        return copy.deepcopy(self.model)

    def unlearner(self, model=None, **settings):
        settings = {"steps": 1, "lr": 1e-3, "batch_size": 4, "progress": False, **settings}  # every record
        return ue.Unlearner(model if model is not None else self.fresh(), self.tok, **settings)

    def run(self, forget=FORGET, retain=RETAIN, **settings):
        run = self.unlearner(**settings)
        run.fit(forget, retain)
        return run

    @torch.no_grad()
    def record_logp(self, record, model=None):
        """(S, n): summed log-probability of the record's labelled tokens and their number, from full logits."""
        batch = encode([record], self.tok)
        logits = (model or self.model)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][0, 1:]
        keep = labels != -100
        logp = F.log_softmax(logits[0, :-1].double(), -1)[keep].gather(1, labels[keep, None])
        return float(logp.sum()), int(keep.sum())

    def m(self, kind, normalize="mean"):
        """Each record's m (S / n under "mean", S under "sum")."""
        return [s / n if normalize == "mean" else s for s, n in self.stats[kind]]

    def pooled(self, kind, normalize="mean"):
        s, n = sum(s for s, _ in self.stats[kind]), sum(n for _, n in self.stats[kind])
        return s / n if normalize == "mean" else s

    def group(self, kind, pooling="sample", normalize="mean"):
        """The group's values whose mean the loss takes: every record's m, or the one pooled m."""
        return [self.pooled(kind, normalize)] if pooling == "batch" else self.m(kind, normalize)

    @torch.no_grad()
    def acts(self, model, record, layer):
        """Decoder layer `layer`'s output rows of one record (T, H), with its attention mask and labels."""
        batch = encode([record], self.tok)
        taken = []
        handle = language_model(model).layers[layer].register_forward_hook(
            lambda mod, args, out: taken.append(out[0] if isinstance(out, tuple) else out))
        try:
            model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        finally:
            handle.remove()
        return taken[0][0].double(), batch["attention_mask"][0].bool(), batch["labels"][0] != -100

    def expected_rmu(self, *, layer=1, coeff=20.0, alpha=10.0, nll_weight=0.0, tokens="attended", seed=0,
                     ref_model=None):
        """RMU's step-1 loss under batch pooling: mean over forget rows of mean_h (a - c)^2, c of norm `coeff`
        from the seed, + alpha * the same against the reference's rows on retain + nll_weight * pooled retain NLL."""
        u = torch.rand(self.model.config.text_config.hidden_size, generator=torch.Generator().manual_seed(seed))
        control = (coeff * u / u.norm()).double()
        assert float(control.norm()) == pytest.approx(coeff)

        def rows(model, record):
            a, attended, labelled = self.acts(model, record, layer)
            return a[attended if tokens == "attended" else labelled]

        f = torch.cat([rows(self.model, r) for r in FORGET])
        loss = float(((f - control) ** 2).mean())
        if alpha > 0:
            r = torch.cat([rows(self.model, rec) for rec in RETAIN])
            ref = torch.cat([rows(ref_model or self.model, rec) for rec in RETAIN])
            loss += alpha * float(((r - ref) ** 2).mean())
        return loss - nll_weight * self.pooled("r")


@pytest.fixture(scope="module")
def probe(tiny_llava_dir, tmp_path_factory):
    """The tiny LLaVA after a few steps on one forget and one retain record: the records' NLLs differ (an untrained
    model gives every token about ln V), so that pooling and normalising change the loss."""
    from unlearn_engine.api.demo.toy import train_nll

    model, tok = ue.load_vlm(str(tiny_llava_dir), dtype="float32")
    train_nll(model, tok, [FORGET[0], RETAIN[0]], steps=15, lr=1e-2)
    path = tmp_path_factory.mktemp("reach") / "model"
    ue.save_vlm(model, str(path), processor=tok)
    return Probe(model, tok, path)


def loss1(run):
    return run.history[0]["loss"]


def mean(values):
    return sum(values) / len(values)


# ----------------------------------------------------------------------------- the method and its loss settings
@case("method")
def _method(p):
    assert loss1(p.run(method="ga")) == pytest.approx(mean(p.m("f")), rel=1e-5)
    assert loss1(p.run(method="gd")) == pytest.approx(mean(p.m("f")) - mean(p.m("r")), rel=1e-5)
    projector = {n for n, _ in p.unlearner(method="ga").named_params if "multi_modal_projector" in n}
    assert projector and not {n for n, _ in p.unlearner(method="textual").named_params} & projector  # LLM only
    rmu = p.unlearner(method="rmu", rmu_layer=0)
    assert {n for n, _ in rmu.named_params if "language_model" in n} == {
        "model.language_model.layers.0.mlp.down_proj.weight"}


@case("forget_weight")
def _forget_weight(p):
    assert loss1(p.run(method="gd", forget_weight=0.3)) == pytest.approx(0.3 * mean(p.m("f")) - mean(p.m("r")),
                                                                         rel=1e-5)


@case("retain_weight")
def _retain_weight(p):
    assert loss1(p.run(method="gd", retain_weight=0.3)) == pytest.approx(mean(p.m("f")) - 0.3 * mean(p.m("r")),
                                                                         rel=1e-5)


@case("beta")
def _beta(p):
    # NPO at step 1: the model is its own reference, so each forget term is (2 / beta) ln 2
    assert loss1(p.run(method="npo", beta=0.5)) == pytest.approx(2 / 0.5 * LN2 - mean(p.m("r")), rel=1e-5)


@case("delta")
def _delta(p):
    beta, delta = 0.5, 1.5
    forget = mean([2 / beta * F.softplus(torch.tensor(beta * (m + delta))).item() for m in p.m("f")])
    assert loss1(p.run(method="simnpo", beta=beta, delta=delta)) == pytest.approx(forget - mean(p.m("r")), rel=1e-5)


@case("retain_npo_weight")
def _retain_npo_weight(p):
    expected = 2 / 0.5 * LN2 - mean(p.m("r")) - 0.7 * 2 / 0.5 * LN2
    assert loss1(p.run(method="npo", beta=0.5, retain_npo_weight=0.7)) == pytest.approx(expected, rel=1e-5)


@case("forget_pooling")
def _forget_pooling(p):
    assert loss1(p.run(method="ga", forget_pooling="batch")) == pytest.approx(p.pooled("f"), rel=1e-5)
    assert p.pooled("f") != pytest.approx(mean(p.m("f")), rel=1e-3)  # the records make the two differ


@case("retain_pooling")
def _retain_pooling(p):
    expected = mean(p.m("f")) - p.pooled("r")
    assert loss1(p.run(method="gd", retain_pooling="batch")) == pytest.approx(expected, rel=1e-5)
    assert p.pooled("r") != pytest.approx(mean(p.m("r")), rel=1e-3)


@case("forget_normalize")
def _forget_normalize(p):
    assert loss1(p.run(method="ga", forget_normalize="sum")) == pytest.approx(mean(p.m("f", "sum")), rel=1e-5)


@case("retain_normalize")
def _retain_normalize(p):
    expected = mean(p.m("f")) - mean(p.m("r", "sum"))
    assert loss1(p.run(method="gd", retain_normalize="sum")) == pytest.approx(expected, rel=1e-5)


@case("preset")
def _preset(p):
    # open-unlearning's GradAscent: the token mean over the whole forget batch, and no divergence guard
    run = p.run(method="ga", preset="open-unlearning")
    assert loss1(run) == pytest.approx(p.pooled("f"), rel=1e-5)
    assert run.config.nll_bound == math.inf


@case("nll_bound")
def _nll_bound(p):
    """The guard drops a forget sample from ascent once its NLL passes the bound (strictly): a bound equal to
    the largest step-1 NLL guards nothing; the float just below it guards that sample at step 2."""
    first = p.run(method="ga")
    nll = first._forget_nll
    top = max(nll, key=nll.get)
    assert first.history[0]["forget_nll"] == pytest.approx(-mean(p.m("f")), rel=1e-5)
    free = p.run(method="ga", steps=2, nll_bound=nll[top])
    guarded = p.run(method="ga", steps=2, nll_bound=math.nextafter(nll[top], -math.inf))
    assert guarded.history[1]["loss"] != pytest.approx(free.history[1]["loss"], rel=1e-4)


# ----------------------------------------------------------------------------- RMU
@case("rmu_layer")
def _rmu_layer(p):
    run = p.run(method="rmu", rmu_layer=0, rmu_alpha=0.0)
    assert {n for n, _ in run.named_params if "language_model" in n} == {
        "model.language_model.layers.0.mlp.down_proj.weight"}
    assert loss1(run) == pytest.approx(p.expected_rmu(layer=0, alpha=0.0), rel=1e-4)
    run = p.run(method="rmu", rmu_layer=1, rmu_alpha=0.0)
    assert {n for n, _ in run.named_params if "language_model" in n} == {
        f"model.language_model.layers.{i}.mlp.down_proj.weight" for i in (0, 1)}
    assert loss1(run) == pytest.approx(p.expected_rmu(layer=1, alpha=0.0), rel=1e-4)


@case("rmu_coeff")
def _rmu_coeff(p):
    assert loss1(p.run(method="rmu", rmu_coeff=5.0, rmu_alpha=0.0)) == pytest.approx(
        p.expected_rmu(coeff=5.0, alpha=0.0), rel=1e-4)


@case("rmu_alpha")
def _rmu_alpha(p):
    ref = p.fresh()  # a reference that differs from the model, so that the retain term is not 0 at step 1
    with torch.no_grad():
        for param in ref.parameters():
            param.add_(0.05 * torch.randn_like(param))
    run = p.unlearner(method="rmu", rmu_alpha=3.0, ref_model=ref)
    run.fit(FORGET, RETAIN)
    assert loss1(run) == pytest.approx(p.expected_rmu(alpha=3.0, ref_model=ref), rel=1e-4)


@case("rmu_nll_weight")
def _rmu_nll_weight(p):
    assert loss1(p.run(method="rmu", rmu_alpha=0.0, rmu_nll_weight=0.7)) == pytest.approx(
        p.expected_rmu(alpha=0.0, nll_weight=0.7), rel=1e-4)


@case("rmu_tokens")
def _rmu_tokens(p):
    assert loss1(p.run(method="rmu", rmu_alpha=0.0, rmu_tokens="labelled")) == pytest.approx(
        p.expected_rmu(alpha=0.0, tokens="labelled"), rel=1e-4)


# ----------------------------------------------------------------------------- optimizer and scope
def _moved(run, before):
    return {n: p.detach() - before[n] for n, p in run.model.named_parameters() if n in before}


@case("lr")
def _lr(p):
    model = p.fresh()
    before = {n: q.detach().clone() for n, q in model.named_parameters()}
    run = p.unlearner(model, method="ga", lr=0.002)
    run.fit(FORGET, RETAIN)
    assert [g["lr"] for g in run.optimizer.param_groups] == [0.002]
    # AdamW's first step moves every element with a gradient by lr * g / (|g| + eps): at most lr, about lr
    step = max(float(d.abs().max()) for d in _moved(run, before).values())
    assert step == pytest.approx(0.002, rel=1e-2)


@case("weight_decay")
def _weight_decay(p):
    """Decoupled decay: the run with weight_decay wd ends at (1 - lr wd) p0 + the same Adam update, on every element
    the optimizer stepped (under scope 'mask': the selected ones; the others stay p0)."""
    lr, wd = 0.002, 0.25
    start = {n: q.detach().clone() for n, q in p.model.named_parameters()}
    for scope in ("full", "mask"):
        plain, decayed = p.run(method="ga", lr=lr, scope=scope), p.run(method="ga", lr=lr, weight_decay=wd, scope=scope)
        if scope == "full":
            assert [g["weight_decay"] for g in decayed.optimizer.param_groups] == [wd]
        a, b = dict(plain.model.named_parameters()), dict(decayed.model.named_parameters())
        stepped = 0
        for name, _ in decayed.named_params:
            # torch skips a parameter without a gradient (and decays all of one with a gradient, zeros included);
            # the mask skips the unselected elements
            moved = a[name] != start[name]
            moved = moved if scope == "mask" else moved.any().expand_as(moved)
            stepped += int(moved.sum())
            torch.testing.assert_close((b[name] - a[name])[moved], -lr * wd * start[name][moved], rtol=1e-3,
                                       atol=1e-7, msg=lambda m, where=f"scope {scope}: {name}": f"{where}: {m}")
            assert torch.equal(b[name][~moved], a[name][~moved])
        assert stepped > 100


@case("scope")
def _scope(p):
    assert all("lora_" in n for n, _ in p.unlearner(scope="lora").named_params)
    full = p.unlearner()
    assert any(n.endswith("lm_head.weight") for n, _ in full.named_params)
    assert not any("lora_" in n for n, _ in full.named_params)
    model = p.fresh()
    before = {n: q.detach().clone() for n, q in model.named_parameters()}
    masked = p.unlearner(model, method="ga", scope="mask")
    masked.fit(FORGET, RETAIN)
    total = sum(q.numel() for _, q in masked.named_params)
    moved = sum(int((d != 0).sum()) for d in _moved(masked, before).values())
    assert 0 < moved <= masked.mask.count() < total  # only the selected elements move


@case("mask_fraction")
def _mask_fraction(p):
    for fraction in (0.07, 0.3):
        model = p.fresh()
        before = {n: q.detach().clone() for n, q in model.named_parameters()}
        run = p.unlearner(model, method="ga", scope="mask", mask_fraction=fraction)
        run.fit(FORGET, RETAIN)
        total = sum(q.numel() for _, q in run.named_params)
        assert run.mask.count() == selection_count(fraction, total) == math.ceil(round(fraction * total, 6))
        moved = sum(int((d != 0).sum()) for d in _moved(run, before).values())
        assert 0 < moved <= run.mask.count()


@case("lora_rank")
def _lora_rank(p):
    run = p.unlearner(scope="lora", lora_rank=3)
    shapes = [q.shape for n, q in run.named_params if "lora_A" in n]
    assert shapes and all(s[0] == 3 for s in shapes)


# ----------------------------------------------------------------------------- batches, data, loop, files
@case("batch_size")
def _batch_size(p):
    for size in (1, 2):
        run = p.unlearner(method="gd", batch_size=size)
        batch = run.batch(FORGET, RETAIN, 0)
        assert batch["role_list"] == [0] * size + [1] * size


@case("seed")
def _seed(p):
    same = [p.unlearner(seed=s).indices(50, 0, 1) for s in (0, 0, 7)]
    assert same[0] == same[1] and same[0] != same[2]


@case("steps")
def _steps(p):
    assert [h["step"] for h in p.run(method="ga", steps=3).history] == [1, 2, 3]


def _steps_kept(p, root, **settings):
    out = os.path.join(root, str(len(os.listdir(root))))
    p.run(method="ga", out_dir=out, **settings)
    return [s for s, _ in list_checkpoints(os.path.join(out, "checkpoints"))]


@case("checkpoint_every")
def _checkpoint_every(p):
    with tempfile.TemporaryDirectory(prefix="settings-reach-") as root:
        assert _steps_kept(p, root, steps=1) == []
        assert _steps_kept(p, root, steps=3, checkpoint_every=2) == [2]
        assert _steps_kept(p, root, steps=3, checkpoint_every=1, keep_checkpoints=0) == [3, 2, 1]


@case("keep_checkpoints")
def _keep_checkpoints(p):
    with tempfile.TemporaryDirectory(prefix="settings-reach-") as root:
        assert _steps_kept(p, root, steps=3, checkpoint_every=1) == [3, 2]  # the default keeps 2
        assert _steps_kept(p, root, steps=3, checkpoint_every=1, keep_checkpoints=1) == [3]


@case("max_length")
def _max_length(p):
    longest = max(encode([r], p.tok)["input_ids"].shape[1] for r in FORGET + RETAIN)
    run = p.unlearner(method="gd", max_length=longest - 2)
    assert run.batch(FORGET, RETAIN, 0)["input_ids"].shape[1] == longest - 2
    run.fit(FORGET, RETAIN)
    assert run.data_report["forget"]["truncated"] + run.data_report["retain"]["truncated"] >= 1


@case("parallel")
def _parallel(p):
    """Under torch.distributed with 2 ranks, 'fsdp' shards each decoder layer, the base and the head-with-loss;
    'ddp' shards nothing (the process group is faked: only the plumbing is checked here, test_distributed runs it)."""
    import torch.distributed as dist
    import torch.distributed.fsdp as fsdp

    sharded = []
    patches = [(dist, "is_initialized", lambda: True), (dist, "get_rank", lambda: 0),
               (dist, "get_world_size", lambda: 2), (fsdp, "fully_shard", sharded.append)]
    saved = [(mod, name, getattr(mod, name)) for mod, name, _ in patches]
    try:
        for mod, name, value in patches:
            setattr(mod, name, value)
        ddp = p.unlearner(method="ga", parallel="ddp")
        assert not sharded and not ddp.fsdp
        run = p.unlearner(method="ga", parallel="fsdp")
    finally:
        for mod, name, value in saved:
            setattr(mod, name, value)
    layers = list(language_model(run.model).layers)
    assert run.fsdp and sharded == layers + [run.model.base_model, run.head_loss]


@case("reference_device")
def _reference_device(p):
    """'cpu': the frozen reference is made by offload.cpu_reference (host memory, streamed per module), with the
    same losses as the on-device copy; the default makes no such copy."""
    import unlearn_engine.api.unlearner as unlearner_module

    made, real = [], unlearner_module.cpu_reference
    unlearner_module.cpu_reference = lambda model, device: made.append(str(device)) or real(model, device)
    try:
        default = p.run(method="kl", steps=2)
        assert made == []
        run = p.run(method="kl", steps=2, reference_device="cpu")
    finally:
        unlearner_module.cpu_reference = real
    assert made == ["cpu"]
    assert all(t.device.type == "cpu" for t in run.ref_model.parameters())
    assert [h["loss"] for h in run.history] == pytest.approx([h["loss"] for h in default.history], rel=1e-6)


@case("divergence_factor")
def _divergence_factor(p):
    """The watcher warns when a step's retain NLL passes factor x max(first, 1): just below and just above that
    line for a factor off the default, and never with 0."""
    for factor in (3.0, 0.0):
        run = p.unlearner(method="gd", divergence_factor=factor)
        run.history = [{"step": 1, "retain_nll": 2.0}]
        run._watch_retain(run.history[0])
        below, above = {"step": 2, "retain_nll": 5.99}, {"step": 3, "retain_nll": 6.01}
        for record in (below, above):
            run.history.append(record)
            with pytest.warns(UserWarning) if factor and record is above else contextlib.nullcontext():
                run._watch_retain(record)
        assert (run.divergence or {}).get("step") == (3 if factor else None)


@case("save")
def _save(p):
    """The files the CLI writes: 'adapter' writes OUT/adapter (PEFT) and no OUT/model, 'merged' the reverse,
    unset under scope lora both."""
    with tempfile.TemporaryDirectory(prefix="settings-reach-") as root:
        root = Path(root)
        files = _files(root)
        for save, written in (("adapter", {"adapter"}), ("merged", {"model"}), (None, {"adapter", "model"})):
            out = root / f"out-{save}"
            flags = ["--scope", "lora"] + (["--save", save] if save else [])
            assert _unlearn(p.model_dir, out, *files, *flags) == 0
            assert set(os.listdir(out)) & {"adapter", "model"} == written


@case("gradient_step")
def _gradient_step(p):
    """'in_backward' (default) keeps the mask scope's fp32 masters packed, the selected elements only, and steps
    inside backward; 'after_backward' keeps full masters and steps after it: the same weights either way."""
    settings = dict(method="gd", scope="mask", mask_fraction=0.1, steps=2)
    packed, dense = p.run(**settings), p.run(gradient_step="after_backward", **settings)
    assert packed.stepper is not None and dense.stepper is None
    selected = packed.mask.count()
    assert sum(m.numel() for m in packed.masters) == selected < sum(m.numel() for m in dense.masters)
    for (_, a), (_, b) in zip(packed.named_params, dense.named_params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@case("optimizer_state")
def _optimizer_state(p):
    """The AdamW moments' dtype and device: fp32 beside the masters by default, bf16 when asked (the run then
    differs from fp32's by the moments' rounding only)."""
    fp32, bf16 = p.run(method="gd", steps=2), p.run(method="gd", steps=2, optimizer_state="bf16")
    for run, dtype in ((fp32, torch.float32), (bf16, torch.bfloat16)):
        moments = [t for state in run.optimizer.state.values() for t in state.values() if torch.is_tensor(t)
                   and t.dim() > 0]
        assert moments and {t.dtype for t in moments} == {dtype}
    head = [p_ for n, p_ in fp32.named_params if n.endswith("lm_head.weight")][0]
    head16 = [p_ for n, p_ in bf16.named_params if n.endswith("lm_head.weight")][0]
    assert not torch.equal(head, head16)
    torch.testing.assert_close(head, head16, rtol=0, atol=1e-4)


@case("gradient_checkpointing")
def _gradient_checkpointing(p):
    """'on' turns the model's own gradient checkpointing on (decoder layers recompute in backward): the same
    step-1 loss and the same weights after it."""
    off, on = p.run(method="gd"), p.run(method="gd", gradient_checkpointing="on")
    assert not off.model.is_activation_checkpointing and on.model.is_activation_checkpointing
    assert loss1(on) == pytest.approx(loss1(off), rel=1e-6)
    for (_, a), (_, b) in zip(off.named_params, on.named_params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- the tests
FIELDS = [f.name for f in dataclasses.fields(UnlearnConfig)]


def test_every_field_has_a_case():
    missing = [name for name in FIELDS if name not in CASES]
    assert not missing, "\n".join(f"UnlearnConfig.{name} has no case in tests/test_settings_reach.py: add one "
                                  "(@case(...) showing a changed value changes the run)" for name in missing)
    missing = [key for key in unlearn_command.RUN_KEYS if key not in RUN_CASES]
    assert not missing, "\n".join(f"unlearn_command.RUN_KEYS[{key!r}] has no case in tests/test_settings_reach.py: add one "
                                  "(@case(..., table=RUN_CASES))" for key in missing)


@pytest.mark.parametrize("name", sorted(set(FIELDS) | set(CASES)))
def test_setting_reaches_its_code(probe, name):
    assert name in CASES, f"UnlearnConfig.{name} has no case in tests/test_settings_reach.py: add one"
    assert name in FIELDS, f"CASES[{name!r}] names no UnlearnConfig field: remove or rename it"
    CASES[name](probe)


# ----------------------------------------------------------------------------- the unlearn command's run settings
def _files(root, forget=FORGET, retain=RETAIN):
    ue.write_jsonl(list(forget), str(root / "f.jsonl"))
    ue.write_jsonl(list(retain), str(root / "r.jsonl"))
    return ["--forget", str(root / "f.jsonl"), "--retain", str(root / "r.jsonl")]


def _unlearn(model, out, *flags):
    return cli.main(["unlearn", "--model", str(model), "--out", str(out), "--method", "gd", "--steps", "1", "--lr",
                     "0.01", "--dtype", "float32", "--device", "cpu", "--no-progress", "--json", *flags])


@pytest.fixture(scope="module")
def cli_run(probe, tmp_path_factory):
    """One `unlearn` run with every run setting off its usual value: --model another model of the same shape (the
    probe's weights rounded to bf16), --dtype bfloat16, --device cpu:0, a 1-record --forget whose record has a
    relative image path, --image-root, --out; the model loading and the image loader are spied on."""
    root = tmp_path_factory.mktemp("cli-run")
    ue.save_vlm(probe.fresh().to(torch.bfloat16).float(), str(root / "model"), processor=probe.tok)
    from PIL import Image

    (root / "imgs").mkdir()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(root / "imgs" / "a.png")
    files = _files(root, [dataclasses.replace(FORGET[0], image="a.png")], RETAIN)
    devices, images = [], []
    real_load, real_images = unlearn_command.load_promptable, unlearn_command.image_loader

    def load(*args, **kwargs):
        devices.append(kwargs.get("device"))
        return real_load(*args, **kwargs)

    def image_loader(model, processor, root):
        load_image = real_images(model, processor, root)
        return lambda path: images.append(os.path.join(root, path)) or load_image(path)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(unlearn_command, "load_promptable", load)
        patch.setattr(unlearn_command, "image_loader", image_loader)
        code = _unlearn(root / "model", root / "elsewhere", *files, "--dtype", "bfloat16", "--device", "cpu:0",
                        "--image-root", str(root / "imgs"), "--checkpoint-every", "1")
    assert code == 0
    return dict(root=root, files=files, out=root / "elsewhere", devices=devices, images=images)


@case("model", table=RUN_CASES)
def _run_model(p, run, tmp_path, capsys):
    trained, _ = ue.load_vlm(str(run["out"] / "model"), dtype="float32")
    source, _ = ue.load_vlm(str(run["root"] / "model"), dtype="float32")

    def tower(m):  # not trained by gd: equal to --model's bit for bit
        return torch.cat([q.flatten() for q in m.model.vision_tower.parameters()])

    assert torch.equal(tower(trained), tower(source)) and not torch.equal(tower(trained), tower(p.model))
    assert not torch.equal(trained.lm_head.weight, source.lm_head.weight)  # and trained


@case("forget", "retain", table=RUN_CASES)
def _run_records(p, run, tmp_path, capsys):
    data = json.loads((run["out"] / "data.json").read_text())
    assert (data["forget"]["records"], data["retain"]["records"]) == (1, 2)


@case("out", table=RUN_CASES)
def _run_out(p, run, tmp_path, capsys):
    assert {"config.json", "data.json", "metrics.jsonl", "model", "checkpoints"} <= set(os.listdir(run["out"]))


@case("dtype", table=RUN_CASES)
def _run_dtype(p, run, tmp_path, capsys):
    from safetensors import safe_open

    with safe_open(str(run["out"] / "model" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}


@case("device", table=RUN_CASES)
def _run_device(p, run, tmp_path, capsys):
    assert run["devices"] == ["cpu:0"]
    assert _unlearn(p.model_dir, tmp_path / "o", *run["files"], "--device", "cuda:99") == 2
    assert "--device cuda:99" in capsys.readouterr().err


@case("image_root", table=RUN_CASES)
def _run_image_root(p, run, tmp_path, capsys):
    assert run["images"] and set(run["images"]) == {str(run["root"] / "imgs" / "a.png")}
    assert _unlearn(p.model_dir, tmp_path / "o", *run["files"]) == 2  # relative to the working folder: not found
    assert "a.png not found" in capsys.readouterr().err


@case("overwrite", table=RUN_CASES)
def _run_overwrite(p, run, tmp_path, capsys):
    """A finished run's --out is refused without --overwrite (nothing changed) and replaced with it."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(run["out"], out)
    before = (out / "config.json").read_text()
    flags = [*run["files"], "--image-root", str(run["root"] / "imgs"), "--method", "ga"]
    assert _unlearn(run["root"] / "model", out, *flags) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "config.json").read_text() == before
    assert _unlearn(run["root"] / "model", out, *flags, "--overwrite") == 0
    assert json.loads((out / "config.json").read_text())["method"] == "ga" and not (out / "checkpoints").exists()


@case("resume", table=RUN_CASES)
def _run_resume(p, run, tmp_path, capsys):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(run["out"], out)
    flags = [*run["files"], "--image-root", str(run["root"] / "imgs"), "--checkpoint-every", "1", "--steps", "2",
             "--dtype", "bfloat16", "--device", "cpu:0"]
    first = (out / "metrics.jsonl").read_text().splitlines()
    assert _unlearn(run["root"] / "model", out, *flags) == 2  # no --resume: refused
    assert "--resume" in capsys.readouterr().err
    assert _unlearn(run["root"] / "model", out, *flags, "--resume") == 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(first) == 1 and len(lines) == 2 and lines[0] == first[0]  # step 1 restored, not redone


@pytest.mark.parametrize("key", sorted(set(unlearn_command.RUN_KEYS) | set(RUN_CASES)))
def test_run_setting_reaches_its_code(probe, cli_run, tmp_path, capsys, key):
    assert key in RUN_CASES, f"unlearn_command.RUN_KEYS[{key!r}] has no case in tests/test_settings_reach.py: add one"
    assert key in unlearn_command.RUN_KEYS, f"RUN_CASES[{key!r}] names no key of unlearn_command.RUN_KEYS: remove or rename it"
    RUN_CASES[key](probe, cli_run, tmp_path, capsys)
