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
