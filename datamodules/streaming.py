"""Training clips as LitData shards: written once by ``vidalign shard``, streamed from a local folder or object storage.

Why LitData (``litdata``, Lightning's streaming datasets) and not WebDataset: its chunks are random-access
(``StreamingDataset[i]`` reads one sample; from object storage, uncompressed shards are read by a range request
for that sample's bytes — LitData's ``on_demand_bytes`` path, read in its reader, not tested here), so our own :class:`~lightning_vidalign.datamodules.video.EpochSeededSampler` keeps deciding
the order — the same clips in the same order as the video path, and the same exact mid-epoch resume under DDP/FSDP2 —
while WebDataset's tar shards are read sequentially only (order = shard order + a shuffle buffer; no random access,
no resumable state of its own). Our choice.

What a sample stores, and why: the clip's **decoded frames** as uint8 ``(T, H, W, 3)`` after the resize and center
crop of :func:`~lightning_vidalign.datamodules.io.read_frames` (the exact array the video path turns into ``video``),
and a JSON string of its caption, source path, start time, index in its split and a CRC-32 of frames + caption. Decoded frames make a
batch from shards bitwise equal to one from the videos and skip decoding, seeking and resizing in the training job
(for long sources, decoding up to the clip dominates data loading); the cost is size: ``T·H·W·3`` bytes per clip
(98 KiB at the default 8 × 64 × 64; 97 MiB at 81 × 480 × 832, where one would add LitData's ``zstd`` compression or
store re-encoded clips, which are no longer bitwise equal to the source decode). Encoded clip bytes would keep shards
small but need a decoder in every data worker and a re-encode that changes pixels. Our choice.

Layout of a shard folder ``OUT`` (``vidalign shard --config CONFIG --output OUT``): ``OUT/train`` and ``OUT/val``,
each a LitData dataset (``index.json`` + ``chunk-*.bin``). Each ``index.json`` holds, beside LitData's own keys, a
``"vidalign"`` entry: format version, split, number of samples, and the data settings that decided the clips
(:data:`CLIP_SETTINGS`: sources, frames, fps, size, stride, captions, shot detection, split). Reading shards with
other settings than the config asks is refused, naming the differing keys (:class:`ShardError`).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import zlib

import numpy as np
import torch
from torch.utils.data import Dataset

log = logging.getLogger(__name__)

#: version of the sample layout written by :func:`write_shards` (bumped when a sample's keys or meaning change)
SHARD_FORMAT_VERSION = 1
#: key of our entry in each split's ``index.json``
INDEX_KEY = "vidalign"
#: the VideoClipDataModule settings that decide which clips exist, their pixels, captions and split
CLIP_SETTINGS = ("sources", "num_frames", "fps", "height", "width", "clip_stride", "captions", "folder_fps", "shot_detector",
                 "cut_threshold", "val_fraction", "split_seed", "val_split", "on_error", "max_clips_per_source")
SPLITS = ("train", "val")


class ShardError(RuntimeError):
    """Shards that cannot serve this run: a missing or empty folder, settings other than the config's, a missing,
    truncated or corrupt chunk. The message names the folder (or chunk file) and what was expected."""


def clip_settings(hparams) -> dict:
    """The :data:`CLIP_SETTINGS` of a VideoClipDataModule's ``hparams``, as JSON values (tuples as lists)."""
    out = {}
    for key in CLIP_SETTINGS:
        value = hparams.get(key) if hasattr(hparams, "get") else getattr(hparams, key)
        out[key] = list(value) if isinstance(value, tuple) else value
    return json.loads(json.dumps(out))


def sample_checksum(frames: np.ndarray, caption: str) -> int:
    """CRC-32 of a sample's frame bytes followed by its UTF-8 caption (``zlib.crc32``): detects a chunk whose bytes
    changed on disk or in transit. Our choice."""
    return zlib.crc32(caption.encode("utf-8"), zlib.crc32(np.ascontiguousarray(frames).tobytes()))


def _is_remote(url: str) -> bool:
    return "://" in url


