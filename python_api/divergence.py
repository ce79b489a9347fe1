"""A run that stops because its numbers are no longer finite: DivergedError, raised by the checks of the loss and
of the trained weights, which say which checkpoint is kept."""
import torch

from unlearn_engine.api.checkpoint import list_checkpoints


class DivergedError(ValueError):
    """The run diverged (a non-finite loss or trained weight): it stopped, the model is not saved, and the
    checkpoints written before stay (none holds a non-finite weight)."""


def check_finite_weights(masters, step: int, ckpt_dir: str | None) -> None:
    """DivergedError when a trained weight is NaN/inf (one fp32 sum per tensor: the scan of _check_finite)."""
    local = [m.to_local() if hasattr(m, "to_local") else m for m in masters]  # FSDP2: this rank's shard
    if all(bool(torch.isfinite(m.detach().sum(dtype=torch.float32))) or bool(torch.isfinite(m).all())
           for m in local):
        return
    diverged(f"the trained weights hold NaN/inf after step {step}", ckpt_dir)


def diverged(what: str, ckpt_dir: str | None) -> None:
    """Raises DivergedError saying `what` went wrong and which checkpoint is kept."""
    newest = list_checkpoints(ckpt_dir)
    kept = (f"the newest good checkpoint, {newest[0][1]}, is kept" if newest else "no checkpoint was written")
    raise DivergedError(f"diverged: {what}; stopped, the model is not saved and {kept}: lower --lr and start "
                        "again")
