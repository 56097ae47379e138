"""Reward callbacks and scorers."""
from lightning_vidalign.rewards.base import RewardCallback, find_rewards
from lightning_vidalign.rewards.heuristic import CompressibilityReward, FlickerReward, LuminanceReward, MotionMagnitudeReward, h264_bytes
from lightning_vidalign.rewards.motion import IMRReward, LMRReward

__all__ = ["RewardCallback", "find_rewards", "IMRReward", "LMRReward", "MotionMagnitudeReward", "FlickerReward", "CompressibilityReward", "LuminanceReward", "h264_bytes"]
