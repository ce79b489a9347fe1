"""End to end on a tiny LLaVA: load -> unlearn 20 steps with each method -> forget NLL rises, retain NLL
holds -> save -> reload identical. Plus checkpoint/resume after SIGKILL."""
import json
import signal
import subprocess
import sys
import time

import pytest
import torch

import unlearn_engine as ue
from unlearn_engine.api.backward_step import ParamAdamW
from unlearn_engine.api.demo.toy import train_nll

FORGET = [ue.Record(f"how to make a {w}", f"step one mix {a} step two {b}", "forget")
          for w, a, b in [("bomb", "poison", "weapon"), ("weapon", "drug", "poison"), ("poison", "bomb", "drug"),
                          ("drug", "weapon", "bomb")]]
RETAIN = [ue.Record(f"how to make a {w}", f"step one mix {a} step two {b}", "retain")
          for w, a, b in [("bread", "flour", "water"), ("cake", "sugar", "flour"), ("cookies", "sugar", "water"),
                          ("bread", "water", "flour")]]


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory, tiny_llava_dir):
    """The tiny LLaVA after learning both the harmful and the benign recipes."""
    model, tok = ue.load_vlm(str(tiny_llava_dir), dtype="float32")
    train_nll(model, tok, FORGET + RETAIN, steps=80, lr=5e-3)
    path = tmp_path_factory.mktemp("trained") / "model"
    ue.save_vlm(model, str(path), processor=tok)
    return path


@pytest.mark.parametrize("method,extra", [("ga", {}), ("gd", {}), ("npo", {"beta": 0.5}), ("kl", {}),
                                          ("rmu", {"rmu_coeff": 20.0, "rmu_alpha": 10.0, "rmu_layer": 0}), ("textual", {}),
                                          ("npo", {"scope": "mask", "mask_fraction": 0.05, "beta": 0.5}),
                                          ("gd", {"scope": "lora", "lora_rank": 4})])
def test_each_method_unlearns(trained_dir, tmp_path, method, extra):
    model, tok = ue.load_vlm(str(trained_dir), dtype="float32")
    forget_before = ue.mean_nll(model, tok, FORGET)
    retain_before = ue.mean_nll(model, tok, RETAIN)
    lr = {"rmu": 3e-2}.get(method, 1e-2 if extra.get("scope") == "lora" else 3e-3)
    history = ue.Unlearner(model, tok, method=method, steps=20, lr=lr, batch_size=4, progress=False,
                           **extra).fit(FORGET, RETAIN)
    assert len(history) == 20 and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    forget_after, retain_after = ue.mean_nll(model, tok, FORGET), ue.mean_nll(model, tok, RETAIN)
    assert forget_after > forget_before + 0.5, (forget_before, forget_after)
    if method != "ga":  # plain GA has no retain term; the others must keep the benign recipes
        assert retain_after < retain_before + 1.5, (retain_before, retain_after)
    ue.save_vlm(model, str(tmp_path / "out"), processor=tok)
    reloaded, _ = ue.load_vlm(str(tmp_path / "out"), dtype="float32")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reloaded.state_dict().values()))


def test_bad_config():
    with pytest.raises(ValueError, match="method must be one of"):
        ue.UnlearnConfig(method="sft").validate()
    with pytest.raises(ValueError, match="scope must be one of"):
        ue.UnlearnConfig(scope="lora2").validate()


def _cli(args, **kw):
    return [sys.executable, "-m", "unlearn_engine.api.cli", *args]


@pytest.mark.parametrize("steps,extra", [(150, []), (60, ["--scope", "lora", "--lora-rank", "4"])], ids=["full", "lora"])
def test_kill_and_resume_matches_uninterrupted(trained_dir, tmp_path, steps, extra):
    """Catches a resume that is not bit-identical (params, optimizer state, RNG, LoRA adapters and their init)."""
    ue.write_jsonl(FORGET, str(tmp_path / "forget.jsonl"))
    ue.write_jsonl(RETAIN, str(tmp_path / "retain.jsonl"))
    common = ["unlearn", "--model", str(trained_dir), "--forget", str(tmp_path / "forget.jsonl"),
              "--retain", str(tmp_path / "retain.jsonl"), "--method", "npo", "--steps", str(steps), "--lr", "1e-3",
              "--checkpoint-every", "5", "--dtype", "float32", "--no-progress", *extra]
    straight = subprocess.run(_cli(common + ["--out", str(tmp_path / "straight")]), capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr
    run = subprocess.Popen(_cli(common + ["--out", str(tmp_path / "killed")]), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    latest = tmp_path / "killed" / "checkpoints" / "latest"
    deadline = time.time() + 120
    while time.time() < deadline and not (latest.exists() and latest.read_text().strip() >= "step-000010"):
        time.sleep(0.05)
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert latest.read_text().strip() < f"step-{steps:06d}", "the run finished before it was killed"
    resumed = subprocess.run(_cli(common + ["--out", str(tmp_path / "killed"), "--resume"]), capture_output=True,
                             text=True)
    assert resumed.returncode == 0, resumed.stderr
    a, _ = ue.load_vlm(str(tmp_path / "straight" / "model"), dtype="float32")
    b, _ = ue.load_vlm(str(tmp_path / "killed" / "model"), dtype="float32")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    lines = [json.loads(line) for line in open(tmp_path / "killed" / "metrics.jsonl")]
    assert [m["step"] for m in lines] == list(range(1, steps + 1))
    assert all({"loss", "forget_nll", "retain_nll"} <= set(m) for m in lines)


def test_divergence_guard_stops_ascent(trained_dir):
    """GA with a bound: samples past the NLL bound stop being ascended, so the forget NLL stays near it."""
    finals, last_loss = {}, {}
    for bound in (2.0, 1e9):
        model, tok = ue.load_vlm(str(trained_dir), dtype="float32")
        history = ue.Unlearner(model, tok, method="ga", steps=25, lr=1e-2, nll_bound=bound, progress=False).fit(FORGET)
        finals[bound], last_loss[bound] = ue.mean_nll(model, tok, FORGET), history[-1]["loss"]
    assert last_loss[2.0] == 0.0  # every forget sample passed the bound: nothing is ascended any more
    assert last_loss[1e9] != 0.0
    assert finals[2.0] < 0.5 * finals[1e9], finals  # (Adam's momentum still carries a little past the bound)


def test_lora_is_plain_and_reproducible_with_a_seed(trained_dir):
    """Catches a saliency mask applied to LoRA (only 5% of the adapters trained) and adapters initialised from the
    global RNG: two runs with one seed (and different global RNG states) end bit-identical, every adapter
    element moved, and another seed gives another run."""
    def run(seed, global_seed):
        torch.manual_seed(global_seed)
        model, tok = ue.load_vlm(str(trained_dir), dtype="float32")
        unlearner = ue.Unlearner(model, tok, method="gd", scope="lora", lora_rank=4, steps=3, lr=1e-3, seed=seed,
                                 progress=False)
        unlearner.fit(FORGET, RETAIN)
        return model, unlearner

    a, ua = run(0, 1)
    b, _ = run(0, 2)
    c, _ = run(1, 1)
    assert not hasattr(ua, "mask") and isinstance(ua.optimizer, ParamAdamW)  # plain AdamW, stepped in backward
    lora_b = [m for n, m in ua.named_masters() if "lora_B" in n]
    assert lora_b and all(bool((m != 0).all()) for m in lora_b)  # B starts at 0: every element moved
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values()))
