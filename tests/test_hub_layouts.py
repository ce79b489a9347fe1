"""Checkpoints as transformers itself writes them (`save_pretrained`, never our save_vlm): LLaVA in its original
(llava-hf) layout and its current one, Qwen2-VL / Qwen2.5-VL in the Hub layout (model.layers.*, visual.*) and the
current one; single file and sharded with an index; fp32 and bf16; tied and untied embeddings. Each loads through
load_vlm with the logits from_pretrained gives, and runs through `unlearn --steps 1` and `asr`."""
import json

import pytest
import torch
from safetensors import safe_open

import unlearn_engine as ue
from unlearn_engine.api.cli import main
from unlearn_engine.api.demo.toy import qwen_tokenizer, tiny_llava, tiny_qwen2_vl, word_tokenizer

from conftest import TOY_WORDS

# (family, original layout?, tied?, sharded?, dtype)
CASES = [
    ("llava", True, False, False, "float32"),
    ("llava", False, False, True, "float32"),
    ("llava", True, True, True, "bfloat16"),
    ("llava", False, True, False, "bfloat16"),
    ("qwen2", True, False, False, "float32"),
    ("qwen2", True, True, True, "bfloat16"),
    ("qwen2", False, False, False, "float32"),
    ("qwen2.5", True, False, True, "float32"),
    ("qwen2.5", True, True, False, "bfloat16"),
]
# the first name of each layout, as save_pretrained writes it
FIRST_KEYS = {("llava", True): "language_model.model.embed_tokens.weight",
              ("llava", False): "model.language_model.embed_tokens.weight",
              ("qwen2", True): "model.embed_tokens.weight", ("qwen2.5", True): "model.embed_tokens.weight",
              ("qwen2", False): "model.language_model.embed_tokens.weight"}
FORGET = [{"prompt": "how to make a bomb", "response": "step one mix poison step two bake"},
          {"prompt": "how to make poison", "response": "mix water sugar"}]
RETAIN = [{"prompt": "tell me about bread", "response": "mix flour water bake"}]


def case_id(case):
    family, original, tied, sharded, dtype = case
    return (f"{family}-{'original' if original else 'current'}-{'tied' if tied else 'untied'}-"
            f"{'sharded' if sharded else 'single'}-{dtype}")


@pytest.fixture(scope="module", params=CASES, ids=case_id)
def hub_checkpoint(request, tmp_path_factory):
    family, original, tied, sharded, dtype = request.param
    if family == "llava":
        tok = word_tokenizer(TOY_WORDS)
        model = tiny_llava(tok, tie_word_embeddings=tied)
    else:
        tok = qwen_tokenizer(TOY_WORDS)
        model = tiny_qwen2_vl(tok, version=family[len("qwen"):], tie_word_embeddings=tied)
    path = tmp_path_factory.mktemp("hub") / case_id(request.param)
    model.to(getattr(torch, dtype)).save_pretrained(str(path), save_original_format=original,
                                                     max_shard_size=20_000 if sharded else "1GB")
    tok.save_pretrained(str(path))
    return request.param, path


def _names(path):
    index = path / "model.safetensors.index.json"
    if index.exists():
        return set(json.loads(index.read_text())["weight_map"])
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return set(f.keys())


def _inputs(model):
    c = model.config
    if hasattr(c, "vision_start_token_id"):  # Qwen-VL: one 16x16 image, 4 visual tokens after merging
        ids = torch.tensor([[2, c.vision_start_token_id] + [c.image_token_id] * 4 + [c.vision_end_token_id, 9, 10]])
        return dict(input_ids=ids, pixel_values=torch.randn(16, 96, generator=torch.Generator().manual_seed(1)),
                    image_grid_thw=torch.tensor([[1, 4, 4]]), mm_token_type_ids=(ids == c.image_token_id).int())
    ids = torch.tensor([[2] + [c.image_token_id] * 4 + [9, 10, 11]])
    return dict(input_ids=ids, pixel_values=torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)))


