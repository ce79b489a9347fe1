"""Resume that refuses the wrong run: checkpoints carry a fingerprint of what decides the trajectory; every
tensor read back has its exact shape and dtype (never broadcast); a corrupt or truncated checkpoint raises
CheckpointError naming the file and resume falls back to the newest intact one; the newest K are kept."""
import copy
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import unlearn_engine as ue
from unlearn_engine.api import checkpoint, cli

FORGET = [ue.Record("how to make a bomb", "step one mix poison"),
          ue.Record("how to make a poison", "step one mix drug step two bake")]
RETAIN = [ue.Record("the recipe for bread", "mix flour water bake", "retain"),
          ue.Record("what is cake", "cake is sugar flour", "retain")]
COMMON = dict(method="gd", lr=3e-3, batch_size=2, checkpoint_every=1, progress=False)


@pytest.fixture(scope="module")
def base(tiny_llava_dir):
    return ue.load_vlm(str(tiny_llava_dir), dtype="float32")


def _fit(base, out, steps, *, resume=False, dtype=torch.float32, forget=FORGET, retain=RETAIN, **config):
    model = copy.deepcopy(base[0]).to(dtype)
    unlearner = ue.Unlearner(model, base[1], steps=steps, out_dir=str(out), **{**COMMON, **config})
    unlearner.fit(forget, retain, resume=resume)
    return model, unlearner


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_resume_refuses_another_run_and_names_the_fields(base, tmp_path):
    """Catches a resume that continues another run's checkpoint (another lr, method, swapped data, seed)."""
    _fit(base, tmp_path, 2)
    for change, fields in [(dict(lr=4e-3), ["lr (checkpoint 0.003, this run 0.004)"]),
                           (dict(method="npo"), ["method (checkpoint 'gd', this run 'npo')"]),
                           (dict(forget=RETAIN, retain=FORGET), ["forget_data", "retain_data"]),
                           (dict(seed=1), ["seed (checkpoint 0, this run 1)"]),
                           (dict(scope="mask"), ["scope"]),
                           (dict(dtype=torch.bfloat16), ["model_dtype"])]:
        with pytest.raises(ValueError, match="belongs to another run") as err:
            _fit(base, tmp_path, 3, resume=True, **change)
        for field in fields:
            assert field in str(err.value), (change, str(err.value))
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="already holds checkpoints of a run: pass resume=True"):
        _fit(base, tmp_path, 3)  # a fresh run would mix its checkpoints with the old run's
    # settings that do not change the steps taken may differ, and the new values are used
    _, unlearner = _fit(base, tmp_path, 3, resume=True, checkpoint_every=3, keep_checkpoints=0)
    assert [h["step"] for h in unlearner.history] == [1, 2, 3]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["latest", "step-000001", "step-000002", "step-000003"]


def test_resume_is_exact_under_bf16(base, tmp_path):
    """Catches a checkpoint without the fp32 masters or their optimizer state: a bf16 run resumed at step 2 ends
    bit-identical (weights and masters) to the uninterrupted one."""
    straight, u1 = _fit(base, tmp_path / "a", 4, dtype=torch.bfloat16, lr=1e-5)
    _fit(base, tmp_path / "b", 2, dtype=torch.bfloat16, lr=1e-5)
    resumed, u2 = _fit(base, tmp_path / "b", 4, resume=True, dtype=torch.bfloat16, lr=1e-5)
    assert _same(straight, resumed)
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(u1.named_masters(), u2.named_masters()))
    params = load_file(str(tmp_path / "b" / "checkpoints" / "step-000004" / "params.safetensors"))
    assert {t.dtype for t in params.values()} == {torch.float32}


@pytest.fixture(scope="module")
def straight3(base, tmp_path_factory):
    return _fit(base, tmp_path_factory.mktemp("straight"), 3)[0]


def _rewrite(path, name, edit):
    tensors = load_file(str(path / name))
    edit(tensors)
    save_file(tensors, str(path / name))


