"""load_vlm refuses a checkpoint missing any one of its tensors, whichever it is: the untied LM head
(tie_word_embeddings=False) included; a tied checkpoint stores the head once, as the input embeddings."""
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import unlearn_engine as ue
from unlearn_engine.api.demo.toy import tiny_llava


def _without(tmp_path, source, key):
    path = tmp_path / key.replace(".", "_")
    shutil.copytree(source, path)
    tensors = load_file(str(path / "model.safetensors"))
    tensors.pop(key)
    save_file(tensors, str(path / "model.safetensors"))
    return path


def test_every_missing_tensor_is_named(tmp_path, tiny_llava_dir):
    """Each tensor of the checkpoint removed in turn: refused, naming the model's tensor that was removed (the
    message uses the model's names, which the checkpoint's layout maps to)."""
    stored = load_file(str(tiny_llava_dir / "model.safetensors"))
    assert [k for k in stored if k.endswith("lm_head.weight")]  # untied: the head is a tensor of its own
    model = ue.load_vlm(str(tiny_llava_dir), dtype="float32")[0].state_dict()
    for key in sorted(stored):
        with pytest.raises(ue.CheckpointError, match=r"missing tensor\(s\)") as err:
            ue.load_vlm(str(_without(tmp_path, tiny_llava_dir, key)), dtype="float32")
        named = re.findall(r"'([^']+)'", str(err.value))
        assert len(named) == 1 and torch.equal(model[named[0]], stored[key]), (key, str(err.value))
        shutil.rmtree(tmp_path / key.replace(".", "_"))


def test_tied_checkpoint_without_head_loads_and_untied_does_not(tmp_path, toy_tokenizer):
    for tied in (True, False):
        path = tmp_path / f"tied-{tied}"
        ue.save_vlm(tiny_llava(toy_tokenizer, tie_word_embeddings=tied).float(), str(path))
        tensors = load_file(str(path / "model.safetensors"))
        for key in [k for k in tensors if k.endswith("lm_head.weight")]:
            tensors.pop(key)
        save_file(tensors, str(path / "model.safetensors"))
        if tied:
            model, _ = ue.load_vlm(str(path), dtype="float32")
            assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
        else:
            with pytest.raises(ue.CheckpointError, match=r"missing tensor\(s\).*lm_head.weight"):
                ue.load_vlm(str(path), dtype="float32")
