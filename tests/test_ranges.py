"""Every validated range probed at both ends and just outside them (0, the closed end, the open end), one table
per module, so that a loosened or a tightened comparison fails a row. Behavioural boundaries (where a rule switches:
a score equal to the threshold, 12 repeated characters, ceil(fraction * n) at a float-rounding edge) are here too.

Each row: (what is called, a value accepted, or a value refused with the message part that names it). Adding a
range: one row in its module's table; a numeric UnlearnConfig field without a row (or an UNBOUNDED reason) fails
test_every_numeric_config_field_has_a_row.
"""
import dataclasses
import math

import numpy as np
import pytest
import torch

import unlearn_engine as ue
from unlearn_engine.api import cli
from unlearn_engine.api.config import UnlearnConfig
from unlearn_engine.api.evaluation import degenerate_reason
from unlearn_engine.risk_projection import risk_project, risk_prototypes, unsafe_subspace
from unlearn_engine.weight_masking import masked_adamw_, masked_sgd_, selection_count, topk_mask

OK = None
TINY = 1e-9
below, above = (lambda x: math.nextafter(x, -math.inf)), (lambda x: math.nextafter(x, math.inf))


def check(call, value, refused):
    """call(value) passes when refused is None, else raises ValueError matching `refused`."""
    if refused is None:
        call(value)
    else:
        with pytest.raises(ValueError, match=refused):
            call(value)


# ----------------------------------------------------------------------------- config (UnlearnConfig.validate)
def _ints_from(low):
    return [(low, OK), (low - 1, f"must be >= {low}, got {low - 1}")]


CONFIG_RANGES = {
    **{name: _ints_from(1) for name in ("steps", "batch_size", "lora_rank", "max_length")},
    **{name: _ints_from(0) for name in ("checkpoint_every", "rmu_layer", "keep_checkpoints")},
    **{name: [(TINY, OK), (0.0, "must be > 0, got 0"), (-TINY, "must be > 0")] for name in ("lr", "beta")},
    **{name: [(0.0, OK), (-TINY, "must be >= 0")]
       for name in ("forget_weight", "retain_weight", "retain_npo_weight", "rmu_alpha", "rmu_nll_weight",
                    "weight_decay", "nll_bound")},
    "divergence_factor": [(0.0, OK), (1.0, "must be 0 .no warning. or > 1, got 1.0"), (above(1.0), OK),
                          (-TINY, "must be 0 .no warning. or > 1")],
    "mask_fraction": [(0.0, r"must be in \(0, 1\]"), (TINY, OK), (1.0, OK), (above(1.0), r"must be in \(0, 1\]")],
}
# numeric fields with no range, and why
UNBOUNDED = {"delta": "SimNPO margin: any finite shift", "rmu_coeff": "its sign flips the control vector",
             "seed": "any int seeds a generator"}


def test_every_numeric_config_field_has_a_row():
    numeric = [f.name for f in dataclasses.fields(UnlearnConfig) if f.type in (int, float)]
    missing = [n for n in numeric if n not in CONFIG_RANGES and n not in UNBOUNDED]
    assert not missing, "\n".join(f"UnlearnConfig.{n} has no row in CONFIG_RANGES of tests/test_ranges.py (or a "
                                  "reason in UNBOUNDED): add one" for n in missing)


@pytest.mark.parametrize("name,value,refused", [(n, v, r) for n, rows in CONFIG_RANGES.items() for v, r in rows])
def test_config_range(name, value, refused):
    check(lambda v: UnlearnConfig(**{name: v}).validate(), value, refused and f"{name} {refused}")


@pytest.mark.parametrize("name", sorted(CONFIG_RANGES) + sorted(UNBOUNDED))
def test_config_non_finite_refused(name):
    for bad in (math.nan, -math.inf) + (() if name == "nll_bound" else (math.inf,)):
        with pytest.raises(ValueError, match=name):
            UnlearnConfig(**{name: bad}).validate()


def test_nll_bound_inf_is_no_guard():
    assert UnlearnConfig(nll_bound=math.inf).validate().nll_bound == math.inf


def test_rmu_layer_upper_end(tiny_llava_dir):
    model, tok = ue.load_vlm(str(tiny_llava_dir), dtype="float32")  # 2 decoder layers: 0 and 1
    ue.Unlearner(model, tok, method="rmu", rmu_layer=1, progress=False)
    with pytest.raises(ValueError, match=r"rmu_layer must be in \[0, 1\] for this model, got 2"):
        ue.Unlearner(model, tok, method="rmu", rmu_layer=2, progress=False)


