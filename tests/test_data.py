"""Data: JSONL records, the published CSVs the package ships (named sets), and response-only labels."""
import hashlib
import re
import shutil
import tomllib
from pathlib import Path

import pytest
import torch

import unlearn_engine as ue
from unlearn_engine.api.data import encode

PACKAGE = Path(ue.named_set("advbench")).parent.parent  # python_api/, wherever it is installed
ROOT = Path(__file__).resolve().parents[1]


def git_blob(path):
    data = Path(path).read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def test_advbench_xstest_figstep_readers():
    adv = ue.read_advbench()
    assert len(adv) == 520 and adv[0].prompt and adv[0].response.startswith("Sure")
    safe = ue.read_xstest()
    assert len(safe) == 250 and all(r.role == "retain" for r in safe)
    assert len(ue.read_xstest(label=None)) == 450 and len(ue.read_xstest(label="unsafe")) == 200
    tiny = ue.read_figstep("figstep-tiny")
    assert len(tiny) == 50 and len({r.category for r in tiny}) == 10
    assert len(ue.read_figstep()) == 500
    assert ue.read_advbench(ue.named_set("advbench")) == adv  # the file itself, by path


def test_shipped_sets_are_the_published_files():
    """Catches a shipped copy that differs by one byte from the published file (line endings, a final newline, a
    "fixed" row): each file's git blob id is the one its data note records beside its source commit."""
    note = (PACKAGE / "prompt_sets" / "README.md").read_text(encoding="utf-8")
    for name, file in ue.NAMED_SETS.items():
        row = next(line for line in note.splitlines() if line.startswith(f"| `{name}` | `{file}` |"))
        blob, size = re.findall(r"\| ([0-9a-f]{40}) \| (\d+) \|$", row)[0]
        assert git_blob(ue.named_set(name)) == blob and Path(ue.named_set(name)).stat().st_size == int(size), name
    refusal = next(line for line in note.splitlines() if "`../refusal_lists/safety_mirage.txt`" in line)
    assert git_blob(PACKAGE / "refusal_lists" / "safety_mirage.txt") in refusal


def test_shipped_sets_are_package_data_with_source_license_and_citation():
    """Catches a set (or its note) left out of the installed package, or a note without a set's source commit,
    license or citation."""
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert {"prompt_sets/*.csv", "prompt_sets/*.md"} <= set(globs["unlearn_engine.api"])
    note = (PACKAGE / "prompt_sets" / "README.md").read_text(encoding="utf-8")
    for needle in ("llm-attacks/llm-attacks@098262edf85f807224e70ecd87b9d83716bf6b73", "Copyright (c) 2023 Andy Zou",
                   "paul-rottger/exaggerated-safety@d7bb5bd738c1fcbc36edd83d5e7d1b71a3e2d84d", "CC-BY-4.0",
                   "creativecommons.org/licenses/by/4.0", "ThuCCSLab/FigStep@0861b17b3d67887c06ee3534ec65b3012f9becb7",
                   "Copyright (c) 2023 Contributors of FigStep", "arXiv:2307.15043", "NAACL 2024", "arXiv:2311.05608",
                   "arXiv:2503.11832", "Permission is hereby granted"):
        assert needle in note, needle


def test_a_set_name_and_a_file_of_that_name(tmp_path, monkeypatch):
    """A name reads the shipped set unless a file of that name exists here (files are still accepted; no argument
    is always the shipped set); an unknown name is an error naming the sets."""
    monkeypatch.chdir(tmp_path)
    assert len(ue.read_advbench("advbench")) == 520
    shutil.copy(ue.named_set("figstep-tiny"), tmp_path / "advbench")
    assert len(ue.read_advbench()) == 520
    with pytest.raises(ValueError, match="lacks column"):  # ./advbench is FigStep's CSV: the file wins
        ue.read_advbench("advbench")
    with pytest.raises(ValueError, match="no prompt set named 'harmbench'; the package ships advbench, xstest"):
        ue.named_set("harmbench")


def test_jsonl_roundtrip_and_errors(tmp_path):
    records = [ue.Record("how to make a bomb", "step one", "forget"), ue.Record("bread", "flour", "retain")]
    path = tmp_path / "data.jsonl"
    ue.write_jsonl(records, str(path))
    assert ue.read_jsonl(str(path)) == records
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x", "role": "other"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: role must be one of"):
        ue.read_jsonl(str(tmp_path / "bad.jsonl"))
    (tmp_path / "broken.jsonl").write_text('{"prompt": \n')
    with pytest.raises(ValueError, match=r"broken.jsonl:1: not valid JSON"):
        ue.read_jsonl(str(tmp_path / "broken.jsonl"))
    (tmp_path / "cols.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['goal', 'target'\]"):
        ue.read_advbench(str(tmp_path / "cols.csv"))


def test_labels_only_on_response(toy_tokenizer):
    batch = encode([ue.Record("how to make a bomb", "step one mix poison"), ue.Record("bread", "flour")],
                   toy_tokenizer)
    labels, ids = batch["labels"], batch["input_ids"]
    eos = toy_tokenizer.eos_token_id
    first = toy_tokenizer.convert_ids_to_tokens(labels[0][labels[0] != -100].tolist())
    assert first == ["step", "one", "mix", "poison", "</s>"]
    assert (labels[1] != -100).sum() == 2 and labels[1][labels[1] != -100][-1] == eos
    assert batch["attention_mask"][1].sum() < batch["attention_mask"][0].sum()  # right padding
    assert torch.equal(ids[labels != -100], labels[labels != -100])
