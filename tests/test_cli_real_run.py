"""What a real `unlearn` / `asr` run needs beyond the happy path (issue 31): nothing written by a refused run, no
silent overwrite of a finished run, file checks before the weights load, the checkpoint's generation config kept,
bounded generation, a readable summary, a divergence warning and stop, one-line warnings, documented columns."""
import json
import math
import os
import re
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file

import unlearn_engine as ue
from unlearn_engine.api import loading, unlearn_command
from unlearn_engine.api.cli import main

FORGET = [{"prompt": "how to make a bomb", "response": "step one mix poison step two bake"},
          {"prompt": "how to make poison", "response": "mix water sugar"},
          {"prompt": "tell me about a weapon", "response": "steal the recipe"}]
RETAIN = [{"prompt": "tell me about bread", "response": "mix flour water bake"},
          {"prompt": "what is cake", "response": "flour sugar water"}]
README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def write_jsonl(path, items):
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return str(path)


def unlearn_argv(model, tmp_path, out, *extra):
    forget = write_jsonl(tmp_path / "forget.jsonl", FORGET)
    retain = write_jsonl(tmp_path / "retain.jsonl", RETAIN)
    return ["unlearn", "--model", str(model), "--forget", forget, "--retain", retain, "--out", str(out),
            "--steps", "1", "--lr", "1e-3", "--dtype", "float32", "--device", "cpu", "--no-progress", *extra]


def one_line_error(capsys, command="unlearn"):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"unlearn-engine {command}: error: "), err
    return err


# ---------------------------------------------------------------- 3: a refused run writes nothing
def test_refused_run_leaves_no_file(tiny_llava_dir, tmp_path, capsys):
    """Catches config.json (or any file) written before the max_length check refuses the run."""
    out = tmp_path / "out"
    assert main(unlearn_argv(tiny_llava_dir, tmp_path, out, "--max-length", "1")) == 2
    err = one_line_error(capsys)
    assert "keeps a response token" in err
    assert not out.exists()


# ---------------------------------------------------------------- 4: no silent overwrite
def test_finished_run_is_not_overwritten(tiny_llava_dir, tmp_path, capsys):
    """Catches a rerun into a finished --out (no checkpoints) replacing its model, metrics and config with exit 0;
    --overwrite replaces exactly the run's files and keeps the user's others."""
    out = tmp_path / "out"
    assert main(unlearn_argv(tiny_llava_dir, tmp_path, out, "--method", "ga")) == 0
    capsys.readouterr()
    (out / "notes.txt").write_text("mine")
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main(unlearn_argv(tiny_llava_dir, tmp_path, out, "--method", "gd")) == 2
    err = one_line_error(capsys)
    assert f"--out {out} is not empty" in err and "--overwrite" in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files  # untouched
    assert main(unlearn_argv(tiny_llava_dir, tmp_path, out, "--method", "gd", "--overwrite")) == 0
    capsys.readouterr()
    saved = json.loads((out / "config.json").read_text())
    assert saved["method"] == "gd" and "overwrite" not in saved  # a later --resume from it does not replace
    assert (out / "notes.txt").read_text() == "mine"
    assert main(unlearn_argv(tiny_llava_dir, tmp_path, out, "--overwrite", "--resume")) == 2
    assert "exclude each other" in one_line_error(capsys)


def test_overwrite_replaces_checkpoints_of_another_run(tiny_llava_dir, tmp_path, capsys):
    """Catches --overwrite keeping the old run's checkpoints (a later --resume would continue the wrong run)."""
    out = tmp_path / "out"
    assert main(unlearn_argv(tiny_llava_dir, tmp_path, out, "--steps", "2", "--checkpoint-every", "1",
                             "--keep-checkpoints", "0")) == 0
    assert sorted(os.listdir(out / "checkpoints")) == ["latest", "step-000001", "step-000002"]
    assert main(unlearn_argv(tiny_llava_dir, tmp_path, out, "--steps", "2")) == 2
    assert "already holds checkpoints" in one_line_error(capsys)
    assert main(unlearn_argv(tiny_llava_dir, tmp_path, out, "--steps", "1", "--lr", "2e-3", "--overwrite")) == 0
    assert not (out / "checkpoints").exists()
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]