def write_shards(datamodule, output: str, chunk_bytes: str | int = "64MB", overwrite: bool = False) -> dict:
    """Decode every train and val clip of ``datamodule`` (a VideoClipDataModule, set up here) into LitData shards.

    The clips, their order and their split are the data module's own (``setup``); sample ``i`` of ``OUT/<split>`` is
    item ``i`` of its ``train_set`` / ``val_set``. The folder is written as ``OUT.partial`` and renamed at the end, so
    an interrupted conversion leaves no folder that looks complete.

    Args:
        datamodule: a ``VideoClipDataModule`` without ``shards`` (its videos are the input).
        output: a local folder (``OUT``); must not exist or be empty unless ``overwrite``.
        chunk_bytes: LitData's chunk size limit (``"64MB"``, or bytes). Smaller chunks cost less per random read
            from object storage (a read fetches a whole chunk), larger ones fewer files.
        overwrite: replace an existing ``OUT``.

    Returns:
        ``{"train": n_train, "val": n_val, "bytes": total chunk bytes, "output": OUT}``.

    Raises:
        ShardError: ``output`` holds files and ``overwrite`` is False; the data module reads shards itself.
        VideoDecodeError: from decoding (naming the video).
    """
    from litdata.streaming.writer import BinaryWriter

    from lightning_vidalign.datamodules.io import read_frames

    if datamodule.hparams.get("shards"):
        raise ShardError(f"data.shards is set ({datamodule.hparams.shards!r}): shards are written from videos; "
                         "give the config without data.init_args.shards")
    if _is_remote(output):
        raise ShardError(f"--output {output!r}: shards are written to a local folder; upload it to object storage afterwards")
    output = os.path.abspath(output)
    if os.path.isdir(output) and os.listdir(output) and not overwrite:
        raise ShardError(f"--output {output!r} already holds files: choose another folder, or pass --overwrite to replace it")
    datamodule.setup("fit")
    settings = clip_settings(datamodule.hparams)
    partial = output.rstrip(os.sep) + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    counts, total = {}, 0
    for split in SPLITS:
        dataset = datamodule.train_set if split == "train" else datamodule.val_set
        folder = os.path.join(partial, split)
        os.makedirs(folder)
        entry = {"format": SHARD_FORMAT_VERSION, "split": split, "num_samples": len(dataset), "settings": settings}
        if len(dataset):
            writer = BinaryWriter(folder, chunk_bytes=chunk_bytes)
            for i in range(len(dataset)):
                clip = dataset.clips[i]
                frames = read_frames(dataset.indices[clip.source], list(clip.frame_ids), dataset.height, dataset.width)
                caption = dataset.caption_for(i)
                # the metadata as one JSON string: LitData stores a str that names an existing file as that file's bytes
                # (a source path "bikes.mp4" would pull the whole video into the chunk)
                meta = {"caption": caption, "path": dataset.indices[clip.source].path, "start": float(clip.start), "index": i,
                        "crc32": sample_checksum(frames, caption)}
                writer[i] = {"frames": frames, "meta": json.dumps(meta)}
            writer.done()
            writer.merge()
            index_file = os.path.join(folder, "index.json")
            with open(index_file) as f:
                index = json.load(f)
        else:  # an empty split (e.g. val_fraction 0): our entry only, read as 0 samples
            index, index_file = {"chunks": [], "config": None}, os.path.join(folder, "index.json")
        index[INDEX_KEY] = entry
        with open(index_file, "w") as f:
            json.dump(index, f, indent=1)
        counts[split] = len(dataset)
        total += sum(int(c["chunk_bytes"]) for c in index["chunks"])
    if os.path.isdir(output):
        shutil.rmtree(output)
    os.replace(partial, output)
    log.info("wrote %d train / %d val clips (%.1f MB) to %s", counts["train"], counts["val"], total / 1e6, output)
    return {**counts, "bytes": total, "output": output}


