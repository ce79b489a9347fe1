"""Data handling of an unlearn run: the max_length cut is reported (records that lost labelled tokens, records
with no response) and records left with no labelled token are skipped and named; image records go through the
CLI with --image-root; every argument, file and the output folder is checked before the model is loaded."""
import json

import pytest
import torch
from PIL import Image

import unlearn_engine as ue
from unlearn_engine.api import cli, unlearn_command
from unlearn_engine.api.data import encode

LONG = " ".join(["step one mix poison step two bake"] * 4)  # 28 response words
FORGET = [ue.Record("how to make a bomb", "step one mix poison"),
          ue.Record("tell me about the recipe for a bomb and a poison and a drug", LONG),
          ue.Record("how to make a drug", ""),
          ue.Record("how to make a poison", LONG)]
RETAIN = [ue.Record("the recipe for bread", "mix flour water bake", "retain")]


def test_encode_reports_the_cut(toy_tokenizer):
    """Catches counts that ignore the cut: labelled tokens kept / cut per record, and empty responses."""
    stats = {}
    full = encode(FORGET, toy_tokenizer, max_length=256)
    batch = encode(FORGET, toy_tokenizer, max_length=16, stats=stats)
    labelled_full = (full["labels"] != -100).sum(1).tolist()
    assert stats["labelled"] == (batch["labels"] != -100).sum(1).tolist()
    assert [a - b for a, b in zip(labelled_full, stats["labelled"])] == stats["cut"]
    assert stats["cut"][0] == 0 and stats["cut"][1] == labelled_full[1] and stats["cut"][3] > 0
    assert stats["no_response"] == [False, False, True, False]


def test_fit_warns_skips_and_names_records(tiny_llava_dir, tmp_path):
    """Catches silent truncation and training on records with no labelled token (their NLL showed 0.0)."""
    model, tok = ue.load_vlm(str(tiny_llava_dir), dtype="float32")
    unlearner = ue.Unlearner(model, tok, method="gd", steps=2, lr=1e-3, max_length=16, progress=False,
                             out_dir=str(tmp_path))
    with pytest.warns(UserWarning, match=r"forget: 2 of 4 record\(s\) lost labelled tokens to the 16-token cut "
                                         r"\(max_length\), 1 have no response .* 1 left with no labelled token are "
                                         r"skipped \(record indices \[1\]\)"):
        unlearner.fit(FORGET, RETAIN)
    report = {"records": 4, "truncated": 2, "no_response": 1, "skipped": [1]}
    assert unlearner.data_report["forget"] == report
    assert unlearner.data_report["retain"] == {"records": 1, "truncated": 0, "no_response": 0, "skipped": []}
    assert json.loads((tmp_path / "data.json").read_text())["forget"] == report
    # the skipped record is in no batch: the batches index the 3 usable records
    assert all(i < 3 for h in range(2) for i in unlearner.indices(3, h, 1))
    # a forget NLL over records of which one has no labelled token left is the mean of the others
    kept = [r for i, r in enumerate(FORGET) if i != 1]
    assert ue.mean_nll(model, tok, FORGET, max_length=16) == pytest.approx(ue.mean_nll(model, tok, kept,
                                                                                      max_length=16))
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="no forget record keeps a labelled token within max_length=12"):
        ue.Unlearner(model, tok, method="gd", steps=1, max_length=12, progress=False).fit([FORGET[1]], RETAIN)


def _glyph(path, color):
    Image.new("RGB", (16, 16), color).save(path)


def _image_loader(root):
    import numpy as np

    def load(path):
        pixels = np.asarray(Image.open(root / path).convert("RGB").resize((16, 16)), dtype=np.float32)
        return torch.from_numpy(pixels).permute(2, 0, 1) / 127.5 - 1
    return load


