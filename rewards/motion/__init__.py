"""Motion rewards: flow estimators, transport residual, IMR discriminator, point tracking."""
from lightning_vidalign.rewards.motion.flow import (
    DISFlow,
    FlowEstimator,
    forward_backward_confidence,
    sobel_gradients,
    to_gray,
    transport_residual,
    video_flow,
)
from lightning_vidalign.rewards.motion.tracking import LucasKanadeTracker, PointTracker, track_points
from lightning_vidalign.rewards.motion.imr import AdversarialDiscriminatorReward, IMRDiscriminator, IMRReward, imr_features

__all__ = [
    "DISFlow",
    "FlowEstimator",
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
]
