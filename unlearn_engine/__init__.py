"""unlearn_engine: fused C++/CUDA kernels for safety unlearning of vision-language models.

    import unlearn_engine as ue
    loss, per_sample, logp = ue.unlearning_loss(hidden, lm_head.weight, labels, sample_index, roles,
                                                forget="npo", retain="nll", ref_logp=ref_logp)
"""
from unlearn_engine._library import build_info, ops
from unlearn_engine.losses import (
    UnlearningLoss,
    UnlearningLossOutput,
    causal_lm_hidden,
    default_chunk_size,
    reference_logp,
    rmu_loss,
    sequence_logprob,
    unlearning_loss,
)
from unlearn_engine.masking import Mask, MaskedOptimizer, masked_adamw_, masked_sgd_, saliency, topk_mask
from unlearn_engine.risk import (
    DEFAULT_UNSAFE_KEYWORDS,
    concept_embeddings,
    risk_project,
    risk_prototypes,
    unsafe_subspace,
)
from unlearn_engine.roles import FORGET, IGNORE, RETAIN

from unlearn_engine.api import (  # noqa: E402  (the high-level API, re-exported)
    CheckpointError,
    Record,
    RiskAwareness,
    load_vlm,
    read_advbench,
    read_figstep,
    read_jsonl,
    read_xstest,
    save_vlm,
    write_jsonl,
)

__version__ = build_info()["version"]

__all__ = [
    "FORGET", "RETAIN", "IGNORE",
    "build_info", "ops",
    "unlearning_loss", "UnlearningLossOutput", "UnlearningLoss", "sequence_logprob", "reference_logp",
    "causal_lm_hidden", "default_chunk_size", "rmu_loss",
    "unsafe_subspace", "risk_project", "risk_prototypes", "concept_embeddings", "DEFAULT_UNSAFE_KEYWORDS",
    "load_vlm", "save_vlm", "CheckpointError", "RiskAwareness", "Record", "read_jsonl", "read_advbench",
    "read_xstest", "read_figstep", "write_jsonl", "Unlearner", "UnlearnConfig", "mean_nll", "trainer_loss",
    "topk_mask", "Mask", "masked_adamw_", "masked_sgd_", "MaskedOptimizer", "saliency",
]


def __getattr__(name):
    if name in ("Unlearner", "UnlearnConfig", "mean_nll", "trainer_loss"):
        import unlearn_engine.api
        return getattr(unlearn_engine.api, name)
    raise AttributeError(f"module 'unlearn_engine' has no attribute {name!r}")