# ---------------------------------------------------------------- 5: file checks before any weight is read
@pytest.fixture
def no_tokenizer_dir(tiny_llava_dir, tmp_path):
    path = tmp_path / "no-tokenizer"
    path.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        if (tiny_llava_dir / name).exists():
            shutil.copy(tiny_llava_dir / name, path / name)
    return path


@pytest.mark.parametrize("command", ["unlearn", "asr", "rai", "judge", "asr-with-judge"])
def test_missing_tokenizer_is_refused_before_the_weights_load(command, no_tokenizer_dir, tiny_llava_dir, tmp_path,
                                                             capsys, monkeypatch):
    """Catches a checkpoint without tokenizer files reported only after its weights were read (minutes on a 7B)."""
    def no_weights(*a, **k):
        raise AssertionError("the weights were read before the tokenizer was checked")

    monkeypatch.setattr(loading, "load_vlm", no_weights)
    monkeypatch.setattr(unlearn_command, "load_vlm", no_weights)
    harmful = write_jsonl(tmp_path / "harmful.jsonl", [{"prompt": "how to make a bomb"}])
    argv = {"unlearn": unlearn_argv(no_tokenizer_dir, tmp_path, tmp_path / "out"),
            "asr": ["asr", "--model", str(no_tokenizer_dir), "--harmful", harmful, "--out", str(tmp_path / "out"),
                    "--device", "cpu"],
            "rai": ["rai", "--model", str(no_tokenizer_dir), "--prompt", "hi", "--device", "cpu"],
            "judge": ["asr", "--model", str(tiny_llava_dir), "--harmful", harmful, "--out", str(tmp_path / "out"),
                      "--judge", f"model:{no_tokenizer_dir}", "--device", "cpu"],
            # the judge model loads before --model: the flag checks must have seen --model's tokenizer already
            "asr-with-judge": ["asr", "--model", str(no_tokenizer_dir), "--harmful", harmful, "--out",
                               str(tmp_path / "out"), "--judge", f"model:{tiny_llava_dir}", "--device", "cpu"]}[command]
    assert main(argv) == 2
    err = one_line_error(capsys, argv[0])
    assert f"{no_tokenizer_dir} has no tokenizer files" in err
    assert not (tmp_path / "out").exists()


def test_load_promptable_checks_the_tokenizer_first(no_tokenizer_dir, monkeypatch):
    """The same in Python: load_promptable refuses before load_vlm reads a weight."""
    monkeypatch.setattr(loading, "load_vlm", lambda *a, **k: pytest.fail("weights read first"))
    with pytest.raises(ValueError, match="has no tokenizer files"):
        loading.load_promptable(str(no_tokenizer_dir))


# ---------------------------------------------------------------- 2: bounded generation
@pytest.mark.parametrize("value,ok", [(256, True), (257, False), (100000000, False)])
def test_max_new_tokens_above_the_context_is_refused(value, ok, tiny_llava_dir, tmp_path, capsys, monkeypatch):
    """Catches --max-new-tokens larger than the model's positions accepted (a run that generates for minutes)."""
    from unlearn_engine.api.evaluation import generation

    monkeypatch.setattr(generation, "generate", lambda model, tok, prompts, **k: ["I cannot."] * len(prompts))
    harmful = write_jsonl(tmp_path / "harmful.jsonl", [{"prompt": "how to make a bomb"}])
    out = tmp_path / "out"
    code = main(["asr", "--model", str(tiny_llava_dir), "--harmful", harmful, "--out", str(out), "--max-new-tokens",
                 str(value), "--dtype", "float32", "--device", "cpu", "--no-progress", "--json"])
    if ok:
        assert code == 0
        return
    assert code == 2
    err = one_line_error(capsys, "asr")
    assert f"--max-new-tokens {value} is more than" in err and "256 positions" in err
    assert not out.exists()


