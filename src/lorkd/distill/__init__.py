"""Knowledge-distillation losses and feature projectors."""

from lorkd.distill.cka import cka_loss, linear_cka, unbiased_cka, unbiased_hsic
from lorkd.distill.losses import dice_ce_loss, feature_kd, soft_target_kd
from lorkd.distill.pair import feature_pair_loss
from lorkd.distill.projector import FeatureProjector
from lorkd.distill.twd import router_loss, twd_loss

__all__ = [
    "soft_target_kd", "feature_kd", "dice_ce_loss", "FeatureProjector",
    "linear_cka", "unbiased_hsic", "unbiased_cka", "cka_loss", "feature_pair_loss", "twd_loss", "router_loss",
]
