"""Pure-PyTorch references for every kernel: the ground truth the tests compare against."""
from unlearn_engine.reference.risk_projection import risk_project_reference, risk_prototypes_reference
from unlearn_engine.reference.unlearning_loss import rmu_loss_reference, unlearning_loss_reference
from unlearn_engine.reference.weight_masking import masked_step_reference, topk_mask_reference

__all__ = ["unlearning_loss_reference", "rmu_loss_reference", "topk_mask_reference", "masked_step_reference",
           "risk_project_reference", "risk_prototypes_reference"]