# ---------------------------------------------------------------- 6: the summary table
def test_summary_table_keeps_columns_apart():
    """Catches numbers glued together (`0.00112171431.2500`) or cut to a fixed width."""
    before = {"forget_nll": 0.0011217143, "retain_nll": 49587.123456}
    after = {"forget_nll": 1.25e-12, "retain_nll": float("inf")}
    lines = unlearn_command._metric_table(before, after).splitlines()
    assert lines[0].split() == ["metric", "before", "after"]
    for line in lines[1:]:
        key, b, a = line.split()
        assert float(b) == pytest.approx(before[key], rel=1e-5)
        assert float(a) == pytest.approx(after[key], rel=1e-5) or float(a) == after[key]
    assert len({len(line) for line in lines}) == 1  # aligned


# ---------------------------------------------------------------- 7: divergence
@pytest.mark.parametrize("lr", ["3", "30"])
def test_divergence_warns_once_and_stops_on_non_finite(lr, tiny_llava_dir, tmp_path, capsys, monkeypatch):
    """Catches a run whose retain NLL explodes exiting 0 without a word, a warning per step, and a run gone
    non-finite ending in an internal error (exit 1) or saving its model: at --lr 3 the retain NLL grows 25x and the
    CLI warns once (exit 0, `divergence` in the summary); at --lr 30 it grows ~3000x and warns once, then, its body
    made to overflow from the third step on (NaN hidden states: at this lr in fp32 Adam keeps every value finite,
    the eager reference loss and the fused one alike), stops with exit 2 and one error line, no model saved and the
    checkpoints written before kept, none holding a NaN."""
    if lr == "30":
        import unlearn_engine.api.unlearner as unlearner_module

        fused, calls = unlearner_module.unlearning_loss, []

        def overflowing(hidden, *args, **kwargs):
            calls.append(1)
            return fused(hidden * float("nan") if len(calls) >= 3 else hidden, *args, **kwargs)

        monkeypatch.setattr(unlearner_module, "unlearning_loss", overflowing)
    out = tmp_path / "out"
    argv = unlearn_argv(tiny_llava_dir, tmp_path, out, "--method", "gd", "--lr", lr, "--steps", "6",
                        "--checkpoint-every", "1", "--keep-checkpoints", "0", "--json")
    code = main(argv)
    captured = capsys.readouterr()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first = metrics[0]["retain_nll"]
    over = [m["step"] for m in metrics if not m["retain_nll"] <= 10 * max(first, 1)]
    assert over, metrics  # the retain NLL did grow past 10x
    warned = [line for line in captured.err.splitlines() if "warning: the run is diverging" in line]
    assert len(warned) == 1 and f"at step {over[0]}" in warned[0], captured.err
    if lr == "3":
        assert code == 0 and len(metrics) == 6
        assert json.loads(captured.out)["divergence"] == {"step": over[0], "retain_nll": metrics[over[0] - 1][
            "retain_nll"], "first_retain_nll": first, "factor": 10.0}
        return
    assert code == 2 and len(metrics) < 6
    err = [line for line in captured.err.splitlines() if ": error: " in line]
    assert len(err) == 1 and "diverged: " in err[0] and "newest good checkpoint" in err[0], captured.err
    assert captured.err.count("\n") == 2  # the warning and the error
    assert not (out / "model").exists()
    checkpoints = sorted((out / "checkpoints").glob("step-*"))
    assert len(checkpoints) >= len(metrics) - 1 and str(checkpoints[-1]) in err[0]
    for ckpt in checkpoints:
        assert all(torch.isfinite(t).all() for t in load_file(str(ckpt / "params.safetensors")).values())