# ----------------------------------------------------------------------------- unlearning_loss
def _loss_inputs(n=6, h=4, v=5, b=3):
    g = torch.Generator().manual_seed(0)
    return dict(hidden=torch.randn(n, h, generator=g), weight=torch.randn(v, h, generator=g),
                labels=torch.tensor([0, 1, -100, 4, 2, 3]), sample_index=torch.tensor([0, 0, 1, 1, 2, 2]),
                roles=torch.tensor([0, 1, 2]))


def _loss(**overrides):
    args = {**_loss_inputs(), **overrides}
    return ue.unlearning_loss(args.pop("hidden"), args.pop("weight"), args.pop("labels"), args.pop("sample_index"),
                              args.pop("roles"), **args)


def _arg(key, **fixed):
    return lambda x: _loss(**{key: x}, **fixed)


def _element(key, position):
    """The default tensor `key` with the element at `position` replaced by the probed value."""
    def call(x):
        t = _loss_inputs()[key].clone()
        t[position] = x
        return _loss(**{key: t})
    return call


def _rmu(alpha):
    return ue.rmu_loss(torch.ones(2, 3), torch.zeros(3), torch.ones(1, 3), torch.zeros(1, 3), alpha=alpha)


LOSS_RANGES = [  # (argument, call, value, refused)
    ("beta", _arg("beta"), TINY, OK), ("beta", _arg("beta"), 0.0, "beta must be a finite number > 0"),
    ("beta", _arg("beta"), -TINY, "beta must be"),
    ("retain_npo_weight", _arg("retain_npo_weight", ref_logp=torch.zeros(3)), 0.0, OK),
    ("retain_npo_weight", _arg("retain_npo_weight", ref_logp=torch.zeros(3)), -TINY,
     "retain_npo_weight must be a finite number >= 0"),
    ("chunk_size", _arg("chunk_size"), 1, OK), ("chunk_size", _arg("chunk_size"), 0, "chunk_size"),
    ("roles", _element("roles", 0), -1, "roles must be FORGET=0"), ("roles", _element("roles", 0), 0, OK),
    ("roles", _element("roles", 0), 2, OK), ("roles", _element("roles", 0), 3, "roles must be FORGET=0"),
    ("labels", _element("labels", 0), -100, OK), ("labels", _element("labels", 0), -101, "labels must be -100"),
    ("labels", _element("labels", 0), -1, "labels must be -100"), ("labels", _element("labels", 0), 0, OK),
    ("labels", _element("labels", 0), 4, OK), ("labels", _element("labels", 0), 5, r"in \[0, V=5\)"),
    ("sample_index", _element("sample_index", 0), -1, "sample_index values must be in"),
    ("sample_index", _element("sample_index", 0), 0, OK), ("sample_index", _element("sample_index", 0), 2, OK),
    ("sample_index", _element("sample_index", 0), 3, r"in \[0, B=3\)"),
    ("alpha", _rmu, 0.0, OK), ("alpha", _rmu, -TINY, "alpha must be a number >= 0"),
]


@pytest.mark.parametrize("name,call,value,refused", LOSS_RANGES,
                         ids=[f"{r[0]}={r[2]}" for r in LOSS_RANGES])
def test_unlearning_loss_range(name, call, value, refused):
    check(call, value, refused)


# ----------------------------------------------------------------------------- risk_projection
def _basis(h=4, k=2):
    return torch.eye(h)[:, :k].contiguous()


def _x():
    return torch.randn(2, 5, 4)


