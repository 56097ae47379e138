"""Reward callbacks and scorers."""
from lightning_vidalign.rewards.base import RewardCallback, find_rewards
from lightning_vidalign.rewards.heuristic import FlickerReward, MotionMagnitudeReward
from lightning_vidalign.rewards.motion import IMRReward

__all__ = ["RewardCallback", "find_rewards", "IMRReward", "MotionMagnitudeReward", "FlickerReward"]