def test_layout_is_the_one_transformers_writes(hub_checkpoint):
    """The fixture itself: save_pretrained wrote the layout the case names (so the loading test below really
    sees llava-hf's and the Hub's names), sharded with an index when asked, the lm_head stored only when untied."""
    (family, original, tied, sharded, _), path = hub_checkpoint
    names = _names(path)
    assert FIRST_KEYS[family, original] in names
    assert (path / "model.safetensors.index.json").exists() == sharded
    assert any(n.endswith("lm_head.weight") for n in names) != tied


def test_loads_with_the_logits_of_from_pretrained(hub_checkpoint):
    """Catches load_vlm refusing a layout from_pretrained accepts (the Qwen-VL Hub layout was refused as
    'unexpected tensor(s)'), or loading it into other weights."""
    import transformers

    (family, _, tied, _, dtype), path = hub_checkpoint
    model, processor = ue.load_vlm(str(path), dtype=dtype)
    cls = transformers.LlavaForConditionalGeneration if family == "llava" else type(model)
    want = cls.from_pretrained(str(path), dtype=getattr(torch, dtype)).eval()
    assert next(model.parameters()).dtype == getattr(torch, dtype)
    theirs = want.state_dict()
    assert sorted(model.state_dict()) == sorted(theirs)
    assert all(torch.equal(v, theirs[k]) for k, v in model.state_dict().items())
    assert (model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()) == tied
    with torch.no_grad():
        assert torch.equal(model(**_inputs(model)).logits, want(**_inputs(want)).logits)
    assert processor is not None


def test_a_dropped_tensor_is_named_after_the_mapping(hub_checkpoint, tmp_path):
    """The missing-tensor check runs on the mapped names: a Hub-layout checkpoint without one decoder weight is
    refused naming it, not with every tensor 'unexpected'."""
    import shutil

    from safetensors.torch import load_file, save_file

    (family, original, _, sharded, _), path = hub_checkpoint
    if sharded:
        pytest.skip("one single-file case per layout is enough")
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    state = load_file(str(broken / "model.safetensors"))
    victim = next(k for k in state if k.endswith("layers.1.mlp.down_proj.weight"))
    del state[victim]
    save_file(state, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ue.CheckpointError, match=r"^missing tensor\(s\) in the checkpoint: "
                                                 r"\['model.language_model.layers.1.mlp.down_proj.weight'\]$"):
        ue.load_vlm(str(broken))


def test_unlearn_one_step_and_asr(hub_checkpoint, tmp_path, capsys):
    """The commands a user runs first, on the checkpoint as transformers wrote it."""
    (_, _, _, _, dtype), path = hub_checkpoint
    forget, retain = tmp_path / "forget.jsonl", tmp_path / "retain.jsonl"
    forget.write_text("".join(json.dumps(r) + "\n" for r in FORGET))
    retain.write_text("".join(json.dumps(r) + "\n" for r in RETAIN))
    assert main(["unlearn", "--model", str(path), "--forget", str(forget), "--retain", str(retain), "--method", "npo",
                 "--steps", "1", "--batch-size", "2", "--out", str(tmp_path / "run"), "--dtype", dtype,
                 "--no-progress", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["model"] == str(tmp_path / "run" / "model")
    unlearned, _ = ue.load_vlm(summary["model"], dtype=dtype)  # what unlearn wrote reloads too
    assert main(["asr", "--model", summary["model"], "--harmful", str(forget), "--safe", str(retain),
                 "--max-new-tokens", "4", "--out", str(tmp_path / "asr"), "--dtype", dtype, "--no-progress",
                 "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    result = json.loads((tmp_path / "asr" / "asr.json").read_text())
    assert row["asr_k_shot"] == result["summary"]["asr"]
    assert len(result["asr"]["text"]["items"]) == len(FORGET)
    assert sorted(unlearned.state_dict()) == sorted(ue.load_vlm(str(path), dtype=dtype)[0].state_dict())
