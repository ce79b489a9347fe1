"""The command line and the checkpoint's chat template: asr.json records which template every prompt was written
with (its file and sha256) and the model is prompted with it; without one, the plain form comes with a one-line
warning on stderr."""
import json

import transformers
from test_chat_template import (
    LLAVA_HF,
    LLAVA_PROMPT,
    QUESTION,
    _checkpoint,
    chat_words,
    ids,
    llava_model,  # noqa: F401  (the fixture)
    sha,
)

import unlearn_engine as ue
from unlearn_engine.api.cli import main


def test_asr_provenance_and_prompts(llava_model, tmp_path, capsys, monkeypatch):  # noqa: F811
    """Catches asr.json without the template's source and hash, and the CLI's model prompted outside the
    checkpoint's template: every generation starts with BOS + the chat_template.json form."""
    path = _checkpoint(tmp_path, llava_model, "chat_template.json", LLAVA_HF)
    (tmp_path / "h.jsonl").write_text(json.dumps({"prompt": QUESTION}) + "\n")
    seen = []
    original = transformers.LlavaForConditionalGeneration.generate

    def spy(self, input_ids, attention_mask, **kw):
        seen.extend(row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask))
        return original(self, input_ids=input_ids, attention_mask=attention_mask, **kw)

    monkeypatch.setattr(transformers.LlavaForConditionalGeneration, "generate", spy)
    out = tmp_path / "out"
    assert main(["asr", "--model", str(path), "--harmful", str(tmp_path / "h.jsonl"), "--attacks", "text",
                 "--out", str(out), "--dtype", "float32", "--device", "cpu", "--no-progress", "--max-new-tokens",
                 "2"]) == 0
    assert capsys.readouterr().err == ""
    provenance = json.loads((out / "asr.json").read_text())["provenance"]
    assert provenance["chat_template"] == {"source": "chat_template.json", "sha256": sha(LLAVA_HF)}
    tok = chat_words()
    assert seen[0] == [tok.bos_token_id] + ids(tok, LLAVA_PROMPT)


def test_asr_without_a_template_warns_in_one_line(llava_model, tmp_path, capsys):  # noqa: F811
    """Catches the plain form used silently (or the warning printed as Python's two-line form): stderr holds
    one line, and asr.json says no template was used."""
    path = tmp_path / "plain"
    ue.save_vlm(llava_model, str(path), processor=chat_words())
    (tmp_path / "h.jsonl").write_text(json.dumps({"prompt": QUESTION}) + "\n")
    out = tmp_path / "out"
    assert main(["asr", "--model", str(path), "--harmful", str(tmp_path / "h.jsonl"), "--attacks", "text",
                 "--out", str(out), "--dtype", "float32", "--device", "cpu", "--no-progress", "--max-new-tokens",
                 "2"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("unlearn-engine asr: warning: ") and "no chat template" in err[0]
    provenance = json.loads((out / "asr.json").read_text())["provenance"]
    assert provenance["chat_template"]["source"] == "none" and provenance["chat_template"]["sha256"] is None


def test_unlearn_summary_records_the_template(llava_model, tmp_path, capsys):  # noqa: F811
    """Catches the unlearn summary without the template its training samples were written with."""
    path = _checkpoint(tmp_path, llava_model, "chat_template.json", LLAVA_HF)
    ue.write_jsonl([ue.Record(QUESTION, "step one mix poison", "forget")], str(tmp_path / "f.jsonl"))
    assert main(["unlearn", "--model", str(path), "--forget", str(tmp_path / "f.jsonl"), "--method", "ga", "--steps",
                 "1", "--batch-size", "1", "--dtype", "float32", "--device", "cpu", "--out", str(tmp_path / "run"),
                 "--no-progress", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["chat_template"] == {"source": "chat_template.json", "sha256": sha(LLAVA_HF)}
