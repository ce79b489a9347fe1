"""Mean response NLL of records under a model, through the fused path: what `unlearn` reports before and after."""
from typing import Sequence

import torch

from unlearn_engine.api.data import Record, cut_name, encode, image_tokens, model_positions, on_model
from unlearn_engine.api.images import model_inputs
from unlearn_engine.checks import require
from unlearn_engine.unlearning_loss import reference_logp


@torch.no_grad()
def mean_nll(model: torch.nn.Module, tokenizer, records: Sequence[Record], *, batch_size: int = 16,
             max_length: int | None = None, image_loader=None) -> float:
    """Mean per-sample response NLL (length-normalised) of `records` under `model`, through the fused path
    (records with no labelled token left after the max_length cut are not counted; max_length None: as the
    Unlearner's default, data.TEXT_LENGTH text tokens plus the image's, within the model's positions)."""
    values, positions = [], model_positions(model)
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        images = {"image_loader": image_loader, "image_tokens": image_tokens(model)} if any(r.image for r in chunk) \
            else {}
        stats = {}
        encode(chunk, tokenizer, max_length=max_length, stats=stats, positions=positions, **images)
        # a record cut before its response is left out, and never reaches the model: its cut may fall inside
        # the image tokens, which the model would refuse (tokens and image features no longer match)
        chunk = [r for r, n in zip(chunk, stats["labelled"]) if n > 0]
        if not chunk:
            continue
        batch = on_model(encode(chunk, tokenizer, max_length=max_length, positions=positions, **images), model)
        logp = reference_logp(model, batch["input_ids"], batch["labels"], **model_inputs(batch))
        values.append(-logp[(batch["labels"][:, 1:] != -100).any(1)])
    require(bool(values), f"none of the {len(records)} record(s) keeps a response token after the "
                          f"{cut_name(max_length)} cut: raise max_length")
    return float(torch.cat(values).mean())
