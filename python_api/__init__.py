"""The thin high-level layer (installed as unlearn_engine.api): loading, RAI hooks, unlearning, ASR, CLI."""
from unlearn_engine.api.loading import CheckpointError, load_vlm, save_vlm
from unlearn_engine.api.rai import RiskAwareness

__all__ = ["load_vlm", "save_vlm", "CheckpointError", "RiskAwareness"]
