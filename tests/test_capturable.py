"""capturable=True: a training step of the fused loss with no host sync, so a CUDA graph can hold it.

Answers are checked against the reference in test_unlearning_loss.py / test_group_objective.py (every case runs
packed and capturable). Here: what is particular to the capturable walk (unlabelled rows walked and neutralised,
its GEMM count, device-side checks), a CPU probe that no op reading device values on the host runs, and, on a GPU,
the step under torch.cuda.set_sync_debug_mode("error") and inside a captured CUDA graph.
"""
import pytest
import torch

import unlearn_engine as ue
from unlearn_engine.fused_logprob import group_objective

from conftest import DEVICES

N, H, V = 41, 24, 203
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")


def make_batch(device="cpu", dtype=torch.float32, roles=(0, 1, 0, 1), seed=0):
    """Samples of unequal length in token order, ~30% unlabelled rows (prompts, padding)."""
    g = torch.Generator().manual_seed(seed)
    b = len(roles)
    sample_index = torch.randint(0, b, (N,), generator=g).sort().values
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.rand(N, generator=g) < 0.3] = -100
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(V, H, generator=g) / H ** 0.5
    batch = dict(hidden=hidden, weight=weight, bias=torch.randn(V, generator=g) * 0.1, labels=labels,
                 sample_index=sample_index, roles=torch.tensor(roles), ref_logp=-torch.rand(b, generator=g) * 3,
                 ref_hidden=hidden + 0.2 * torch.randn(N, H, generator=g),
                 ref_weight=weight + 0.05 * torch.randn(V, H, generator=g))
    floats = ("hidden", "weight", "bias", "ref_hidden", "ref_weight")
    return {k: t.to(device, dtype) if k in floats else t.to(device) for k, t in batch.items()}


OBJECTIVES = [
    dict(forget="ga", retain="nll"),
    dict(forget="npo", retain="kl"),
    dict(forget="simnpo", retain="nll", delta=0.3, forget_pooling="batch", retain_npo_weight=0.4),
]


def loss_and_grads(batch, capturable, chunk_size=8, **options):
    inputs = {k: (t.detach().clone().requires_grad_(k in ("hidden", "weight", "bias")) if t.is_floating_point()
                  else t) for k, t in batch.items()}
    if options["retain"] != "kl":
        inputs.pop("ref_hidden"), inputs.pop("ref_weight")
    if options["forget"] != "npo" and not options.get("retain_npo_weight"):
        inputs.pop("ref_logp")
    out = ue.unlearning_loss(**inputs, chunk_size=chunk_size, capturable=capturable, **options)
    out.loss.backward()
    return out, [inputs[k].grad for k in ("hidden", "weight", "bias")]


def assert_same(a, b):
    (out_a, grads_a), (out_b, grads_b) = a, b
    for name, x, y in zip(("loss", "per_sample", "logp"), out_a, out_b):
        torch.testing.assert_close(x.detach(), y.detach(), rtol=1e-5, atol=1e-6, msg=name)
    for name, x, y in zip(("grad hidden", "grad weight", "grad bias"), grads_a, grads_b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6 * max(1.0, y.abs().max().item()), msg=name)


# ----------------------------------------------------------------------------- unlabelled rows
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("options", OBJECTIVES, ids=lambda o: o["forget"] + "-" + o["retain"])
def test_unlabelled_rows_holding_nan_change_nothing(device, options):
    """A padded position's hidden state may be NaN (a fully masked attention row): the capturable walk computes
    that row but zeroes it, so values and gradients equal the packed walk's, which never touches it."""
    batch = make_batch(device)
    packed = loss_and_grads(batch, False, **options)
    unlabelled = batch["labels"] == -100
    batch["hidden"][unlabelled] = float("nan")
    batch["ref_hidden"][unlabelled] = float("nan")
    captured = loss_and_grads(batch, True, **options)
    assert_same(captured, packed)
    assert captured[1][0][unlabelled].abs().sum().item() == 0.0


# ----------------------------------------------------------------------------- cost
GEMMS = ("aten::mm", "aten::addmm", "aten::addmm_")


def count_gemms(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key in GEMMS)


