"""load_vlm / save_vlm on tiny LLaVA checkpoints: shards, tied embeddings, a user's key_mapping, and broken files.
The checkpoint layouts transformers writes are tested in test_hub_layouts.py."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import unlearn_engine as ue
from unlearn_engine.api.demo.toy import tiny_llava


def _inputs(model):
    image_id = model.config.image_token_id
    ids = torch.tensor([[2, image_id, image_id, image_id, image_id, 9, 10, 11]])
    return dict(input_ids=ids, pixel_values=torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)))


def _same_model(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    with torch.no_grad():
        assert torch.equal(a(**_inputs(a)).logits, b(**_inputs(b)).logits)


def test_roundtrip_single_file(tiny_llava_dir, toy_tokenizer):
    model, tok = ue.load_vlm(str(tiny_llava_dir), dtype="float32")
    assert type(model).__name__ == "LlavaForConditionalGeneration" and not model.training
    assert tok is not None and tok.convert_tokens_to_ids("bomb") == toy_tokenizer.convert_tokens_to_ids("bomb")
    again = tiny_llava(toy_tokenizer).float()
    _same_model(model, again)  # same seed, same weights


def test_roundtrip_sharded_and_dtype(tmp_path, tiny_llava_dir):
    model, _ = ue.load_vlm(str(tiny_llava_dir), dtype="float32")
    ue.save_vlm(model, str(tmp_path / "sharded"), max_shard_bytes=20_000)
    files = os.listdir(tmp_path / "sharded")
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 2
    _same_model(model, ue.load_vlm(str(tmp_path / "sharded"), dtype="float32")[0])
    bf16, _ = ue.load_vlm(str(tmp_path / "sharded"), dtype="bfloat16")
    assert next(bf16.parameters()).dtype == torch.bfloat16


def test_saves_what_save_pretrained_writes(tmp_path, tiny_llava_dir):
    """Catches save_vlm writing its own layout (the current module names) instead of save_pretrained's files:
    the original (llava-hf) key layout, generation_config.json, and a folder plain from_pretrained reloads."""
    from transformers import LlavaForConditionalGeneration

    model, _ = ue.load_vlm(str(tiny_llava_dir), dtype="float32")
    model.generation_config.max_new_tokens = 7
    ue.save_vlm(model, str(tmp_path / "ours"))
    model.save_pretrained(str(tmp_path / "theirs"))
    ours, theirs = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("ours", "theirs"))
    assert sorted(ours) == sorted(theirs) and any(k.startswith("language_model.model.") for k in ours)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert json.loads((tmp_path / "ours" / "generation_config.json").read_text())["max_new_tokens"] == 7
    _same_model(model, LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "ours")))


def test_users_key_mapping(tmp_path, tiny_llava_dir):
    """A checkpoint in a layout of its own loads with key_mapping, as from_pretrained's; without it every tensor
    is unexpected (the checks run after the mapping)."""
    model, _ = ue.load_vlm(str(tiny_llava_dir), dtype="float32")
    path = _broken(tmp_path, tiny_llava_dir, "custom")
    _rewrite(path, lambda t: t.update({"custom." + k: t.pop(k) for k in list(t)}))
    with pytest.raises(ue.CheckpointError, match=r"unexpected tensor\(s\).*custom\."):
        ue.load_vlm(str(path))
    _same_model(model, ue.load_vlm(str(path), dtype="float32", key_mapping={r"^custom\.": ""})[0])


def test_tied_embeddings(tmp_path, toy_tokenizer):
    model = tiny_llava(toy_tokenizer, tie_word_embeddings=True).float()
    ue.save_vlm(model, str(tmp_path / "tied"))
    stored = load_file(str(tmp_path / "tied" / "model.safetensors"))
    assert not [k for k in stored if k.endswith("lm_head.weight")]  # stored once
    loaded, _ = ue.load_vlm(str(tmp_path / "tied"), dtype="float32")
    assert loaded.get_output_embeddings().weight.data_ptr() == loaded.get_input_embeddings().weight.data_ptr()
    _same_model(model, loaded)


def _broken(tmp_path, tiny_llava_dir, name):
    path = tmp_path / name
    shutil.copytree(tiny_llava_dir, path)
    return path


def _rewrite(path, edit):
    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"))


def test_missing_tensor(tmp_path, tiny_llava_dir):
    path = _broken(tmp_path, tiny_llava_dir, "missing")
    _rewrite(path, lambda t: t.pop("multi_modal_projector.linear_1.weight"))
    with pytest.raises(ue.CheckpointError, match=r"missing tensor\(s\).*multi_modal_projector.linear_1.weight"):
        ue.load_vlm(str(path))


def test_unexpected_tensor(tmp_path, tiny_llava_dir):
    path = _broken(tmp_path, tiny_llava_dir, "unexpected")
    _rewrite(path, lambda t: t.__setitem__("model.extra_head.weight", torch.zeros(2)))
    with pytest.raises(ue.CheckpointError, match=r"unexpected tensor\(s\).*model.extra_head.weight"):
        ue.load_vlm(str(path))


def test_misshaped_tensor(tmp_path, tiny_llava_dir):
    path = _broken(tmp_path, tiny_llava_dir, "shape")
    _rewrite(path, lambda t: t.__setitem__("language_model.lm_head.weight", torch.zeros(3, 32)))
    with pytest.raises(ue.CheckpointError, match=r"tensor language_model.lm_head.weight has shape \(3, 32\).*expects "
                                                 r"\(\d+, 32\) \(as lm_head.weight\)"):
        ue.load_vlm(str(path))


def test_truncated_file(tmp_path, tiny_llava_dir):
    path = _broken(tmp_path, tiny_llava_dir, "truncated")
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ue.CheckpointError, match="model.safetensors is not a readable safetensors file"):
        ue.load_vlm(str(path))


def test_header_that_lies_about_sizes(tmp_path, tiny_llava_dir):
    path = _broken(tmp_path, tiny_llava_dir, "lying")
    raw = (path / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [s * 4 for s in header[name]["shape"]]
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    (path / "model.safetensors").write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])
    with pytest.raises(ue.CheckpointError, match="not a readable safetensors file"):
        ue.load_vlm(str(path))


def test_missing_shard(tmp_path, tiny_llava_dir):
    model, _ = ue.load_vlm(str(tiny_llava_dir), dtype="float32")
    ue.save_vlm(model, str(tmp_path / "shards"), max_shard_bytes=20_000)
    victim = sorted(f for f in os.listdir(tmp_path / "shards") if f.startswith("model-"))[1]
    os.remove(tmp_path / "shards" / victim)
    with pytest.raises(ue.CheckpointError, match=f"missing shard {victim}"):
        ue.load_vlm(str(tmp_path / "shards"))


def test_refuses_pickle_checkpoints(tmp_path, tiny_llava_dir):
    path = _broken(tmp_path, tiny_llava_dir, "pickle")
    os.remove(path / "model.safetensors")
    (path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ue.CheckpointError, match="only pickle checkpoints.*unpickling can run arbitrary code"):
        ue.load_vlm(str(path))


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "resnet"}))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ue.CheckpointError, match="unsupported architecture: model_type='resnet'"):
        ue.load_vlm(str(tmp_path))


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(ue.CheckpointError, match="has no config.json"):
        ue.load_vlm(str(tmp_path))
    with pytest.raises(ValueError, match="dtype must be one of"):
        ue.load_vlm(str(tmp_path), dtype="int8")


def test_save_is_atomic(tmp_path, tiny_llava_dir, monkeypatch):
    model, _ = ue.load_vlm(str(tiny_llava_dir), dtype="float32")
    target = tmp_path / "out"
    ue.save_vlm(model, str(target))
    before = (target / "model.safetensors").read_bytes()

    def boom(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-write")
    monkeypatch.setattr("transformers.modeling_utils.safe_save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        ue.save_vlm(model, str(target))
    assert (target / "model.safetensors").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_non_finite_weights_are_refused_with_the_tensor_named(tmp_path, tiny_llava_dir):
    """Catches a NaN/inf checkpoint loading silently (it answers "" to everything and looks safe), a scan that
    misses inf or buffers' neighbours, or check_finite=False not skipping the scan."""
    path = _broken(tmp_path, tiny_llava_dir, "nan")
    _rewrite(path, lambda t: t["language_model.model.layers.1.mlp.down_proj.weight"].view(-1)[-1:].fill_(float("inf")))
    with pytest.raises(ue.CheckpointError, match=r"tensor model.language_model.layers.1.mlp.down_proj.weight holds 1 "
                                                 r"non-finite value\(s\)"):
        ue.load_vlm(str(path), dtype="float32")
    with pytest.raises(ue.CheckpointError, match="down_proj.weight holds 1 non-finite"):
        ue.load_vlm(str(path), dtype="bfloat16")
    model, _ = ue.load_vlm(str(path), dtype="float32", check_finite=False)
    assert torch.isinf(model.model.language_model.layers[1].mlp.down_proj.weight).sum() == 1


