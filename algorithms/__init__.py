"""Alignment algorithms: one LightningModule per file."""
from lightning_vidalign.algorithms.reward_pretrain import RewardPretrain
from lightning_vidalign.algorithms.sft import SFT
from lightning_vidalign.algorithms.shift import SHIFT

__all__ = ["SFT", "SHIFT", "RewardPretrain"]
