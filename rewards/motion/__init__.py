"""Motion rewards: flow estimators, transport residual, IMR discriminator, point tracking."""
from lightning_vidalign.rewards.motion.flow import (
    DISFlow,
    FlowEstimator,
    LearnedFlow,
    SEARAFTFlow,
    TorchvisionRAFTFlow,
    forward_backward_confidence,
    sobel_gradients,
    to_gray,
    transport_residual,
    video_flow,
)
from lightning_vidalign.rewards.motion.tracking import LucasKanadeTracker, PointTracker, track_points
from lightning_vidalign.rewards.motion.imr import AdversarialDiscriminatorReward, IMRDiscriminator, IMRReward, imr_features
from lightning_vidalign.rewards.motion.lmr import CoTracker3Tracker, LMRDiscriminator, LMRReward, lmr_features, patch_ncc, sample_queries

__all__ = [
    "DISFlow",
    "FlowEstimator",
    "LearnedFlow",
    "SEARAFTFlow",
    "TorchvisionRAFTFlow",
    "forward_backward_confidence",
    "sobel_gradients",
    "to_gray",
    "transport_residual",
    "video_flow",
    "AdversarialDiscriminatorReward",
    "IMRDiscriminator",
    "IMRReward",
    "imr_features",
    "PointTracker",
    "LucasKanadeTracker",
    "track_points",
    "CoTracker3Tracker",
    "LMRDiscriminator",
    "LMRReward",
    "lmr_features",
    "patch_ncc",
    "sample_queries",
]