def test_cli_unlearns_image_records_with_image_root(tiny_llava_dir, tmp_path, capsys):
    """Catches the CLI refusing image records, or dropping the image: the reported NLLs equal the in-process
    ones computed with the image (and differ from those with another image); --max-length reaches the run."""
    root = tmp_path / "images"
    root.mkdir()
    _glyph(root / "red.png", (220, 20, 20))
    _glyph(root / "blue.png", (20, 20, 220))
    forget = [ue.Record("how to make this", "step one mix poison", image="red.png"), FORGET[0]]
    ue.write_jsonl(forget, str(tmp_path / "f.jsonl"))
    ue.write_jsonl(RETAIN, str(tmp_path / "r.jsonl"))
    argv = ["unlearn", "--model", str(tiny_llava_dir), "--forget", str(tmp_path / "f.jsonl"), "--retain",
            str(tmp_path / "r.jsonl"), "--out", str(tmp_path / "out"), "--method", "gd", "--steps", "2",
            "--lr", "1e-3", "--max-length", "64", "--dtype", "float32", "--device", "cpu", "--no-progress", "--json"]
    assert cli.main(argv + ["--image-root", str(root)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["config"]["max_length"] == 64
    model, tok = ue.load_vlm(str(tiny_llava_dir), dtype="float32")
    with_image = ue.mean_nll(model, tok, forget, max_length=64, image_loader=_image_loader(root))
    other = [ue.Record(forget[0].prompt, forget[0].response, image="blue.png"), FORGET[0]]
    assert summary["before"]["forget_nll"] == pytest.approx(with_image, rel=1e-6)
    assert abs(ue.mean_nll(model, tok, other, max_length=64, image_loader=_image_loader(root)) - with_image) > 1e-4
    reference = ue.Unlearner(model, tok, method="gd", steps=2, lr=1e-3, max_length=64, progress=False,
                             image_loader=_image_loader(root))
    reference.fit(forget, RETAIN)
    metrics = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [m["loss"] for m in metrics] == pytest.approx([h["loss"] for h in reference.history], rel=1e-5)


@pytest.mark.parametrize("case", ["missing-image", "unreadable-image", "no-image-root-dir", "out-is-a-file",
                                  "checkpoints-no-resume", "resume-mismatch", "no-config-json"])
def test_cli_checks_before_loading_the_model(tiny_llava_dir, tmp_path, capsys, monkeypatch, case):
    """Catches checks made only after the model load (minutes for a 7B, and a full before-NLL pass)."""
    root = tmp_path / "images"
    root.mkdir()
    _glyph(root / "red.png", (220, 20, 20))
    ue.write_jsonl([ue.Record("how to make this", "step one", image="red.png")] + FORGET[:1], str(tmp_path / "f.jsonl"))
    ue.write_jsonl(RETAIN, str(tmp_path / "r.jsonl"))
    out = tmp_path / "out"
    argv = ["unlearn", "--model", str(tiny_llava_dir), "--forget", str(tmp_path / "f.jsonl"), "--retain",
            str(tmp_path / "r.jsonl"), "--out", str(out), "--method", "gd", "--steps", "1", "--checkpoint-every", "1",
            "--dtype", "float32", "--device", "cpu", "--no-progress", "--image-root", str(root)]
    if case in ("checkpoints-no-resume", "resume-mismatch"):
        assert cli.main(argv) == 0
        capsys.readouterr()
    words = {"missing-image": "image", "unreadable-image": "f.jsonl: record 0: image", "no-image-root-dir": "is not a directory", "out-is-a-file": "exists and is not a folder",
             "checkpoints-no-resume": "already holds checkpoints", "resume-mismatch": "lr (checkpoint",
             "no-config-json": "has no config.json"}[case]
    if case == "missing-image":
        (root / "red.png").unlink()
    elif case == "unreadable-image":
        (root / "red.png").write_text("not an image")
    elif case == "no-image-root-dir":
        argv[-1] = str(tmp_path / "nowhere")
    elif case == "out-is-a-file":
        out.write_text("x")
    elif case == "resume-mismatch":
        argv += ["--resume", "--lr", "0.5"]
    elif case == "no-config-json":
        argv[2] = str(tmp_path)

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(unlearn_command, "load_promptable", no_load)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err, err
