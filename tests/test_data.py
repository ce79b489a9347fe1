"""Data: JSONL records, the published CSVs in ../shared/data, and response-only labels."""
import pytest
import torch

import unlearn_engine as ue
from unlearn_engine.api.data import encode

from conftest import SHARED_DATA


def test_advbench_xstest_figstep_readers():
    adv = ue.read_advbench(str(SHARED_DATA / "advbench_harmful_behaviors.csv"))
    assert len(adv) == 520 and adv[0].prompt and adv[0].response.startswith("Sure")
    safe = ue.read_xstest(str(SHARED_DATA / "xstest_prompts.csv"))
    assert len(safe) == 250 and all(r.role == "retain" for r in safe)
    assert len(ue.read_xstest(str(SHARED_DATA / "xstest_prompts.csv"), label=None)) == 450
    tiny = ue.read_figstep(str(SHARED_DATA / "figstep_safebench_tiny.csv"))
    assert len(tiny) == 50 and len({r.category for r in tiny}) == 10
    assert len(ue.read_figstep(str(SHARED_DATA / "figstep_safebench.csv"))) == 500


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
