"""Reward callbacks and scorers."""
from lightning_vidalign.rewards.base import RewardCallback, batch_captions, find_rewards, repeat_batch
from lightning_vidalign.rewards.heuristic import CompressibilityReward, FlickerReward, LuminanceReward, MotionMagnitudeReward, h264_bytes
from lightning_vidalign.rewards.models import (
    CLIPScoreReward,
    HPSReward,
    MissingRewardFileError,
    NonFiniteRewardError,
    PickScoreReward,
    RewardInputError,
    VideoAlignReward,
    VLMJudgeParseError,
    VLMJudgeRequestError,
    VLMJudgeReward,
)
from lightning_vidalign.rewards.motion import IMRReward, LMRReward
from lightning_vidalign.rewards.remote import RemoteReward, RemoteRewardError, RewardServer, ServiceStartError

__all__ = ["RewardCallback", "find_rewards", "repeat_batch", "batch_captions", "IMRReward", "LMRReward", "MotionMagnitudeReward", "FlickerReward", "CompressibilityReward", "LuminanceReward", "h264_bytes", "CLIPScoreReward", "PickScoreReward", "HPSReward", "MissingRewardFileError", "RewardInputError", "NonFiniteRewardError", "VideoAlignReward", "VLMJudgeReward", "VLMJudgeParseError", "VLMJudgeRequestError", "RemoteReward", "RemoteRewardError", "RewardServer", "ServiceStartError"]
