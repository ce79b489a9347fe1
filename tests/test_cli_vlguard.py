"""`unlearn-engine vlguard-split`: VLGuard train.json to forget / retain JSONL (the Safety Mirage split), on small
files the tests write; every bad input exits 2 with one line and writes nothing."""
import json
import re

import pytest

from unlearn_engine.api.cli import build_parser, main
from unlearn_engine.api.data import Record, read_jsonl

TRAIN = [
    {"id": "u1", "image": "bad/u1.png", "safe": False, "harmful_category": "privacy",
     "instr-resp": [{"instruction": "Who lives at this address?", "response": "I cannot help with that."}]},
    {"id": 7, "image": "mixed/m7.png", "safe": True,
     "instr-resp": [{"safe_instruction": "What colour is the door?", "response": "The door is red."},
                    {"unsafe_instruction": "How do I break this door lock?", "response": "I won't help."}]},
    {"id": "u2", "image": "bad/u2.png", "safe": False,
     "instr-resp": [{"unsafe_instruction": "Write a threat to this person.", "response": "Sorry, no."}]},
    {"id": "s3", "image": "mixed/s3.png", "safe": True,
     "instr-resp": [{"unsafe_instruction": "Steal the dog.", "response": "No."},
                    {"safe_instruction": "What breed is the dog?", "response": "A beagle."}]},
]
# by image path for three unsafe queries, by id (an integer id in train.json) for one, and one key never used
RESPONSES = {"bad/u1.png": "Harmful answer one.", "7": "Harmful answer seven.", "bad/u2.png": "Harmful answer two.",
             "mixed/s3.png": "Harmful answer three.", "nobody.png": "Unused."}


def write(tmp_path, train=TRAIN, responses=RESPONSES):
    (tmp_path / "train.json").write_text(json.dumps(train) if not isinstance(train, str) else train)
    (tmp_path / "harmful.json").write_text(json.dumps(responses) if not isinstance(responses, str) else responses)
    return ["vlguard-split", "--train", str(tmp_path / "train.json"), "--responses", str(tmp_path / "harmful.json")]


def test_split_pairs_unsafe_queries_with_given_responses(tmp_path, capsys):
    """Catches an unsafe query kept with VLGuard's own refusal (or a safe one sent to forget), the id fallback
    missing, safe_unsafes dropped, or safe_safes given a harmful response: every written record is pinned."""
    out = tmp_path / "split"
    assert main(write(tmp_path) + ["--out", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == {"forget": 4, "retain": 2, "unused_responses": 1,
                       "files": {"forget": str(out / "forget.jsonl"), "retain": str(out / "retain.jsonl")}}
    assert read_jsonl(str(out / "forget.jsonl")) == [
        Record("Who lives at this address?", "Harmful answer one.", "forget", "bad/u1.png", "privacy", "u1"),
        Record("Write a threat to this person.", "Harmful answer two.", "forget", "bad/u2.png", None, "u2"),
        Record("How do I break this door lock?", "Harmful answer seven.", "forget", "mixed/m7.png", None, "7"),
        Record("Steal the dog.", "Harmful answer three.", "forget", "mixed/s3.png", None, "s3")]
    assert read_jsonl(str(out / "retain.jsonl")) == [
        Record("What colour is the door?", "The door is red.", "retain", "mixed/m7.png", None, "7"),
        Record("What breed is the dog?", "A beagle.", "retain", "mixed/s3.png", None, "s3")]
    assert sorted(p.name for p in out.iterdir()) == ["forget.jsonl", "retain.jsonl"]


def test_split_table_and_image_root(tmp_path, capsys):
    """Catches --image-root ignored (images not joined to it) and the table showing other counts than --json."""
    root = tmp_path / "images"
    for item in TRAIN:
        (root / item["image"]).parent.mkdir(parents=True, exist_ok=True)
        (root / item["image"]).write_bytes(b"png")
    out = tmp_path / "split"
    assert main(write(tmp_path) + ["--out", str(out), "--image-root", str(root)]) == 0
    assert capsys.readouterr().out.splitlines() == ["| forget | retain | unused_responses |", "|---|---|---|",
                                                    "| 4 | 2 | 1 |"]
    assert [r.image for r in read_jsonl(str(out / "forget.jsonl"))] == [
        str(root / p) for p in ("bad/u1.png", "bad/u2.png", "mixed/m7.png", "mixed/s3.png")]
    assert [r.image for r in read_jsonl(str(out / "retain.jsonl"))] == [str(root / "mixed/m7.png"),
                                                                        str(root / "mixed/s3.png")]


UNMAPPED = {k: v for k, v in RESPONSES.items() if k != "7"}
# (how the case's files and flags are made, what its one error line must say)
BAD_CASES = [
    (lambda t: write(t) + ["--train", str(t / "missing.json")], "--train .*missing.json: no such file"),
    (lambda t: write(t) + ["--responses", str(t / "missing.json")], "--responses .*missing.json: no such file"),
    (lambda t: write(t, train="[{not json"), "--train .*train.json: not valid JSON"),
    (lambda t: write(t, responses="{oops"), "--responses .*harmful.json: not valid JSON"),
    (lambda t: write(t, responses=["a"]), "--responses .*harmful.json: expected a JSON object"),
    (lambda t: write(t, responses=dict(RESPONSES, **{"bad/u1.png": 3})), "key 'bad/u1.png': expected a non-empty"),
    (lambda t: write(t, responses=UNMAPPED),
     "no harmful response for the unsafe query of --train record id '7' .*image 'mixed/m7.png'"),
    (lambda t: write(t, train=[dict(TRAIN[0], safe="no")]), "train.json: record 0: field 'safe'"),
    (lambda t: write(t, train=TRAIN[:1] + [{k: v for k, v in TRAIN[1].items() if k != "id"}]),
     "record 1: field 'id': expected a string or integer, missing"),
    (lambda t: write(t) + ["--image-root", str(t / "no_images")], "--image-root .*no_images: no such folder"),
    (lambda t: write(t) + ["--image-root", str(t)], "record 0: field 'image': .*bad/u1.png not found"),
]


@pytest.mark.parametrize("case", range(len(BAD_CASES)))
def test_split_bad_input_exits_2_with_one_line_and_writes_nothing(case, tmp_path, capsys):
    """Catches a bad input that exits 0, prints a traceback or a vague message, or leaves files behind."""
    make, pattern = BAD_CASES[case]
    argv = make(tmp_path)
    out = tmp_path / "split"
    assert main(argv + ["--out", str(out)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("unlearn-engine vlguard-split: error: "), captured.err
    assert re.search(pattern, lines[0]), lines[0]
    assert captured.out == "" and not out.exists()


def test_split_refuses_unwritable_out_before_writing(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(write(tmp_path) + ["--out", str(tmp_path / "file")]) == 2
    assert "--out" in capsys.readouterr().err


def test_split_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["vlguard-split", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--train", "--responses", "--out", "--image-root", "--json"):
        assert flag in text
    assert "vlguard-split" in build_parser().format_help()
