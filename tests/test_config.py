"""One configuration source: the CLI's unlearn flags come from UnlearnConfig, --config files, the resolved
config.json, and methods registered from outside the loop."""
import dataclasses
import json

import pytest
import torch

import unlearn_engine as ue
from unlearn_engine.api import cli, methods
from unlearn_engine.api.config import UnlearnConfig

FORGET = [ue.Record("how to make a bomb", "step one mix poison", "forget"),
          ue.Record("how to make a poison", "step one mix drug", "forget")]
RETAIN = [ue.Record("how to make a bread", "step one mix flour", "retain"),
          ue.Record("how to make a cake", "step one mix sugar", "retain")]


def test_help_lists_every_field_with_its_default(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["unlearn", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(UnlearnConfig):
        flag = "--" + f.name.replace("_", "-")
        assert flag in text, flag
        assert f"(default: {f.default})" in text.split(flag, 1)[1], f"{flag} does not show default {f.default}"


def test_config_validation_names_the_setting():
    for bad, match in [({"method": "sft"}, "method must be one of"), ({"scope": "lora2"}, "scope must be one of"),
                       ({"lr": float("inf")}, "lr must be finite"), ({"beta": float("nan")}, "beta must be finite"),
                       ({"steps": 0}, "steps must be >= 1"), ({"mask_fraction": 1.5}, "mask_fraction"),
                       ({"method": "rmu", "scope": "lora"}, "RMU trains"), ({"lr": "fast"}, "lr must be a number"),
                       ({"keep_checkpoints": -1}, "keep_checkpoints must be >= 0, got -1")]:
        with pytest.raises(ValueError, match=match):
            UnlearnConfig(**bad).validate()


@pytest.fixture
def data_files(tmp_path):
    ue.write_jsonl(FORGET, str(tmp_path / "f.jsonl"))
    ue.write_jsonl(RETAIN, str(tmp_path / "r.jsonl"))
    return tmp_path / "f.jsonl", tmp_path / "r.jsonl"


@pytest.mark.parametrize("fmt", ["json", "toml"])
def test_run_from_config_file_and_flags_win(tiny_llava_dir, data_files, tmp_path, capsys, fmt):
    forget, retain = data_files
    out = tmp_path / "run"
    settings = {"model": str(tiny_llava_dir), "forget": str(forget), "retain": str(retain), "out": str(out),
                "dtype": "float32", "device": "cpu", "method": "gd", "steps": 2, "lr": 0.003, "batch_size": 2,
                "retain_weight": 0.5, "max_length": 64}
    path = tmp_path / f"run.{fmt}"
    if fmt == "json":
        path.write_text(json.dumps(settings))
    else:
        path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items()))
    assert cli.main(["unlearn", "--config", str(path), "--steps", "3", "--no-progress", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["config"]["steps"] == 3              # the flag won over the file
    assert summary["config"]["retain_weight"] == 0.5    # the file won over the dataclass default
    assert summary["config"]["lr"] == 0.003
    resolved = json.loads((out / "config.json").read_text())
    assert resolved["steps"] == 3 and resolved["model"] == str(tiny_llava_dir) and resolved["method"] == "gd"
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3


def test_config_file_errors_exit_2(tiny_llava_dir, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model": str(tiny_llava_dir), "learning_rate": 1}))
    assert cli.main(["unlearn", "--config", str(bad)]) == 2
    assert "unknown setting(s) ['learning_rate']" in capsys.readouterr().err
    assert cli.main(["unlearn", "--config", str(tmp_path / "missing.toml")]) == 2
    assert cli.main(["unlearn", "--forget", "x.jsonl", "--out", str(tmp_path / "o")]) == 2
    assert "--model is required" in capsys.readouterr().err


class HalfRetain(methods.UnlearningMethod):
    """A method defined outside the package: GA on forget + 0.25 x retain NLL, trains only the head."""

    name = "test_half_retain"
    needs_retain = True

    def trainable_modules(self, model, config):
        return [model.get_output_embeddings()]

    def loss(self, run, forget, retain, step):
        return run.fused_loss(run.batch(forget, retain, step), forget="ga", retain="nll", retain_weight=0.25)


@pytest.fixture
def registered():
    ue.register_method(HalfRetain)
    yield HalfRetain
    methods.METHODS.pop(HalfRetain.name)


def test_registered_method_reaches_unlearner_and_cli(registered, tiny_llava_dir, data_files, tmp_path, capsys):
    model, tok = ue.load_vlm(str(tiny_llava_dir), dtype="float32")
    head_before = model.get_output_embeddings().weight.detach().clone()
    embed_before = model.get_input_embeddings().weight.detach().clone()
    run = ue.Unlearner(model, tok, method=registered.name, steps=1, lr=1e-2, batch_size=2, progress=False)
    history = run.fit(FORGET, RETAIN)
    assert [n for n, _ in run.named_params] == ["lm_head.weight"]
    assert not torch.equal(model.get_output_embeddings().weight, head_before)
    assert torch.equal(model.get_input_embeddings().weight, embed_before)
    # step 1: the loss is mean forget logp + 0.25 * mean retain NLL of the same batch
    stats = history[0]
    assert history[0]["loss"] == pytest.approx(-stats["forget_nll"] + 0.25 * stats["retain_nll"], rel=1e-5)
    with pytest.raises(ValueError, match="needs retain records"):
        ue.Unlearner(model, tok, method=registered.name, steps=1, progress=False).fit(FORGET)

    forget, retain = data_files
    argv = ["unlearn", "--model", str(tiny_llava_dir), "--forget", str(forget), "--retain", str(retain), "--out",
            str(tmp_path / "cli"), "--method", registered.name, "--steps", "1", "--lr", "0.01", "--dtype", "float32",
            "--device", "cpu", "--no-progress", "--json"]
    assert cli.main(argv) == 0
    assert json.loads(capsys.readouterr().out)["config"]["method"] == registered.name


def test_unregistered_method_is_refused_by_the_cli(tiny_llava_dir, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["unlearn", "--model", str(tiny_llava_dir), "--method", "test_half_retain"])
    assert exit_.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_saved_config_lets_a_new_preset_or_method_fill_its_settings(tiny_llava_dir, data_files, tmp_path, capsys):
    """Catches a run's config.json freezing the values its preset / method filled in: read back with --config and
    another --method / --preset, those settings take the new preset's values (beta 4.5, forget_weight 0.125,
    batch retain pooling, no divergence guard), while a value the user gave (lr) and the run settings are kept;
    read back unchanged, it resolves to the same settings (what --resume relies on)."""
    forget, retain = data_files
    first = tmp_path / "first"
    common = ["--dtype", "float32", "--device", "cpu", "--no-progress", "--json", "--steps", "1"]
    assert cli.main(["unlearn", "--model", str(tiny_llava_dir), "--forget", str(forget), "--retain", str(retain),
                     "--out", str(first), "--method", "npo", "--lr", "0.002", *common]) == 0
    before = json.loads(capsys.readouterr().out)["config"]
    saved = json.loads((first / "config.json").read_text())
    assert "beta" in saved["filled_in"] and "lr" not in saved["filled_in"] and saved["beta"] == 0.1
    second = tmp_path / "second"
    assert cli.main(["unlearn", "--config", str(first / "config.json"), "--out", str(second), "--method", "simnpo",
                     "--preset", "open-unlearning", *common]) == 0
    config = json.loads(capsys.readouterr().out)["config"]
    assert (config["beta"], config["forget_weight"], config["retain_pooling"]) == (4.5, 0.125, "batch")
    assert config["nll_bound"] == float("inf") and config["lr"] == 0.002
    third = tmp_path / "third"
    assert cli.main(["unlearn", "--config", str(first / "config.json"), "--out", str(third), *common]) == 0
    assert json.loads(capsys.readouterr().out)["config"] == before
