"""What identifies a run, so that a resume continues only its own: the settings-and-records part of its
fingerprint, and the check of it made before any model is loaded (checkpoint.py compares the whole one)."""
import dataclasses
import hashlib
import json
from typing import Sequence

from unlearn_engine.api.checkpoint import check_same_run, list_checkpoints, read_state
from unlearn_engine.api.config import RESUME_SAFE, UnlearnConfig
from unlearn_engine.api.data import Record
from unlearn_engine.api.loading import CheckpointError


def digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def settings_fingerprint(config: UnlearnConfig, forget: Sequence[Record], retain: Sequence[Record]) -> dict:
    """The part of a run's fingerprint known without the model: settings (but RESUME_SAFE) and the records."""
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in RESUME_SAFE}
    return {**settings, "forget_data": digest([dataclasses.astuple(r) for r in forget]),
            "retain_data": digest([dataclasses.astuple(r) for r in retain])}


def check_resume_settings(ckpt_dir: str, config: UnlearnConfig, forget, retain, extra: dict | None = None) -> None:
    """Before any model is loaded: refuses (ValueError naming the fields) a resume whose settings, records or
    `extra` fields differ from those of the newest checkpoint whose state can be read."""
    current = {**settings_fingerprint(config, forget, retain), **(extra or {})}
    for _, path in list_checkpoints(ckpt_dir):
        try:
            saved = read_state(path).get("fingerprint")
        except CheckpointError:
            continue  # unreadable: fit() warns and falls back past it
        check_same_run(path, saved, current, known_only=True)
        return