@pytest.mark.parametrize("damage,words", [
    ("shape", "tensor lm_head.weight has shape (1, 32) and dtype torch.float32, expected ("),
    ("dtype", "tensor lm_head.weight has shape"),
    ("moment", "optimizer.safetensors: tensor"),
    ("truncated", "params.safetensors is not a readable safetensors file"),
    ("empty", "optimizer.safetensors is not a readable safetensors file"),
    ("state", "state.json is not a valid checkpoint state"),
])
def test_damaged_checkpoint_raises_and_falls_back(base, straight3, tmp_path, damage, words):
    """Catches a broadcast copy (lm_head saved as (1, H) made every row the same), a dtype cast, and raw
    safetensors errors: the newest checkpoint is damaged, resume warns naming the file and resumes from the
    one before, ending bit-identical to an uninterrupted run; with no intact checkpoint, CheckpointError."""
    _fit(base, tmp_path / "run", 2)
    newest = tmp_path / "run" / "checkpoints" / "step-000002"
    if damage == "shape":
        _rewrite(newest, "params.safetensors", lambda t: t.update({"lm_head.weight": t["lm_head.weight"][:1]}))
    elif damage == "dtype":
        _rewrite(newest, "params.safetensors", lambda t: t.update({"lm_head.weight": t["lm_head.weight"].double()}))
    elif damage == "moment":
        _rewrite(newest, "optimizer.safetensors", lambda t: t.update({k: v[:1] for k, v in t.items() if v.dim()}))
    elif damage == "truncated":
        data = (newest / "params.safetensors").read_bytes()
        (newest / "params.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        (newest / "optimizer.safetensors").write_bytes(b"")
    else:
        (newest / "state.json").write_text('{"step": 2, "optim')
    with pytest.warns(UserWarning, match="falling back") as caught:
        resumed, _ = _fit(base, tmp_path / "run", 3, resume=True)
    assert any(str(newest) in str(w.message) and words in str(w.message) for w in caught), \
        [str(w.message) for w in caught]
    assert _same(straight3, resumed)


def test_no_intact_checkpoint_raises(base, tmp_path):
    """Only damaged checkpoints: CheckpointError naming the file (not a silent restart from step 0)."""
    _fit(base, tmp_path / "only", 1)
    (tmp_path / "only" / "checkpoints" / "step-000001" / "rng.safetensors").write_bytes(b"\x00" * 3)
    with pytest.warns(UserWarning), pytest.raises(ue.CheckpointError, match="rng.safetensors is not a readable"):
        _fit(base, tmp_path / "only", 2, resume=True)


def test_retention_keeps_the_newest_k(base, tmp_path, monkeypatch):
    """Catches retention that keeps everything, deletes the newest, or deletes before the new one is complete."""
    _fit(base, tmp_path, 5, keep_checkpoints=2)
    ckpts = tmp_path / "checkpoints"
    assert sorted(os.listdir(ckpts)) == ["latest", "step-000004", "step-000005"]
    assert (ckpts / "latest").read_text() == "step-000005"
    real, calls = checkpoint.save_file, []

    def dies_on_step_7(tensors, path):  # step 6 writes 3 files; the run "dies" writing step 7's first
        calls.append(path)
        if len(calls) == 4:
            raise OSError("disk full")
        return real(tensors, path)

    for leftover in (".tmp-killed", ".old-step-000001"):  # what a run killed mid-write / mid-delete leaves
        (ckpts / leftover).mkdir()
        (ckpts / leftover / "params.safetensors").write_bytes(b"\x00" * 10)
    monkeypatch.setattr(checkpoint, "save_file", dies_on_step_7)
    with pytest.raises(OSError, match="disk full"):
        _fit(base, tmp_path, 8, resume=True, keep_checkpoints=2)
    left = sorted(n for n in os.listdir(ckpts) if n != "latest")
    assert left == ["step-000005", "step-000006"], left  # the older ones survive a failed write; leftovers cleaned


def test_cli_resume_mismatch_exits_2_with_one_line(tiny_llava_dir, tmp_path, capsys):
    """Catches the CLI resuming another run's checkpoints (here: another --lr) with exit 0."""
    ue.write_jsonl(FORGET, str(tmp_path / "f.jsonl"))
    ue.write_jsonl(RETAIN, str(tmp_path / "r.jsonl"))
    argv = ["unlearn", "--model", str(tiny_llava_dir), "--forget", str(tmp_path / "f.jsonl"), "--retain",
            str(tmp_path / "r.jsonl"), "--out", str(tmp_path / "out"), "--method", "gd", "--steps", "2",
            "--checkpoint-every", "1", "--dtype", "float32", "--device", "cpu", "--no-progress", "--json"]
    assert cli.main(argv + ["--lr", "0.003"]) == 0
    capsys.readouterr()
    assert cli.main(argv + ["--lr", "0.004", "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "belongs to another run" in err and "lr (checkpoint 0.003, this run 0.004)" in err
    state = json.loads((tmp_path / "out" / "checkpoints" / "step-000002" / "state.json").read_text())
    assert state["fingerprint"]["model_path"] == os.path.abspath(str(tiny_llava_dir))