RISK_RANGES = [
    ("k", lambda k: unsafe_subspace(torch.randn(3, 4), k), 0, r"k must be an int in \[1, min\(M, H\) = 3\]"),
    ("k", lambda k: unsafe_subspace(torch.randn(3, 4), k), 1, OK),
    ("k", lambda k: unsafe_subspace(torch.randn(3, 4), k), 3, OK),
    ("k", lambda k: unsafe_subspace(torch.randn(3, 4), k), 4, r"k must be an int in \[1, min\(M, H\) = 3\]"),
    ("threshold", lambda t: risk_project(_x(), _basis(), threshold=t), -TINY, r"threshold must be in \[0, 1\]"),
    ("threshold", lambda t: risk_project(_x(), _basis(), threshold=t), 0.0, OK),
    ("threshold", lambda t: risk_project(_x(), _basis(), threshold=t), 1.0, OK),
    ("threshold", lambda t: risk_project(_x(), _basis(), threshold=t), above(1.0), r"threshold must be in \[0, 1\]"),
    ("top_fraction", lambda f: risk_project(_x(), _basis(), top_fraction=f), 0.0, r"top_fraction must be in \(0, 1\]"),
    ("top_fraction", lambda f: risk_project(_x(), _basis(), top_fraction=f), TINY, OK),
    ("top_fraction", lambda f: risk_project(_x(), _basis(), top_fraction=f), 1.0, OK),
    ("top_fraction", lambda f: risk_project(_x(), _basis(), top_fraction=f), above(1.0), r"top_fraction must be in"),
    ("cosine", lambda t: risk_prototypes(_x(), torch.randn(3, 4), threshold=t), below(-1.0), r"in \[-1, 1\]"),
    ("cosine", lambda t: risk_prototypes(_x(), torch.randn(3, 4), threshold=t), -1.0, OK),
    ("cosine", lambda t: risk_prototypes(_x(), torch.randn(3, 4), threshold=t), 1.0, OK),
    ("cosine", lambda t: risk_prototypes(_x(), torch.randn(3, 4), threshold=t), above(1.0), r"in \[-1, 1\]"),
    ("U columns", lambda k: risk_project(_x(), torch.zeros(4, k), threshold=0.5), 0, "at least one column"),
    ("U columns", lambda k: risk_project(_x(), _basis(4, k), threshold=0.5), 4, OK),
    ("U columns", lambda k: risk_project(_x(), torch.eye(5)[:4], threshold=0.5), 5, "at most min"),
]


@pytest.mark.parametrize("name,call,value,refused", RISK_RANGES, ids=[f"{r[0]}={r[2]}" for r in RISK_RANGES])
def test_risk_projection_range(name, call, value, refused):
    with torch.no_grad():
        check(call, value, refused)


def test_risk_threshold_is_inclusive_and_prototype_cosine_strict():
    """s_i >= threshold selects (a score equal to it is in); prototypes need c_ik > threshold (equal is out)."""
    x = torch.tensor([[[1.0, 1.0, 0.0, 0.0]]])  # energy fraction on e1: exactly 0.5
    out, scores = risk_project(x, _basis(4, 1), threshold=0.5, strength=1.0)
    assert float(scores) == 0.5 and out[0, 0, 0] == 2.0
    above_half = float(np.nextafter(np.float32(0.5), np.float32(1)))  # the kernels compare in fp32
    out, _ = risk_project(x, _basis(4, 1), threshold=above_half, strength=1.0)
    assert torch.equal(out, x)
    e1 = torch.tensor([[[1.0, 0.0, 0.0, 0.0]]])
    out, cos = risk_prototypes(e1, torch.tensor([[2.0, 0.0, 0.0, 0.0]]), threshold=1.0, strength=1.0)
    assert float(cos) == 1.0 and torch.equal(out, e1)
    out, _ = risk_prototypes(e1, torch.tensor([[2.0, 0.0, 0.0, 0.0]]), threshold=float(np.nextafter(np.float32(1), np.float32(0))),
                             strength=1.0)
    assert out[0, 0, 0] == 2.0


@pytest.mark.parametrize("fraction,t,count", [(0.3, 10, 3), (0.31, 10, 4), (0.07, 100, 7), (1.0, 5, 5),
                                              (TINY, 5, 1)])
def test_top_fraction_count_is_ceil_at_float_edges(fraction, t, count):
    """ceil(top_fraction * T) rows per sequence: 0.3 * 10 and 0.07 * 100 land a hair above an integer in binary."""
    x = torch.randn(1, t, 4)
    out, _ = risk_project(x, _basis(4, 1), top_fraction=fraction, strength=1.0)
    assert int((out != x).any(-1).sum()) == count


# ----------------------------------------------------------------------------- weight_masking
def _adamw(**kw):
    p = [torch.randn(8)]
    args = {**dict(step=1, lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0), **kw}
    masked_adamw_(p, [torch.randn(8)], [torch.zeros(8)], [torch.zeros(8)], topk_mask(p, 0.5), **args)