def read_index(url: str, cache_dir: str | None = None) -> dict:
    """The ``index.json`` of one split folder ``url`` (local, or object storage through LitData's downloader).

    Raises:
        ShardError: no such folder, no ``index.json`` in it (naming ``vidalign shard``), or one that is not JSON.
    """
    if _is_remote(url):
        from litdata.streaming.downloader import get_downloader

        import tempfile

        local_dir = cache_dir or tempfile.mkdtemp(prefix="vidalign-shard-index-")
        os.makedirs(local_dir, exist_ok=True)
        local = os.path.join(local_dir, "index.json")
        try:
            get_downloader(url, local_dir, []).download_file(url.rstrip("/") + "/index.json", local)
        except Exception as err:  # noqa: BLE001 - each object store raises its own types
            raise ShardError(f"shards {url!r}: cannot read index.json ({type(err).__name__}: {err}); "
                             "write shards with `vidalign shard --config CONFIG --output DIR` and upload DIR") from err
        path = local
    else:
        if not os.path.isdir(url):
            raise ShardError(f"shards {url!r}: no such folder; write it with `vidalign shard --config CONFIG --output {os.path.dirname(url) or url}`")
        path = os.path.join(url, "index.json")
        if not os.path.isfile(path):
            raise ShardError(f"shards {url!r}: no index.json (an empty folder, or an unfinished conversion); write it with "
                             f"`vidalign shard --config CONFIG --output {os.path.dirname(url.rstrip(os.sep)) or url}`")
    try:
        with open(path) as f:
            index = json.load(f)
    except (OSError, ValueError) as err:
        raise ShardError(f"shards {url!r}: index.json is not readable JSON ({err})") from err
    if INDEX_KEY not in index:
        raise ShardError(f"shards {url!r}: index.json has no {INDEX_KEY!r} entry: not written by `vidalign shard` "
                         "(its data settings cannot be checked)")
    return index


def check_settings(url: str, index: dict, expected: dict, split: str) -> None:
    """Refuse shards whose stored settings, format or split differ from ``expected`` (:func:`clip_settings` of the
    config's data module).

    Raises:
        ShardError: naming the folder and each differing key as ``key: shards X, config Y``.
    """
    entry = index[INDEX_KEY]
    if entry.get("format") != SHARD_FORMAT_VERSION:
        raise ShardError(f"shards {url!r}: format {entry.get('format')}, this version reads format {SHARD_FORMAT_VERSION}: "
                         "rewrite them with `vidalign shard`")
    if entry.get("split") != split:
        raise ShardError(f"shards {url!r}: holds the {entry.get('split')!r} split where {split!r} was expected")
    stored = entry.get("settings", {})
    diff = [f"{k}: shards {stored.get(k)!r}, config {expected[k]!r}" for k in expected if stored.get(k) != expected[k]]
    if diff:
        raise ShardError(f"shards {url!r} were written with other data settings than this config asks ({'; '.join(diff)}). "
                         "Rewrite them with `vidalign shard --config CONFIG --output DIR`, or set the data settings they were written with")


def check_chunks(url: str, index: dict) -> None:
    """For a local folder: every chunk file of ``index.json`` exists with its recorded size (LitData itself waits for
    a missing or short chunk until a timeout, then blames a download). Object storage: not checked here.

    Raises:
        ShardError: naming the chunk file, its size and the recorded one.
    """
    if _is_remote(url):
        return
    for chunk in index.get("chunks") or []:
        path = os.path.join(url, chunk["filename"])
        if not os.path.isfile(path):
            raise ShardError(f"shards {url!r}: chunk {chunk['filename']} is missing; rewrite the shards with `vidalign shard`")
        size = os.path.getsize(path)
        if size != int(chunk["chunk_bytes"]):
            raise ShardError(f"shards {url!r}: chunk {chunk['filename']} holds {size} bytes, index.json records "
                             f"{chunk['chunk_bytes']} (truncated or replaced); rewrite the shards with `vidalign shard`")