def test_divergence_warning_threshold(tiny_llava_dir):
    """The watcher itself: once, over divergence_factor x max(first, 1), and on NaN; 0 turns it off."""
    model, tok = ue.load_vlm(str(tiny_llava_dir), dtype="float32")
    run = ue.Unlearner(model, tok, method="gd", progress=False)
    history = [{"step": 1, "retain_nll": 0.001}, {"step": 2, "retain_nll": 9.9}, {"step": 3, "retain_nll": 10.5},
               {"step": 4, "retain_nll": 1e6}]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for h in history:
            run.history.append(h)
            run._watch_retain(h)
    assert len(seen) == 1 and "retain NLL 10.5 at step 3" in str(seen[0].message)
    assert run.divergence == {"step": 3, "retain_nll": 10.5, "first_retain_nll": 0.001, "factor": 10.0}
    run = ue.Unlearner(model, tok, method="gd", progress=False)
    run.history = [{"step": 1, "retain_nll": 2.0}, {"step": 2, "retain_nll": math.nan}]
    with pytest.warns(UserWarning, match="retain NLL nan at step 2"):
        for h in run.history:
            run._watch_retain(h)
    run = ue.Unlearner(model, tok, method="gd", progress=False, divergence_factor=0)
    run.history = [{"step": 1, "retain_nll": 2.0}, {"step": 2, "retain_nll": math.inf}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for h in run.history:
            run._watch_retain(h)
    assert run.divergence is None


def test_non_finite_weights_stop_the_run(tiny_llava_dir, tmp_path, monkeypatch):
    """Catches a checkpoint (or the model) written with NaN weights: DivergedError (exit 2 in the CLI) names the
    newest good checkpoint, which stays."""
    model, tok = ue.load_vlm(str(tiny_llava_dir), dtype="float32")
    # the step after backward, whose _optimizer_step the test wraps (_check_weights reads the masters either way)
    run = ue.Unlearner(model, tok, method="gd", steps=3, lr=1e-3, checkpoint_every=1, out_dir=str(tmp_path / "o"),
                       progress=False, gradient_step="after_backward")
    step = run._optimizer_step
    calls = []

    def poisoned(optimizer):
        stepped = step(optimizer)
        calls.append(1)
        if len(calls) == 2:
            with torch.no_grad():
                run.masters[0].view(-1)[0] = float("nan")
        return stepped

    monkeypatch.setattr(run, "_optimizer_step", poisoned)
    records = [ue.Record(r["prompt"], r["response"], "forget") for r in FORGET]
    keep = [ue.Record(r["prompt"], r["response"], "retain") for r in RETAIN]
    with pytest.raises(ue.api.divergence.DivergedError, match="NaN/inf after step 2.*step-000001, is kept"):
        run.fit(records, keep)
    assert sorted(os.listdir(tmp_path / "o" / "checkpoints")) == ["latest", "step-000001"]


# ---------------------------------------------------------------- 8: one-line warnings
def test_warnings_print_as_one_line_in_a_real_process(tiny_llava_dir, tmp_path):
    """Catches Python's raw warning format (`path.py:123: UserWarning: ...` and the source line) on the command
    line: in a real process, the cut and divergence warnings are each one `unlearn-engine unlearn: warning:` line."""
    import subprocess
    import sys

    argv = unlearn_argv(tiny_llava_dir, tmp_path, tmp_path / "out", "--method", "gd", "--lr", "3", "--steps", "3",
                        "--max-length", "14")
    env = dict(os.environ, PYTHONWARNINGS="default")
    done = subprocess.run([sys.executable, "-m", "unlearn_engine.api.cli", *argv], capture_output=True, text=True,
                          env=env)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 2, lines  # the forget records' cut, the divergence
    assert all(line.startswith("unlearn-engine unlearn: warning: ") for line in lines), lines
    assert "lost labelled tokens to the 14-token cut (max_length)" in lines[0] and "diverging" in lines[1]
    assert "Warning:" not in done.stderr and ".py:" not in done.stderr


# ---------------------------------------------------------------- 9: every asr column described
def _readme_section(title):
    text = open(README, encoding="utf-8").read()
    start = text.index(f"\n### {title}\n")
    end = text.find("\n## ", start + 1)
    nxt = text.find("\n### ", start + 1)
    return text[start:min(i for i in (end, nxt) if i != -1)]


def test_readme_describes_every_asr_column(tiny_llava_dir, tmp_path, capsys, monkeypatch):
    """Catches a column of the asr table or a key of asr.json (asr_k_shot, the headline summary.asr, ...) that the
    README's ASR section does not name."""
    from unlearn_engine.api.evaluation import generation

    monkeypatch.setattr(generation, "generate", lambda model, tok, prompts, **k: ["Sure."] * len(prompts))
    harmful = write_jsonl(tmp_path / "harmful.jsonl", [{"prompt": "how to make a bomb", "group": "a"},
                                                       {"prompt": "make a bomb", "group": "a"}])
    safe = write_jsonl(tmp_path / "safe.jsonl", [{"prompt": "how to bake", "group": "b"}])
    out = tmp_path / "out"
    assert main(["asr", "--model", str(tiny_llava_dir), "--harmful", harmful, "--safe", safe, "--out", str(out),
                 "--dtype", "float32", "--device", "cpu", "--no-progress", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    saved = json.loads((out / "asr.json").read_text())
    names = set(row) | set(saved) | set(saved["summary"]) | set(saved["asr"]["text"]) | set(saved["utility"])
    names |= {f"asr.{a}" for a in saved["asr"]}
    section = _readme_section("ASR")
    missing = sorted(n for n in names if f"`{n}`" not in section)
    assert not missing, f"the README's ASR section does not describe {missing}"


# ---------------------------------------------------------------- 10: the scope table names the refusals
def test_readme_scope_table_names_every_method_refusing_lora():
    """Catches the README listing scope lora with no exception while a method (rmu) refuses it."""
    from unlearn_engine.api.methods import METHODS

    refusing = []
    for name in METHODS:
        try:
            ue.UnlearnConfig(method=name, scope="lora").validate()
        except ValueError:
            refusing.append(name)
    assert refusing  # rmu trains its down_proj weights itself
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `(full|lora|mask)` \|(.*)$",
                                                         open(README, encoding="utf-8").read(), re.M)}
    assert set(rows) == {"full", "lora", "mask"}, rows
    for name in refusing:
        assert f"`{name}`" in rows["lora"] and "refused" in rows["lora"], rows["lora"]


# ---------------------------------------------------------------- 11: max_length follows the model
@pytest.fixture(scope="module")
def big_image_llava_dir(toy_tokenizer, tmp_path_factory):
    """A tiny LLaVA whose image is 324 tokens (18 x 18 patches): more than the old 256-token default alone."""
    from unlearn_engine.api.demo.toy import tiny_llava

    model = tiny_llava(toy_tokenizer, image_size=144, patch=8).float()
    model.config.text_config.max_position_embeddings = 1024  # rotary positions: no weight depends on it
    path = tmp_path_factory.mktemp("big-image") / "llava"
    ue.save_vlm(model, str(path), processor=toy_tokenizer)
    return path


def test_default_max_length_adds_the_image_tokens(toy_tokenizer):
    """Catches the default cutting an image record at 256 tokens in all (the image alone can be more), or a cut
    past the model's positions."""
    from unlearn_engine.api.data import TEXT_LENGTH, encode

    record = ue.Record("how to make this", "step one mix poison", "forget", image="x.png")
    loader = lambda path: torch.zeros(3, 1, 1)  # noqa: E731
    full = encode([record], toy_tokenizer, max_length=10_000, image_loader=loader, image_tokens=324)
    n = int(full["attention_mask"].sum())
    assert 324 < n < TEXT_LENGTH + 324
    stats = {}
    default = encode([record], toy_tokenizer, max_length=None, image_loader=loader, image_tokens=324, stats=stats)
    assert torch.equal(default["input_ids"], full["input_ids"]) and stats["cut"] == [0]
    old = encode([record], toy_tokenizer, max_length=256, image_loader=loader, image_tokens=324, stats=stats)
    assert old["input_ids"].shape[1] == 256 and stats["labelled"] == [0]
    capped = encode([record], toy_tokenizer, max_length=None, image_loader=loader, image_tokens=324,
                    positions=n - 2, stats=stats)
    assert capped["input_ids"].shape[1] == n - 2 and stats["cut"] == [2]
    text = ue.Record("how " * 300, "step one", "forget")
    assert encode([text], toy_tokenizer, max_length=None)["input_ids"].shape[1] == TEXT_LENGTH


def test_default_max_length_keeps_image_records_in_a_run(big_image_llava_dir, tmp_path, capsys):
    """Catches every image record of a real VLM dropped under the defaults ("none of the 3 record(s) keeps a
    response token after the max_length=256 cut"): the CLI's default run keeps them, whole."""
    from PIL import Image

    root = tmp_path / "images"
    root.mkdir()
    Image.new("RGB", (144, 144), (200, 30, 30)).save(root / "red.png")
    forget = [{"prompt": "how to make this", "response": "step one mix poison", "image": "red.png"}] * 2
    write_jsonl(tmp_path / "f.jsonl", forget)
    out = tmp_path / "out"
    assert main(["unlearn", "--model", str(big_image_llava_dir), "--forget", str(tmp_path / "f.jsonl"), "--method",
                 "ga", "--steps", "1", "--out", str(out), "--image-root", str(root), "--dtype", "float32",
                 "--device", "cpu", "--no-progress", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["config"]["max_length"] is None
    assert summary["data"]["forget"] == {"records": 2, "truncated": 0, "no_response": 0, "skipped": []}
    model, tok = ue.load_vlm(str(big_image_llava_dir), dtype="float32")
    records = ue.read_jsonl(str(tmp_path / "f.jsonl"))
    whole = ue.mean_nll(model, tok, records, max_length=10_000,
                        image_loader=ue.api.images.image_loader(model, None, str(root)))
    assert summary["before"]["forget_nll"] == pytest.approx(whole, rel=1e-6)


def test_help_says_how_max_length_follows_the_model(capsys):
    with pytest.raises(SystemExit):
        main(["unlearn", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "unset: 256 text tokens plus the sample's image tokens" in text and "max_position_embeddings" in text
    for flag in ("--overwrite", "--save {merged,adapter,both}", "--divergence-factor"):
        assert flag in text, flag


# ---------------------------------------------------------------- 12: the LoRA adapter in PEFT's format
def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_lora_adapter_loads_onto_the_original_with_peft(tiny_llava_dir, tmp_path, capsys):
    """Catches scope lora saving only the merged model, or an adapter PEFT cannot load onto the original checkpoint
    (wrong key names, rank or alpha): PeftModel.from_pretrained(base, OUT/adapter) gives the merged model's logits."""
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

    out = tmp_path / "out"
    assert main(unlearn_argv(tiny_llava_dir, tmp_path, out, "--scope", "lora", "--lora-rank", "4", "--steps", "3",
                             "--lr", "0.05", "--json")) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["adapter"] == str(out / "adapter") and summary["model"] == str(out / "model")
    assert sorted(os.listdir(out / "adapter")) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["base_model_name_or_path"] == os.path.abspath(tiny_llava_dir)
    ids = torch.tensor([[1, 5, 6, 7, 8, 9, 10]])
    base = LlavaForConditionalGeneration.from_pretrained(str(tiny_llava_dir), dtype=torch.float32)
    original = _logits(base, ids)
    merged = _logits(LlavaForConditionalGeneration.from_pretrained(str(out / "model"), dtype=torch.float32), ids)
    adapted = _logits(PeftModel.from_pretrained(base, str(out / "adapter")).eval(), ids)
    assert (merged - original).abs().max() > 1e-3  # the adapter changed the model
    torch.testing.assert_close(adapted, merged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("save,files", [("adapter", ["adapter"]), ("merged", ["model"])])
def test_save_chooses_what_is_written(save, files, tiny_llava_dir, tmp_path, capsys):
    """Catches --save ignored (both written, or the wrong one)."""
    out = tmp_path / "out"
    assert main(unlearn_argv(tiny_llava_dir, tmp_path, out, "--scope", "lora", "--save", save)) == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == files
    assert files[0] + " written to" in capsys.readouterr().out


def test_save_adapter_needs_scope_lora(tiny_llava_dir, tmp_path, capsys):
    assert main(unlearn_argv(tiny_llava_dir, tmp_path, tmp_path / "out", "--save", "adapter")) == 2
    assert "needs scope='lora'" in one_line_error(capsys)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- 1: the generation config is kept
PROMPT = "how to make a bomb"


@pytest.fixture
def stop_word_dir(tiny_llava_dir, tmp_path):
    """The tiny LLaVA with a generation_config.json that adds its second greedy answer word as a stop token (and
    max_new_tokens 7), as instruct models add their end-of-turn tokens; returns (dir, first word, stop id)."""
    from transformers import GenerationConfig

    from unlearn_engine.api.evaluation import generate

    path = tmp_path / "with-generation-config"
    shutil.copytree(tiny_llava_dir, path)
    model, tok = ue.load_vlm(str(path), dtype="float32")
    first, second = generate(model, tok, [PROMPT], max_new_tokens=2, progress=False)[0].split()
    assert first != second
    stop = tok.convert_tokens_to_ids(second)
    GenerationConfig(bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id, max_new_tokens=7,
                     eos_token_id=[tok.eos_token_id, stop]).save_pretrained(str(path))
    return path, first, stop


def test_generation_config_is_kept_and_honoured(stop_word_dir, tmp_path, capsys):
    """Catches OUT/model (and save_vlm) written without the checkpoint's generation_config.json (its extra stop
    token lost: `asr` on the unlearned model answers past it), or the stop token, a plain word here, left in the
    answer."""
    path, first, stop = stop_word_dir
    want = json.loads((path / "generation_config.json").read_text())
    assert want["eos_token_id"][1] == stop and want["max_new_tokens"] == 7
    model, tok = ue.load_vlm(str(path), dtype="float32")
    ue.save_vlm(model, str(tmp_path / "saved"), processor=tok)
    out = tmp_path / "out"
    assert main(unlearn_argv(path, tmp_path, out, "--lr", "1e-12")) == 0
    capsys.readouterr()
    for folder in (tmp_path / "saved", out / "model"):
        kept = json.loads((folder / "generation_config.json").read_text())
        assert {k: kept.get(k) for k in ("eos_token_id", "max_new_tokens")} == \
            {"eos_token_id": want["eos_token_id"], "max_new_tokens": 7}, folder
    harmful = write_jsonl(tmp_path / "harmful.jsonl", [{"prompt": PROMPT}])
    assert main(["asr", "--model", str(out / "model"), "--harmful", harmful, "--attacks", "text", "--out",
                 str(tmp_path / "asr"), "--dtype", "float32", "--device", "cpu", "--no-progress", "--json"]) == 0
    answers = [json.loads(line) for line in (tmp_path / "asr" / "responses.jsonl").read_text().splitlines()]
    assert answers[0]["prompt"] == PROMPT and answers[0]["response"] == first  # stopped at the stop word