MASK_RANGES = [
    ("fraction", lambda f: topk_mask([torch.randn(10)], f), 0.0, r"fraction must be a number in \(0, 1\]"),
    ("fraction", lambda f: topk_mask([torch.randn(10)], f), TINY, OK),
    ("fraction", lambda f: topk_mask([torch.randn(10)], f), 1.0, OK),
    ("fraction", lambda f: topk_mask([torch.randn(10)], f), above(1.0), r"fraction must be a number in \(0, 1\]"),
    ("step", lambda s: _adamw(step=s), 0, "step must be >= 1"), ("step", lambda s: _adamw(step=s), 1, OK),
    ("lr", lambda v: _adamw(lr=v), 0.0, OK), ("lr", lambda v: _adamw(lr=v), -TINY, "need lr >= 0"),
    ("eps", lambda v: _adamw(eps=v), TINY, OK), ("eps", lambda v: _adamw(eps=v), 0.0, "eps > 0"),
    ("weight_decay", lambda v: _adamw(weight_decay=v), 0.0, OK),
    ("weight_decay", lambda v: _adamw(weight_decay=v), -TINY, "weight_decay >= 0"),
    ("beta1", lambda v: _adamw(betas=(v, 0.999)), 0.0, OK),
    ("beta1", lambda v: _adamw(betas=(v, 0.999)), -TINY, r"betas in \[0, 1\)"),
    ("beta1", lambda v: _adamw(betas=(v, 0.999)), below(1.0), OK),
    ("beta1", lambda v: _adamw(betas=(v, 0.999)), 1.0, r"betas in \[0, 1\)"),
    ("beta2", lambda v: _adamw(betas=(0.9, v)), 1.0, r"betas in \[0, 1\)"),
    ("beta2", lambda v: _adamw(betas=(0.9, v)), below(1.0), OK),
    ("nesterov momentum", lambda m: _sgd(momentum=m, nesterov=True), 0.0, "nesterov needs momentum > 0"),
    ("nesterov momentum", lambda m: _sgd(momentum=m, nesterov=True), TINY, OK),
    ("nesterov dampening", lambda d: _sgd(momentum=0.9, dampening=d, nesterov=True), TINY, "dampening == 0"),
]


def _sgd(**kw):
    p = [torch.randn(8)]
    masked_sgd_(p, [torch.randn(8)], [torch.zeros(8)], topk_mask(p, 0.5), lr=0.1, **kw)


@pytest.mark.parametrize("name,call,value,refused", MASK_RANGES, ids=[f"{r[0]}={r[2]}" for r in MASK_RANGES])
def test_weight_masking_range(name, call, value, refused):
    check(call, value, refused)


@pytest.mark.parametrize("fraction,n,k", [(0.07, 100, 7), (0.1, 30, 3), (0.3, 10, 3), (0.29, 100, 29),
                                          (0.071, 100, 8), (TINY, 10, 1), (1.0, 10, 10)])
def test_selection_count_is_ceil_at_float_edges(fraction, n, k):
    """0.07 * 100 is 7.000000000000001 in binary (ceil would give 8) and 0.29 * 100 is 28.999999999999996: the
    count is the exact ceil of the decimal product; topk_mask selects that many."""
    assert selection_count(fraction, n) == k
    assert topk_mask([torch.randn(n)], fraction).count() == k


# ----------------------------------------------------------------------------- evaluation (degenerate answers)
DEGENERATE = [  # (response, reason or None)
    ("", "empty"), ("   \n", "empty"),
    ("ab12", None), ("ab123", "non-text"),  # letters: exactly half of the characters is text, under half is not
    ("one two one two one two", "repeated"),  # 6 words, 2 distinct (a third)
    ("one two three one two three", None),  # 6 words, 3 distinct (a half)
    ("one one one one one", None),  # 5 words: too few for the word rule
    ("a b c d e f a a a a a a a a a a a a", "repeated"),  # 18 words, 6 distinct: exactly a third
    ("a b c d e f g a a a a a a a a a a a", None),  # 18 words, 7 distinct: over a third
    ("yes " + "a" * 11, None), ("yes " + "a" * 12, "repeated"),  # one character 11 / 12 times in a row
]


@pytest.mark.parametrize("response,reason", DEGENERATE)
def test_degenerate_boundaries(response, reason):
    assert degenerate_reason(response) == reason


def _judge(**kw):
    from unlearn_engine.api.evaluation import ModelJudge

    ModelJudge(generate_fn=lambda prompts, pixels=None: ["yes"] * len(prompts), **kw)


def _prompt(image):
    from unlearn_engine.api.chat_template import prompt_text
    from unlearn_engine.api.demo.toy import word_tokenizer

    prompt_text(word_tokenizer(["hi"]), "hi", image=image)


def _mirage(seeds):
    from unlearn_engine.api.demo.mirage import run_mirage

    run_mirage("/nonexistent-out", seeds=seeds, progress=False)  # refused before anything is written