class ShardClipDataset(Dataset):
    """The clips of one split folder of shards, item for item as :class:`~lightning_vidalign.datamodules.video.VideoClipDataset`.

    Items: ``video`` float ``(T, 3, H, W)`` in ``[0, 1]`` (the stored uint8 frames / 255, as the video path computes
    it), ``first_frame`` ``(3, H, W)``, ``caption`` str, ``path`` str (the source on the converting machine),
    ``start`` float seconds, ``index`` int. Random access through ``litdata.StreamingDataset[i]`` (created lazily, so
    each DataLoader worker opens its own); from object storage LitData reads the sample's bytes only, or downloads
    whole chunks into ``cache_dir`` (compressed shards; at most ``max_cache_size`` kept, LitData's eviction).

    Raises (on access):
        ShardError: a sample whose checksum does not match (naming the folder, chunk file and sample), or a chunk
            LitData cannot read.
    """

    def __init__(self, url: str, index: dict, cache_dir: str | None = None, max_cache_size: str | int = "100GB"):
        self.url, self.cache_dir, self.max_cache_size = url, cache_dir, max_cache_size
        self.num_samples = int(index[INDEX_KEY]["num_samples"])
        self.chunk_names, self.chunk_ends = [], []
        end = 0
        for chunk in index.get("chunks") or []:
            end += int(chunk["chunk_size"])
            self.chunk_names.append(chunk["filename"])
            self.chunk_ends.append(end)
        if end != self.num_samples:
            raise ShardError(f"shards {url!r}: index.json lists {end} samples in its chunks but {self.num_samples} in {INDEX_KEY!r}")
        self._stream = None

    def __len__(self) -> int:
        return self.num_samples

    def __getstate__(self):
        return {**self.__dict__, "_stream": None}  # each worker opens its own reader

    def chunk_of(self, i: int) -> str:
        """File name of the chunk holding sample ``i``."""
        return self.chunk_names[int(np.searchsorted(self.chunk_ends, i, side="right"))]

    def _dataset(self):
        if self._stream is None:
            from litdata import StreamingDataset

            self._stream = StreamingDataset(self.url, cache_dir=self.cache_dir, max_cache_size=self.max_cache_size)
        return self._stream

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} of {self.num_samples} in {self.url!r}")
        try:
            item = self._dataset()[int(i)]
        except Exception as err:  # noqa: BLE001 - LitData and the object stores raise many types
            raise ShardError(f"shards {self.url!r}: cannot read sample {i} from chunk {self.chunk_of(i)} "
                             f"({type(err).__name__}: {str(err)[:300]})") from err
        try:
            frames, meta = item["frames"], json.loads(item["meta"])
            caption = meta["caption"]
            intact = int(meta["index"]) == i and sample_checksum(frames, caption) == int(meta["crc32"])
        except (KeyError, TypeError, ValueError):
            intact = False
        if not intact:
            raise ShardError(f"shards {self.url!r}: sample {i} in chunk {self.chunk_of(i)} is corrupt (checksum or index "
                             "mismatch); rewrite the shards with `vidalign shard`")
        video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float().div_(255.0)
        return {"video": video, "first_frame": video[0].clone(), "caption": caption, "path": meta["path"], "start": float(meta["start"]),
                "index": i}


def open_shards(url: str, expected: dict, cache_dir: str | None = None, max_cache_size: str | int = "100GB") -> tuple[ShardClipDataset, ShardClipDataset]:
    """``(train, val)`` datasets of the shard folder ``url`` (holding ``train/`` and ``val/``), after checking that
    both exist, were written with ``expected`` settings (:func:`check_settings`) and (local folders) that every chunk
    has its recorded size (:func:`check_chunks`).

    Raises:
        ShardError: as the checks say.
    """
    url = url.rstrip("/") if _is_remote(url) else os.path.abspath(os.path.expanduser(url))
    if not _is_remote(url):
        if not os.path.isdir(url):
            raise ShardError(f"data.shards {url!r}: no such folder; write it with `vidalign shard --config CONFIG --output {url}`")
        if not os.listdir(url):
            raise ShardError(f"data.shards {url!r}: the folder is empty; write it with `vidalign shard --config CONFIG --output {url}`")
        if os.path.isfile(os.path.join(url, "index.json")) and os.path.basename(url) in SPLITS:
            raise ShardError(f"data.shards {url!r} is one split of a shard folder; pass the folder that holds train/ and val/: "
                             f"--data.init_args.shards {os.path.dirname(url)}")
    out = []
    for split in SPLITS:
        split_url = f"{url}/{split}" if _is_remote(url) else os.path.join(url, split)
        index = read_index(split_url, os.path.join(cache_dir, split) if cache_dir else None)
        check_settings(split_url, index, expected, split)
        check_chunks(split_url, index)
        out.append(ShardClipDataset(split_url, index, cache_dir=os.path.join(cache_dir, split) if cache_dir else None, max_cache_size=max_cache_size))
    return out[0], out[1]
