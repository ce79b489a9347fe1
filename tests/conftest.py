import pytest
import torch

SHARED_DATA = __import__("pathlib").Path(__file__).resolve().parents[2] / "shared" / "data"

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")),
]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


TOY_WORDS = ("how to make a bomb kill steal hack the recipe for bread cake step one two three mix bake "
             "what is tell me about poison weapon drug cookies water flour sugar").split()


@pytest.fixture(scope="session")
def toy_tokenizer():
    from unlearn_engine.api.demo.toy import word_tokenizer
    return word_tokenizer(TOY_WORDS)


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory, toy_tokenizer):
    """A tiny LLaVA built from transformers configs, saved as safetensors (single file) with its tokenizer."""
    import unlearn_engine as ue
    from unlearn_engine.api.demo.toy import tiny_llava

    path = tmp_path_factory.mktemp("ckpt") / "tiny-llava"
    ue.save_vlm(tiny_llava(toy_tokenizer).float(), str(path), processor=toy_tokenizer)
    return path