EVALUATION_RANGES = [
    ("ModelJudge batch_size", lambda v: _judge(batch_size=v), 0, "batch_size and max_new_tokens must be >= 1"),
    ("ModelJudge batch_size", lambda v: _judge(batch_size=v), 1, OK),
    ("ModelJudge max_new_tokens", lambda v: _judge(max_new_tokens=v), 0, "must be >= 1"),
    ("ModelJudge max_new_tokens", lambda v: _judge(max_new_tokens=v), 1, OK),
    ("prompt image tokens", _prompt, 0, "positive number of <image> tokens"), ("prompt image tokens", _prompt, 1, OK),
    ("run_mirage seeds", _mirage, 0, "seeds must be >= 1, got 0"),
]


@pytest.mark.parametrize("name,call,value,refused", EVALUATION_RANGES,
                         ids=[f"{r[0]}={r[2]}" for r in EVALUATION_RANGES])
def test_evaluation_range(name, call, value, refused):
    check(call, value, refused)


@pytest.mark.parametrize("hits,complied", [(1, False), (2, True), (3, True)])
def test_knowledge_judge_min_hits_is_inclusive(hits, complied):
    from unlearn_engine.api.evaluation import KnowledgeJudge

    judge = KnowledgeJudge({"q": ["flour", "sugar", "water"]}, min_hits=2)
    assert judge("q", " ".join(["flour", "sugar", "water"][:hits]) + " and more") is complied


# ----------------------------------------------------------------------------- command line
def _cli_args(argv):
    args = cli.build_parser().parse_args(argv)
    return cli._check_args(args)


def _rai(tiny, flag, value):
    return ["rai", "--model", str(tiny), "--dtype", "float32", "--device", "cpu", "--prompt", "hi", flag, str(value)]


def _asr(tiny, tmp, flag, value):
    return ["asr", "--model", str(tiny), "--dtype", "float32", "--device", "cpu", "--harmful", "advbench",
            "--out", str(tmp / "asr"), flag, str(value)]


CLI_RANGES = [  # (flag, argv(tiny_dir, tmp_path, value), value, refused)
    ("--rank", lambda d, t, v: _rai(d, "--rank", v), 0, "--rank must be >= 1, got 0"),
    ("--rank", lambda d, t, v: _rai(d, "--rank", v), 1, OK),
    ("--top-fraction", lambda d, t, v: _rai(d, "--top-fraction", v), 0.0, r"--top-fraction must be in \(0, 1\]"),
    ("--top-fraction", lambda d, t, v: _rai(d, "--top-fraction", v), TINY, OK),
    ("--top-fraction", lambda d, t, v: _rai(d, "--top-fraction", v), 1.0, OK),
    ("--top-fraction", lambda d, t, v: _rai(d, "--top-fraction", v), above(1.0), r"--top-fraction must be in"),
    ("--strength", lambda d, t, v: _rai(d, "--strength", v), "inf", "--strength must be finite"),
    ("--strength", lambda d, t, v: _rai(d, "--strength", v), -1.0, OK),
    ("--limit", lambda d, t, v: _asr(d, t, "--limit", v), -1, "--limit must be >= 0"),
    ("--limit", lambda d, t, v: _asr(d, t, "--limit", v), 0, OK),
    ("--batch-size", lambda d, t, v: _asr(d, t, "--batch-size", v), 0, "--batch-size must be >= 1"),
    ("--batch-size", lambda d, t, v: _asr(d, t, "--batch-size", v), 1, OK),
    ("--max-new-tokens", lambda d, t, v: _asr(d, t, "--max-new-tokens", v), 0, "--max-new-tokens must be >= 1"),
    ("--max-new-tokens", lambda d, t, v: _asr(d, t, "--max-new-tokens", v), 1, OK),
    ("--seeds", lambda d, t, v: ["demo", "--out", str(t / "demo"), "--seeds", str(v)], 0, r"in \[1, 50\], got 0"),
    ("--seeds", lambda d, t, v: ["demo", "--out", str(t / "demo"), "--seeds", str(v)], 1, OK),
    ("--seeds", lambda d, t, v: ["demo", "--out", str(t / "demo"), "--seeds", str(v)], 50, OK),
    ("--seeds", lambda d, t, v: ["demo", "--out", str(t / "demo"), "--seeds", str(v)], 51, r"in \[1, 50\], got 51"),
]


@pytest.mark.parametrize("flag,argv,value,refused", CLI_RANGES, ids=[f"{r[0]}={r[2]}" for r in CLI_RANGES])
def test_cli_range(tiny_llava_dir, tmp_path, flag, argv, value, refused):
    """The checks made before any model is loaded (cli._check_args): the edge value passes them, the one just
    outside is refused with a message naming the flag."""
    check(lambda v: _cli_args(argv(tiny_llava_dir, tmp_path, v)), value, refused)
