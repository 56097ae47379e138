"""Alignment algorithms: one LightningModule per file."""
from lightning_vidalign.algorithms.awm import AWM
from lightning_vidalign.algorithms.base_pretrain import BasePretrain
from lightning_vidalign.algorithms.bpgo import BPGO
from lightning_vidalign.algorithms.diffusion_nft import DiffusionNFT
from lightning_vidalign.algorithms.dpo import DPO
from lightning_vidalign.algorithms.flow_dppo import FlowDPPO
from lightning_vidalign.algorithms.forward_process import ForwardProcessGRPO
from lightning_vidalign.algorithms.grpo import GRPO
from lightning_vidalign.algorithms.grpo_guard import GRPOGuard
from lightning_vidalign.algorithms.kl import AdaptiveKLController
from lightning_vidalign.algorithms.mix_grpo import MixGRPO
from lightning_vidalign.algorithms.reward_pretrain import RewardPretrain
from lightning_vidalign.algorithms.sage_grpo import SAGEGRPO
from lightning_vidalign.algorithms.self_paced_grpo import SelfPacedGRPO
from lightning_vidalign.algorithms.sft import SFT
from lightning_vidalign.algorithms.shift import SHIFT
from lightning_vidalign.algorithms.vipo import TimmViTFeatures, TransNetV2Features, ViPO

__all__ = [
    "SFT", "BasePretrain", "SHIFT", "RewardPretrain", "GRPO", "SAGEGRPO", "AdaptiveKLController", "DPO",
    "BPGO", "ViPO", "SelfPacedGRPO", "TransNetV2Features", "TimmViTFeatures",
    "DiffusionNFT", "AWM", "MixGRPO", "GRPOGuard", "FlowDPPO", "ForwardProcessGRPO",
]
