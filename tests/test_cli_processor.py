"""Checkpoints that ship a processor (LlavaProcessor: tokenizer + CLIP image processor), as llava-hf models do:
load_vlm returns it with the tokenizer reachable, and `rai --image` preprocesses with its image processor."""
import json

import numpy as np
import pytest
import torch

import unlearn_engine as ue
from unlearn_engine.api.cli import main
from unlearn_engine.api.evaluation import generate


@pytest.fixture(scope="module")
def processor_llava_dir(tmp_path_factory, toy_tokenizer):
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from unlearn_engine.api.demo.toy import tiny_llava

    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=toy_tokenizer, patch_size=8,
                               vision_feature_select_strategy="default")
    path = tmp_path_factory.mktemp("proc") / "proc-llava"
    ue.save_vlm(tiny_llava(toy_tokenizer).float(), str(path), processor=processor)
    return path


def test_load_vlm_returns_the_processor_with_its_tokenizer(processor_llava_dir, toy_tokenizer):
    """Catches load_vlm dropping a saved processor (or its tokenizer / image processor)."""
    _, processor = ue.load_vlm(str(processor_llava_dir), dtype="float32")
    assert type(processor).__name__ == "LlavaProcessor"
    assert processor.tokenizer.convert_tokens_to_ids("bomb") == toy_tokenizer.convert_tokens_to_ids("bomb")
    assert processor.image_processor.crop_size == {"height": 16, "width": 16}


def test_rai_uses_the_checkpoints_image_processor(processor_llava_dir, tmp_path, capsys):
    """Catches `rai` preprocessing by resize and /127.5-1 when the checkpoint has an image processor (CLIP mean/std
    normalisation): its scores equal in-process RAI on the processor's pixels, not on the plain scaling's."""
    from PIL import Image

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(tmp_path / "noise.png")
    assert main(["rai", "--model", str(processor_llava_dir), "--prompt", "how to make a bomb", "--image",
                 str(tmp_path / "noise.png"), "--dtype", "float32", "--device", "cpu", "--json", "--keywords",
                 "bomb,poison,kill,weapon", "--rank", "2", "--top-fraction", "0.5", "--strength", "5"]) == 0
    out = json.loads(capsys.readouterr().out)
    model, processor = ue.load_vlm(str(processor_llava_dir), dtype="float32")
    image = Image.open(tmp_path / "noise.png").convert("RGB")
    pixels = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
    plain_scaled = torch.from_numpy(np.asarray(image.resize((16, 16)), dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
    prompt = "<image> " * 4 + "how to make a bomb"

    def scores(px):
        rai = ue.RiskAwareness(model, ["bomb", "poison", "kill", "weapon"], tokenizer=processor.tokenizer, rank=2,
                               top_fraction=0.5, strength=5.0)
        with rai:
            generate(model, processor.tokenizer, [prompt], pixel_values=px, progress=False)
        return np.array([r.tolist() for r in rai.records])

    assert np.allclose(np.array(out["visual_token_scores"]), scores(pixels), atol=1e-6)
    assert not np.allclose(scores(pixels), scores(plain_scaled), atol=1e-3)  # the two preprocessings differ


def test_unlearn_takes_a_processor_and_keeps_it(processor_llava_dir, tmp_path, capsys):
    """Catches the Unlearner failing on a processor (as load_vlm returns for llava-hf checkpoints) and `unlearn`
    saving only the tokenizer, which left the unlearned model without its image processor."""
    model, processor = ue.load_vlm(str(processor_llava_dir), dtype="float32")
    forget = [ue.Record("how to make a bomb", "step one mix poison", "forget")]
    history = ue.Unlearner(model, processor, method="ga", steps=1, lr=1e-3, batch_size=1, progress=False).fit(forget)
    assert len(history) == 1 and np.isfinite(history[0]["loss"])

    ue.write_jsonl(forget, str(tmp_path / "f.jsonl"))
    assert main(["unlearn", "--model", str(processor_llava_dir), "--forget", str(tmp_path / "f.jsonl"), "--method",
                 "ga", "--steps", "1", "--lr", "1e-3", "--batch-size", "1", "--dtype", "float32", "--device", "cpu",
                 "--out", str(tmp_path / "run"), "--no-progress", "--json"]) == 0
    capsys.readouterr()
    _, saved = ue.load_vlm(str(tmp_path / "run" / "model"), dtype="float32")
    assert type(saved).__name__ == "LlavaProcessor"
    assert saved.image_processor.crop_size == {"height": 16, "width": 16}
