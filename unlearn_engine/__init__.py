"""unlearn_engine: fused C++/CUDA kernels for safety unlearning of vision-language models.

    import unlearn_engine as ue
    loss, per_sample, logp = ue.unlearning_loss(hidden, lm_head.weight, labels, sample_index, roles,
                                                forget="npo", retain="nll", ref_logp=ref_logp)

This file is the one facade: it re-exports the kernel layer (this package's modules) and the high-level layer
(python_api/, installed as unlearn_engine.api). No module of the project imports it; each imports the module
that defines what it uses.
"""
from unlearn_engine._library import build_info, ops

# The high-level layer, after the kernel layer it builds on.
from unlearn_engine.api.config import UnlearnConfig
from unlearn_engine.api.data import (
    NAMED_SETS,
    Record,
    named_set,
    read_advbench,
    read_figstep,
    read_jsonl,
    read_xstest,
    write_jsonl,
)
from unlearn_engine.api.evaluation import (
    KnowledgeJudge,
    ModelJudge,
    RefusalJudge,
    attack_success_rate,
    evaluate,
    over_refusal_rate,
)
from unlearn_engine.api.json_records import group_queries, read_llava_json, read_vlguard
from unlearn_engine.api.loading import CheckpointError, load_vlm, save_vlm
from unlearn_engine.api.methods import UnlearningMethod, register_method
from unlearn_engine.api.nll import mean_nll
from unlearn_engine.api.rai import RiskAwareness
from unlearn_engine.api.trainer import trainer_loss
from unlearn_engine.api.unlearner import Unlearner
from unlearn_engine.fused_logprob import default_chunk_size
from unlearn_engine.risk_projection import (
    DEFAULT_UNSAFE_KEYWORDS,
    concept_embeddings,
    risk_project,
    risk_prototypes,
    unsafe_subspace,
)
from unlearn_engine.roles import FORGET, IGNORE, RETAIN
from unlearn_engine.unlearning_loss import (
    UnlearningLoss,
    UnlearningLossOutput,
    causal_lm_hidden,
    reference_logp,
    rmu_loss,
    sequence_logprob,
    unlearning_loss,
)
from unlearn_engine.weight_masking import (
    Mask,
    MaskedOptimizer,
    masked_adamw_,
    masked_sgd_,
    saliency,
    saliency_mask,
    topk_mask,
)

__version__ = build_info()["version"]

__all__ = [
    "FORGET", "RETAIN", "IGNORE",
    "build_info", "ops",
    "unlearning_loss", "UnlearningLossOutput", "UnlearningLoss", "sequence_logprob", "reference_logp",
    "causal_lm_hidden", "default_chunk_size", "rmu_loss",
    "unsafe_subspace", "risk_project", "risk_prototypes", "concept_embeddings", "DEFAULT_UNSAFE_KEYWORDS",
    "topk_mask", "Mask", "masked_adamw_", "masked_sgd_", "MaskedOptimizer", "saliency", "saliency_mask",
    "load_vlm", "save_vlm", "CheckpointError", "RiskAwareness", "Record", "read_jsonl", "read_advbench",
    "read_xstest", "read_figstep", "write_jsonl", "read_vlguard", "read_llava_json", "group_queries",
    "named_set", "NAMED_SETS",
    "Unlearner", "UnlearnConfig", "UnlearningMethod",
    "evaluate", "RefusalJudge", "KnowledgeJudge", "ModelJudge", "attack_success_rate", "over_refusal_rate",
    "register_method", "mean_nll", "trainer_loss",
]
