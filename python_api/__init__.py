"""The thin high-level layer (installed as unlearn_engine.api): loading, RAI hooks, unlearning, ASR, CLI."""
from unlearn_engine.api.loading import CheckpointError, load_vlm, save_vlm
from unlearn_engine.api.rai import RiskAwareness
from unlearn_engine.api.data import Record, encode, read_advbench, read_figstep, read_jsonl, read_xstest, write_jsonl

__all__ = ["load_vlm", "save_vlm", "CheckpointError", "RiskAwareness", "Record", "encode", "read_jsonl",
           "write_jsonl", "read_advbench", "read_xstest", "read_figstep", "Unlearner", "UnlearnConfig", "mean_nll",
           "trainer_loss"]


def __getattr__(name):
    # The loop imports unlearn_engine itself, so it is loaded on first use.
    if name in ("Unlearner", "UnlearnConfig", "mean_nll"):
        from unlearn_engine.api import unlearner
        return getattr(unlearner, name)
    if name == "trainer_loss":
        from unlearn_engine.api.trainer import trainer_loss
        return trainer_loss
    raise AttributeError(name)