def test_loads_in_the_dtype_asked_through_from_pretrained(tiny_llava_dir, monkeypatch):
    """Catches load_vlm building the model itself (fp32, random weights, then a cast) instead of transformers'
    low-memory from_pretrained with the dtype asked for."""
    from transformers import LlavaForConditionalGeneration

    calls = []
    original = LlavaForConditionalGeneration.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        calls.append(kwargs.get("dtype"))
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(LlavaForConditionalGeneration, "from_pretrained", classmethod(spy))
    model, _ = ue.load_vlm(str(tiny_llava_dir), dtype="bfloat16", load_processor=False)
    assert calls == [torch.bfloat16]
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16} and not model.training


def test_saved_files_get_the_users_umask(tmp_path, tiny_llava_dir):
    """Catches atomic writes leaving mkstemp's 0600 / mkdtemp's 0700 (other users of a shared model folder
    could not read it)."""
    from unlearn_engine.atomic import write_text

    model, _ = ue.load_vlm(str(tiny_llava_dir), dtype="float32")
    old = os.umask(0o022)
    try:
        ue.save_vlm(model, str(tmp_path / "saved"))
        write_text(str(tmp_path / "note.txt"), "x")
        os.umask(0o077)
        write_text(str(tmp_path / "private.txt"), "x")
    finally:
        os.umask(old)
    assert (tmp_path / "saved").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "saved" / "model.safetensors").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "note.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "private.txt").stat().st_mode & 0o777 == 0o600
