"""Small helpers: stage timers, GIF encoding, TensorBoard video summaries."""
from __future__ import annotations

import io
import os
import time
from collections import defaultdict
from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor

#: the arguments of the running ``vidalign`` command (``[subcommand, *options]``; set by ``cli.main``, cleared after it;
#: empty when the package is used from Python): what a stale-cache message proposes to rerun
INVOCATION: list[str] = []


def cause_chain(error: BaseException, limit: int = 20) -> list[BaseException]:
    """``error`` and the errors it was raised from (``__cause__``), outermost first, at most ``limit``."""
    chain = [error]
    while chain[-1].__cause__ is not None and len(chain) < limit:
        chain.append(chain[-1].__cause__)
    return chain


def error_message(error: BaseException) -> str:
    """An error's message for one line: a ``KeyError``'s own text (``str`` of a KeyError adds quotes around it)."""
    return str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)


class StageTimer:
    """Accumulates wall-clock seconds per named stage (for the cost split of a training step)."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    @contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] += time.perf_counter() - start
            self.calls[stage] += 1

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()


def video_to_gif(video: Tensor, fps: float = 7.0) -> bytes:
    """Encode one video ``(T, 3, H, W)`` in ``[0, 1]`` as an animated GIF (Pillow).

    Returns:
        The GIF file bytes (loops forever, ``1000/fps`` ms per frame).
    """
    from PIL import Image

    frames = (video.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    images = [Image.fromarray(np.ascontiguousarray(f)) for f in frames]
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return buf.getvalue()


def add_gif_summary(writer, tag: str, video: Tensor, step: int, fps: float = 7.0, description: str | None = None) -> None:
    """Write a video to TensorBoard as an animated GIF image summary (needs no moviepy).

    Args:
        writer: a ``torch.utils.tensorboard.SummaryWriter``.
        tag: summary tag.
        video: ``(T, 3, H, W)`` in ``[0, 1]``.
        step: global step.
        fps: playback rate.
        description: optional text shown with the image in TensorBoard (the summary's metadata description).
    """
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.image import metadata as image_metadata
    from tensorboard.util import tensor_util

    t, c, h, w = video.shape
    # the image plugin's own tensor form ([width, height, encoded image]) keeps the description attached
    metadata = image_metadata.create_summary_metadata(display_name=tag, description=description or "")
    tensor = tensor_util.make_tensor_proto([str(w).encode(), str(h).encode(), video_to_gif(video, fps)])
    writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, metadata=metadata, tensor=tensor)]), step)


def log_gif_to_wandb(logger, tag: str, video: Tensor, step: int, fps: float = 7.0, description: str | None = None) -> None:
    """Log a video to a Lightning ``WandbLogger`` as an animated GIF (``wandb.Video`` of a GIF file: no moviepy), with
    ``description`` as its caption; under ``step`` (the trainer's global step, W&B's ``trainer/global_step`` axis).

    Args:
        logger: a ``lightning.pytorch.loggers.WandbLogger``.
        tag, step, fps, description: as :func:`add_gif_summary`; video ``(T, 3, H, W)`` in ``[0, 1]``.
    """
    import tempfile

    with tempfile.TemporaryDirectory() as folder:  # wandb.Video copies the file into the run's media folder
        path = os.path.join(folder, "sample.gif")
        with open(path, "wb") as f:
            f.write(video_to_gif(video, fps))
        logger.log_video(key=tag, videos=[path], step=step, caption=[description or ""], format=["gif"])


def log_gif_to_mlflow(logger, tag: str, video: Tensor, step: int, fps: float = 7.0, description: str | None = None) -> None:
    """Log a video to a Lightning ``MLFlowLogger`` as run artifacts: ``<tag>/step<step>.gif`` and its description
    ``<tag>/step<step>.txt`` (MLflow has no video type; its UI previews GIFs).

    Args:
        logger: a ``lightning.pytorch.loggers.MLFlowLogger``.
        tag, step, fps, description: as :func:`add_gif_summary`; video ``(T, 3, H, W)`` in ``[0, 1]``.
    """
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, f"step{step}.gif")
        with open(path, "wb") as f:
            f.write(video_to_gif(video, fps))
        logger.experiment.log_artifact(logger.run_id, path, artifact_path=tag)
    if description:
        logger.experiment.log_text(logger.run_id, description, f"{tag}/step{step}.txt")


class SavedActivationTracker:
    """Peak bytes of the tensors the autograd graph keeps for backward ("activation memory").

    A ``torch.autograd.graph.saved_tensors_hooks`` context: every tensor saved for backward is
    counted once per distinct storage while the graph holds it (released when autograd drops it,
    e.g. after ``backward``); storages of ``exclude`` (parameters, buffers, inputs alive anyway) are
    not counted. Device-independent, so it is a meaningful memory measure on CPU, where torch has
    no allocator statistics. It does not count temporaries freed during the forward, nor
    gradient buffers. Our measurement tool (used by the DPO memory benchmark).

    Example::

        with SavedActivationTracker(exclude=model.parameters()) as tracker:
            loss = model(x).sum(); loss.backward()
        tracker.peak_bytes
    """

    class _Handle:
        __slots__ = ("tensor", "key", "tracker")

        def __init__(self, tensor, key, tracker):
            self.tensor, self.key, self.tracker = tensor, key, tracker

        def __del__(self):
            if self.key is not None:
                self.tracker._release(self.key)

    def __init__(self, exclude=()):
        self.exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self.live: dict[int, list[int]] = {}
        self.current_bytes = 0
        self.peak_bytes = 0
        self._ctx = None

    def _pack(self, tensor):
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key == 0 or key in self.exclude:
            return self._Handle(tensor, None, self)
        entry = self.live.get(key)
        if entry is None:
            self.live[key] = [1, storage.nbytes()]
            self.current_bytes += storage.nbytes()
            self.peak_bytes = max(self.peak_bytes, self.current_bytes)
        else:
            entry[0] += 1
        return self._Handle(tensor, key, self)

    @staticmethod
    def _unpack(handle):
        return handle.tensor

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.current_bytes -= entry[1]
            del self.live[key]

    def __enter__(self) -> "SavedActivationTracker":
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._ctx.__exit__(*exc)


def require_files(root: str, relative_paths: list[str], what: str) -> None:
    """Raise ``FileNotFoundError`` naming every missing file of a local checkpoint.

    Args:
        root: local directory of the checkpoint.
        relative_paths: files that must exist under ``root``.
        what: a human name for the checkpoint (for the message).

    Raises:
        FileNotFoundError: if ``root`` or any listed file is missing (nothing is downloaded).
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{what}: local directory {root!r} does not exist (nothing is downloaded at run time)")
    missing = [os.path.join(root, p) for p in relative_paths if not os.path.exists(os.path.join(root, p))]
    if missing:
        raise FileNotFoundError(f"{what}: missing file(s) in {root!r}: " + ", ".join(missing))
