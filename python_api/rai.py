"""Attach Risk Awareness Injection to a LLaVA or Qwen2-VL / Qwen2.5-VL model by forward hooks (removable).

    with ue.RiskAwareness(model, tokenizer=tok, rank=8, top_fraction=0.1, strength=2.0) as rai:
        out = model.generate(**inputs)
    rai.records  # per-image risk scores of every prefill

The hook sits on the multimodal projector's output (Qwen-VL: the patch merger's, (N, H) for all images of
the batch at once, scored as one sequence): the visual tokens in the language model's embedding
space, computed during prefill only (decoding steps reuse the cache and never run the projector). Text
tokens are never touched. The `rai` command (check_rai_args, run_rai) answers a prompt without and with it.
"""
import json
import math
from typing import List

import torch

from unlearn_engine.api.data import check_image
from unlearn_engine.api.evaluation import generation  # generation.generate: looked up when the command runs
from unlearn_engine.api.images import image_input
from unlearn_engine.api.loading import check_model, load_promptable
from unlearn_engine.checks import require
from unlearn_engine.risk_projection import concept_embeddings, risk_project, risk_prototypes, unsafe_subspace


def find_projector(model):
    """(name, module) whose output is the visual tokens in the language model's embedding space: LLaVA's
    multi_modal_projector (or mm_projector / visual_projection), Qwen2-VL / Qwen2.5-VL's visual.merger."""
    for name, module in model.named_modules():
        parts = name.split(".")
        if parts[-1] in ("multi_modal_projector", "mm_projector", "visual_projection") or \
                parts[-2:] == ["visual", "merger"]:
            return name, module
    raise ValueError(f"{type(model).__name__} has no detectable visual tokens: no multimodal projector "
                     "(multi_modal_projector / mm_projector / visual.merger) was found")


class RiskAwareness:
    """Risk Awareness Injection on the visual tokens of `model`.

    concepts: an (M, H) tensor of concept embeddings, or keywords (needs `tokenizer`); None uses the default
    unsafe keyword list. mode "subspace" (rank, threshold or top_fraction) or "prototypes" (threshold)."""

    def __init__(self, model, concepts=None, *, tokenizer=None, rank: int = 8, mode: str = "subspace",
                 threshold: float | None = None, top_fraction: float | None = None, strength: float = 1.0):
        if mode not in ("subspace", "prototypes"):
            raise ValueError(f"mode must be 'subspace' or 'prototypes', got {mode!r}")
        self.model, self.mode, self.strength = model, mode, strength
        self.projector_name, self.projector = find_projector(model)
        embeddings = model.get_input_embeddings().weight
        if isinstance(concepts, torch.Tensor):
            rows = concepts.float()
        else:
            if tokenizer is None:
                raise ValueError("pass tokenizer= to turn keywords into concept embeddings, or pass an (M, H) tensor")
            rows = concept_embeddings(tokenizer, embeddings, concepts)
        if rows.shape[-1] != embeddings.shape[1]:
            raise ValueError(f"concept embeddings have H={rows.shape[-1]}, "
                             f"the model's embeddings H={embeddings.shape[1]}")
        rows = rows.to(embeddings.device)
        if mode == "subspace":
            if threshold is None and top_fraction is None:
                top_fraction = 0.1
            self.basis = unsafe_subspace(rows, min(rank, rows.shape[0], rows.shape[1]))
        else:
            if threshold is None:
                raise ValueError("prototype mode needs a cosine threshold")
            self.basis = rows
        self.threshold, self.top_fraction = threshold, top_fraction
        self.records: List[torch.Tensor] = []
        self._handle = None

    def _apply(self, features: torch.Tensor):
        x = features if features.dim() == 3 else features.unsqueeze(0)
        with torch.no_grad():
            if self.mode == "subspace":
                out, scores = risk_project(x.detach(), self.basis, threshold=self.threshold,
                                           top_fraction=self.top_fraction, strength=self.strength)
            else:
                out, scores = risk_prototypes(x.detach(), self.basis, threshold=self.threshold, strength=self.strength)
        self.records.append(scores.detach().cpu())
        return out if features.dim() == 3 else out.squeeze(0)

    def _hook(self, module, inputs, output):
        if isinstance(output, torch.Tensor):
            return self._apply(output)
        if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
            return type(output)([self._apply(output[0]), *output[1:]])
        raise TypeError(f"unexpected projector output type {type(output).__name__}")

    def attach(self):
        if self._handle is None:
            self._handle = self.projector.register_forward_hook(self._hook)
        return self

    def detach(self):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        return self

    @property
    def attached(self) -> bool:
        return self._handle is not None

    def __enter__(self):
        return self.attach()

    def __exit__(self, *exc):
        self.detach()


def check_rai_args(args) -> None:
    """The flags of the `rai` command, checked before its model is loaded."""
    check_model(args.model, args.dtype, args.device)
    require(args.prompt.strip() != "", "--prompt is empty")
    require(args.rank >= 1, f"--rank must be >= 1, got {args.rank}")
    require(math.isfinite(args.strength), f"--strength must be finite, got {args.strength}")
    require(0 < args.top_fraction <= 1, f"--top-fraction must be in (0, 1], got {args.top_fraction}")
    if args.keywords is not None:
        require(any(k.strip() for k in args.keywords.split(",")), "--keywords holds no keyword")
    if args.image:
        check_image(args.image)


def run_rai(args):
    """The `rai` command: the answer to --prompt (and --image) without and with Risk Awareness Injection."""
    loaded = load_promptable(args.model, dtype=args.dtype, device=args.device,
                             check_finite=not getattr(args, "skip_finite_check", False))
    model, tokenizer, image_processor = loaded.model, loaded.tokenizer, loaded.image_processor
    images = [image_input(model, args.image, image_processor)] if args.image else None
    keywords = [k.strip() for k in args.keywords.split(",") if k.strip()] if args.keywords else None
    rai = RiskAwareness(model, keywords, tokenizer=tokenizer, rank=args.rank, top_fraction=args.top_fraction,
                        strength=args.strength)
    plain = generation.generate(model, tokenizer, [args.prompt], images=images, progress=False)[0]
    with rai:
        guarded = generation.generate(model, tokenizer, [args.prompt], images=images, progress=False)[0]
    out = {"without_rai": plain, "with_rai": guarded,
           "visual_token_scores": [r.tolist() for r in rai.records]}
    print(json.dumps(out, indent=2) if args.json else f"without RAI: {plain}\nwith RAI:    {guarded}")
    return 0