@pytest.mark.parametrize("options,per_chunk", [
    (dict(forget="ga", retain="nll"), 3),    # logits, dL/dh, dL/dW
    (dict(forget="ga", retain="kl"), 4),     # + the reference logits
    (dict(forget="npo", retain="nll"), 4),   # + the forward-only pre-pass (8 N H V flop instead of 6)
    (dict(forget="npo", retain="kl"), 5),
])
def test_every_row_walked_and_one_pre_pass_for_npo(options, per_chunk):
    """The capturable plan depends on the shapes only: ceil(N / chunk) chunks over every row, labelled or not."""
    batch = make_batch()
    chunks = -(-N // 8)
    assert count_gemms(lambda: loss_and_grads(batch, True, **options)) == chunks * per_chunk


# ----------------------------------------------------------------------------- no host read
# What reads a device value on the host: a data-dependent output size, .item() / bool() / .tolist().
HOST_READS = ("aten::nonzero", "aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::unique",
              "aten::_unique2", "aten::masked_select", "aten::repeat_interleave")


def _under_device_assert(event):
    # on CPU, aten::_assert_async reads its flag at once; on CUDA it is a kernel (a device-side assert)
    parent = event.cpu_parent
    while parent is not None and parent.name != "aten::_assert_async":
        parent = parent.cpu_parent
    return parent is not None


def host_reads(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sorted({e.name for e in prof.events() if e.name in HOST_READS and not _under_device_assert(e)})


@pytest.mark.parametrize("options", OBJECTIVES, ids=lambda o: o["forget"] + "-" + o["retain"])
@pytest.mark.parametrize("validate", [False, True])
def test_a_capturable_step_reads_nothing_on_the_host(options, validate):
    """Forward and backward of a capturable step run no op that reads device values on the host (the CPU stand-in
    for set_sync_debug_mode, which needs a GPU); with validate=True its checks are device-side asserts. The
    default walk reads the labelled-row list (nonzero), so the probe does see a sync when there is one."""
    batch = make_batch()
    assert host_reads(lambda: loss_and_grads(batch, True, validate=validate, **options)) == []
    assert "aten::nonzero" in host_reads(lambda: loss_and_grads(batch, False, validate=False, **options))


def test_sequence_logprob_and_per_sample_gradients_capturable():
    """The recompute paths (a reference model's log-likelihoods; a gradient through per_sample) take capturable too,
    with the same answers and no host read."""
    batch = make_batch()
    args = (batch["hidden"], batch["weight"], batch["labels"], batch["sample_index"], 4)
    for normalize in ("mean", "sum"):
        want = ue.sequence_logprob(*args, bias=batch["bias"], normalize=normalize)
        got = ue.sequence_logprob(*args, bias=batch["bias"], normalize=normalize, capturable=True, chunk_size=8)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    def per_sample_grad(capturable):
        hidden = batch["hidden"].clone().requires_grad_()
        out = ue.unlearning_loss(hidden, batch["weight"], batch["labels"], batch["sample_index"], batch["roles"],
                                 forget="npo", ref_logp=batch["ref_logp"], bias=batch["bias"], chunk_size=8,
                                 capturable=capturable)
        (out.per_sample * torch.arange(1.0, 5.0)).sum().backward()
        return hidden.grad

    torch.testing.assert_close(per_sample_grad(True), per_sample_grad(False), rtol=1e-5, atol=1e-6)
    assert host_reads(lambda: per_sample_grad(True)) == []


# ----------------------------------------------------------------------------- device-side checks
@pytest.mark.parametrize("field,value,match", [
    ("labels", V, r"labels must be -100 \(ignored\) or in \[0, V=203\)"),
    ("sample_index", 9, r"sample_index values must be in \[0, B=4\)"),
    ("roles", 7, "roles must be FORGET=0"),
])
def test_device_side_checks_name_the_argument(field, value, match):
    """validate=True with capturable=True: the same checks as device-side asserts (raised at once on CPU)."""
    batch = make_batch()
    batch[field][1] = value
    with pytest.raises(RuntimeError, match=match):
        loss_and_grads(batch, True, forget="ga", retain="nll")


def test_device_side_check_of_a_non_finite_loss():
    batch = make_batch()
    batch["bias"][batch["labels"][batch["labels"] != -100][0]] = float("inf")  # a labelled token's logit is inf
    with pytest.raises(RuntimeError, match="the unlearning loss is not finite"):
        loss_and_grads(batch, True, forget="ga", retain="nll")


def _op_args(batch, group_index, sigmoid):
    g = sigmoid.shape[0]
    return (batch["hidden"], batch["weight"], batch["bias"], batch["labels"], group_index, torch.ones(g), sigmoid,
            torch.zeros(g), torch.ones(g), 0.5, None, None, None, None, 8, True, True, True)  # capturable, nonlinear


@pytest.mark.parametrize("bad", ["group_index", "nonlinear"])
@pytest.mark.parametrize("capturable", [True, False])
def test_op_device_side_checks(bad, capturable):
    """A walk that reads no group data on the host (capturable, or a linear objective's default walk) asserts on
    the device that group_index is in [-1, G) and that nonlinear=False really has sigmoid all zero."""
    batch = make_batch()
    group_index = batch["sample_index"].clone()
    sigmoid = torch.zeros(4)
    args = list(_op_args(batch, group_index, sigmoid))
    args[-2] = capturable
    if bad == "group_index":
        args[-1] = False  # a linear objective: the default walk too reads nothing but the labelled rows
    if bad == "group_index":
        group_index[3] = 4
        match = r"group_index values must be -1 \(no group\) or in \[0, G=4\)"
    else:
        sigmoid[2] = 1.0
        args[-1] = False
        match = "nonlinear=False needs sigmoid all zero"
    with pytest.raises(RuntimeError, match=match):
        ue.ops.fused_group_objective(*args)


def test_opcheck_capturable():
    batch = make_batch()
    args = _op_args(batch, batch["sample_index"], torch.tensor([0.0, 1.0, 0.0, 1.0]))
    torch.library.opcheck(ue.ops.fused_group_objective, args)
    torch.library.opcheck(ue.ops.fused_logprob, (batch["hidden"], batch["weight"], batch["bias"], batch["labels"],
                                                 None, None, None, 8, True))


def test_torch_compile_fullgraph_capturable():
    batch = make_batch()

    def step(hidden, weight, bias):
        return ue.unlearning_loss(hidden, weight, batch["labels"], batch["sample_index"], batch["roles"],
                                  forget="npo", retain="nll", ref_logp=batch["ref_logp"], bias=bias, chunk_size=8,
                                  capturable=True).loss

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    inputs = [batch[k].clone().requires_grad_() for k in ("hidden", "weight", "bias")]
    compiled(*inputs).backward()
    want = loss_and_grads(batch, False, forget="npo", retain="nll")
    for got, expected in zip((t.grad for t in inputs), want[1]):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_group_objective_capturable_without_gradients():
    """No gradient wanted: the forward walk alone, capturable too (token log-likelihoods of unlabelled rows 0)."""
    batch = make_batch()
    args = (batch["hidden"], batch["weight"], batch["labels"], batch["sample_index"], torch.ones(4), torch.zeros(4),
            torch.zeros(4), torch.ones(4))
    with torch.no_grad():
        want = group_objective(*args, beta=0.5, nonlinear=False, bias=batch["bias"], chunk_size=8)
        got = group_objective(*args, beta=0.5, nonlinear=False, bias=batch["bias"], chunk_size=8, capturable=True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert (got[2][batch["labels"] == -100] == 0).all()


# ----------------------------------------------------------------------------- on a GPU
def _training_step(batch, weight, optimizer, options):
    out = ue.unlearning_loss(batch["hidden"], weight, batch["labels"], batch["sample_index"], batch["roles"],
                             bias=batch["bias"], ref_logp=batch["ref_logp"], ref_hidden=batch["ref_hidden"],
                             ref_weight=batch["ref_weight"], capturable=True, validate=False, **options)
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return out.loss


@CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("options", OBJECTIVES, ids=lambda o: o["forget"] + "-" + o["retain"])
def test_cuda_training_step_makes_no_host_sync(dtype, options):
    """Loss, backward and a masked AdamW step (after the first, which builds the optimizer state and the mask's
    index lists) under set_sync_debug_mode("error"): any synchronising call raises."""
    batch = make_batch("cuda", dtype)
    weight = batch["weight"].clone().requires_grad_()
    mask = ue.topk_mask([torch.randn_like(weight)], 0.1)
    optimizer = ue.MaskedOptimizer([weight], mask, lr=1e-3, check_finite=False)
    _training_step(batch, weight, optimizer, options)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            _training_step(batch, weight, optimizer, options)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@CUDA
@pytest.mark.parametrize("options", OBJECTIVES, ids=lambda o: o["forget"] + "-" + o["retain"])
def test_cuda_graph_replays_the_loss_and_its_gradients(options):
    """Forward and backward captured once in a CUDA graph, replayed on new hidden states: the loss and the
    gradients equal an eager call on the same inputs."""
    batch = make_batch("cuda")
    hidden = batch["hidden"].clone().requires_grad_()
    weight = batch["weight"].clone().requires_grad_()
    kwargs = dict(bias=batch["bias"], ref_logp=batch["ref_logp"], ref_hidden=batch["ref_hidden"],
                  ref_weight=batch["ref_weight"], capturable=True, validate=False, chunk_size=16, **options)

    def step():
        out = ue.unlearning_loss(hidden, weight, batch["labels"], batch["sample_index"], batch["roles"], **kwargs)
        out.loss.backward()
        return out.loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the graph, as torch.cuda.graphs asks
        for _ in range(2):
            hidden.grad = weight.grad = None
            step()
    torch.cuda.current_stream().wait_stream(side)
    hidden.grad = weight.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step()

    new_hidden = torch.randn_like(hidden)
    with torch.no_grad():
        hidden.copy_(new_hidden)
    graph.replay()
    torch.cuda.synchronize()
    eager = loss_and_grads(dict(batch, hidden=new_hidden), False, chunk_size=16, **options)
    torch.testing.assert_close(static_loss, eager[0].loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hidden.grad, eager[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weight.grad, eager[1][1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nonlinear", [False, True])
def test_op_capturable_equals_packed_for_any_coefficients(device, nonlinear):
    """At the op itself: KL coefficients on unlabelled rows, tokens in no group (-1) and unlabelled rows of every
    group are ignored by the capturable walk exactly as the packed walk, which never visits them, ignores them."""
    batch = make_batch(device)
    group_index = batch["sample_index"].clone()
    group_index[::5] = -1
    g = 4
    gen = torch.Generator().manual_seed(5)
    sigmoid = (torch.rand(g, generator=gen) if nonlinear else torch.zeros(g)).to(device)
    args = [batch["hidden"], batch["weight"], batch["bias"], batch["labels"], group_index,
            torch.randn(g, generator=gen).to(device), sigmoid, torch.rand(g, generator=gen).to(device),
            torch.rand(g, generator=gen).to(device) + 1, 0.5, batch["ref_hidden"], batch["ref_weight"], None,
            torch.rand(N, generator=gen).to(device), 6, True]
    packed = ue.ops.fused_group_objective(*args, False, True)
    captured = ue.ops.fused_group_objective(*args, True, nonlinear)
    names = ("loss", "group_logp", "logp", "kl", "grad hidden", "grad weight", "grad bias")
    for name, a, b in zip(names, captured, packed):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * max(1.0, b.abs().max().item()), msg=name)


@pytest.mark.parametrize("capturable", [False, True])
@pytest.mark.parametrize("grad", [False, True])
def test_no_groups(capturable, grad):
    """G = 0 (only the KL term, or nothing): S is empty and the loss is the KL sum."""
    batch = make_batch()
    hidden = batch["hidden"].clone().requires_grad_(grad)
    coef_kl = torch.rand(N) * (batch["labels"] != -100)
    empty = torch.zeros(0)
    loss, S, token_logp, token_kl = group_objective(
        hidden, batch["weight"], batch["labels"], torch.full((N,), -1), empty, empty, empty, empty, beta=0.5,
        nonlinear=False, coef_kl=coef_kl, ref_hidden=batch["ref_hidden"], ref_weight=batch["ref_weight"],
        chunk_size=8, capturable=capturable)
    assert S.shape == (0,)
    torch.testing.assert_close(loss, (coef_kl * token_kl).sum())


def test_opcheck_frozen_head_float64():
    """A frozen head's empty weight / bias gradients are fp32 whatever the dtype, in the op as in its fake."""
    batch = make_batch(dtype=torch.float64)
    args = list(_op_args(batch, batch["sample_index"], torch.tensor([0.0, 1.0, 0.0, 1.0])))
    args[-3] = False  # weight_grad
    for capturable in (False, True):
        args[-2] = capturable
        torch.library.opcheck(ue.ops.fused_group_objective, tuple(args))
