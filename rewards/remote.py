"""Rewards as a service (issue 22, item 2; on LitServe since issue 36): :class:`RemoteReward` is the reward
callback that scores through ``vidalign serve-reward`` (:mod:`~lightning_vidalign.rewards.serving`, LitServe: batching,
workers per device, health, graceful shutdown), the wire format both speak, and :class:`RewardServer`, a handle that
runs the service as a child process. This module needs no LitServe: a training environment without the ``serve``
extra scores through a service that runs elsewhere.

Wire format (our choice): ``POST /score`` with body ``len(header) (4 bytes, big-endian) + header (JSON:
shape, dtype, batch) + videos (raw little-endian array, (B, T, 3, H, W))``; reply ``{"scores": [...],
"components": {name: [...]}, "batch": {"requests": k, "videos": n}}`` (JSON). ``dtype`` ``"uint8"`` (default: 1 byte per value, 4x less than
fp32, 3·T·H·W bytes per video — 110 kB for 9 frames of 64x64, 97 MB for 81 frames of 480x832;
exact for every reward of :mod:`~lightning_vidalign.rewards.models`, which quantise frames to uint8
themselves) or ``"float16"`` / ``"float32"`` (exact for any reward, 2x / 4x the bytes). No video codec:
H.264 would be ~50-100x smaller but lossy and costs an encode per rollout.
"""
from __future__ import annotations

import collections
import json
import math
import os
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import torch
from torch import Tensor

from lightning_vidalign.rewards.base import RewardCallback
from lightning_vidalign.rewards.models import NonFiniteRewardError, RewardInputError, check_videos

_DTYPES = {"uint8": np.uint8, "float16": np.float16, "float32": np.float32}


class RemoteRewardError(RuntimeError):
    """The reward service failed: down, slower than the timeout, an HTTP error, a malformed reply, or
    another number of scores than videos sent (after the bounded retries where retrying can help)."""


def encode_request(videos: Tensor, batch: dict, encoding: str = "uint8") -> bytes:
    """``videos (B, T, 3, H, W)`` in ``[0, 1]`` and JSON-able batch entries → the request body."""
    if encoding not in _DTYPES:
        raise ValueError(f"encoding must be one of {sorted(_DTYPES)}, got {encoding!r}")
    v = videos.detach().float().clamp(0, 1).cpu()
    arr = (v * 255).round().to(torch.uint8).numpy() if encoding == "uint8" else v.numpy().astype(_DTYPES[encoding])
    header = json.dumps({"shape": list(arr.shape), "dtype": encoding, "batch": batch}).encode()
    return struct.pack(">I", len(header)) + header + np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<")).tobytes()


def decode_request(body: bytes) -> tuple[Tensor, dict]:
    """The request body → ``(videos (B, T, 3, H, W) float32 in [0, 1], batch)``.

    Raises:
        RewardInputError: a malformed body (header, dtype, a ``batch`` that is not a JSON object, a shape that is not
            5 non-negative sizes, or a byte count that does not fit the shape).
    """
    try:
        n = struct.unpack(">I", body[:4])[0]
        header = json.loads(body[4 : 4 + n])
        shape, dtype = [int(s) for s in header["shape"]], header["dtype"]
        np_dtype = np.dtype(_DTYPES[dtype]).newbyteorder("<")
    except (struct.error, ValueError, KeyError, TypeError) as e:
        raise RewardInputError(f"malformed request header: {type(e).__name__}: {e}") from e
    batch = header.get("batch") or {}
    if not isinstance(batch, dict):
        raise RewardInputError(f"request header: batch must be a JSON object of entries, got {type(batch).__name__}")
    data = body[4 + n :]
    if len(shape) != 5 or min(shape) < 0 or math.prod(shape) * np_dtype.itemsize != len(data):
        raise RewardInputError(f"request data of {len(data)} bytes does not fit shape {shape} of {dtype}")
    arr = np.frombuffer(data, dtype=np_dtype).reshape(shape)
    videos = torch.from_numpy(arr.astype(np.float32))
    if dtype == "uint8":
        videos = videos / 255
    return videos, batch


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on now on ``host`` (the OS's choice; IPv6 when ``host`` has a colon)."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServiceStartError(RuntimeError):
    """A reward or judge service that could not start: its port taken, a host LitServe refuses, no worker could build
    its model (the worker's error is printed first), or (:class:`RewardServer`) the child exited or did not answer."""


class RewardServer:
    """A ``vidalign serve-reward`` service (LitServe, :mod:`~lightning_vidalign.rewards.serving`) run as a child
    process, from Python: what the tests and benchmarks use, and a way to start a service next to a script.

    ``start()`` launches ``vidalign serve-reward ...`` (through this Python) in its own process group (its workers
    and front ends with it), its output in ``log_path``, and waits until ``GET /health`` answers 200. ``stop()`` sends
    SIGTERM (LitServe's graceful shutdown) and kills the group after ``grace`` seconds; ``kill()`` kills the group
    at once (a crash). A context manager: ``with RewardServer("pkg.MyReward") as s: s.url``.

    Args:
        reward: the reward's class path, or ``{"class_path": ..., "init_args": {...}}``; the class must be importable
            in the child (``env["PYTHONPATH"]`` for a class outside the package).
        host, port: where to listen (port 0: a free port, see :attr:`url`).
        max_batch_size, batch_timeout, max_batch_videos: see :class:`~lightning_vidalign.rewards.serving.RewardAPI`.
        accelerator, devices, workers_per_device: LitServe's placement options.
        env: the child's environment (default: this process's).
        startup_timeout: seconds to wait for ``/health``.
        log_path: the child's stdout and stderr (default: a temporary file).

    Raises:
        ServiceStartError: (``start``) the child exited or did not answer in time; the message holds its log's tail.
    """

    def __init__(self, reward: str | dict, host: str = "127.0.0.1", port: int = 0, max_batch_size: int = 8, batch_timeout: float = 0.01,
                 max_batch_videos: int = 16, accelerator: str = "cpu", devices: int | str = 1, workers_per_device: int = 1,
                 env: dict | None = None, startup_timeout: float = 180.0, log_path: str | None = None):
        import tempfile

        self.reward = {"class_path": reward} if isinstance(reward, str) else dict(reward)
        self.host, self.port = host, int(port)
        self.options = ["--max_batch_size", str(max_batch_size), "--batch_timeout", str(batch_timeout), "--max_batch_videos", str(max_batch_videos),
                        "--accelerator", accelerator, "--devices", str(devices), "--workers_per_device", str(workers_per_device)]
        self.env, self.startup_timeout = env, float(startup_timeout)
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix="serve-reward-", suffix=".log")
            os.close(fd)
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """Where clients reach it: ``http://127.0.0.1:P`` when it listens on every interface (``0.0.0.0`` / ``::``)."""
        host = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(self.host, f"[{self.host}]" if ":" in self.host else self.host)
        return f"http://{host}:{self.port}"

    def log(self) -> str:
        """The child's output so far."""
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def start(self) -> "RewardServer":
        import urllib.request

        if self.port == 0:
            self.port = free_port(self.host)
        argv = [sys.executable, "-c", "import sys; from lightning_vidalign.cli import main; sys.argv[0] = 'vidalign'; main()", "serve-reward",
                "--reward", json.dumps(self.reward), "--host", self.host, "--port", str(self.port), *self.options]
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env if self.env is not None else dict(os.environ),
                                         start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.kill()
                raise ServiceStartError(f"RewardServer: vidalign serve-reward exited with {self.proc.returncode} before answering; "
                                        f"its log ({self.log_path}):\n{self.log()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.1)
        self.kill()
        raise ServiceStartError(f"RewardServer: no answer from {self.url}/health within {self.startup_timeout} s; its log ({self.log_path}):\n{self.log()[-3000:]}")

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, grace: float = 30.0) -> None:
        """SIGTERM (graceful), then SIGKILL to the whole group after ``grace`` seconds."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        self._signal_group(signal.SIGKILL)  # workers or front ends left behind, if any
        self.proc.wait()

    def kill(self) -> None:
        """SIGKILL to the whole group at once: the service crashes."""
        if self.proc is not None:
            self._signal_group(signal.SIGKILL)
            self.proc.wait()

    def __enter__(self) -> "RewardServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _merge(batches: list[dict], sizes: list[int]) -> dict:
    """Concatenate per-video list entries; other entries must be equal across the requests."""
    out = {}
    for key in batches[0]:
        values = [b[key] for b in batches]
        if all(isinstance(v, list) and len(v) == s for v, s in zip(values, sizes)):
            out[key] = [x for v in values for x in v]
        elif all(v == values[0] for v in values):
            out[key] = values[0]
        else:
            raise RewardInputError(f"batch[{key!r}] differs between requests and is not one item per video")
    return out


class RemoteReward(RewardCallback):
    """A reward scored by a :class:`RewardServer` (``vidalign serve-reward``) over HTTP.

    Sends the videos (``encoding``, see the module docstring) and the batch entries named in
    ``batch_keys`` that hold one JSON value per video (captions) or one JSON value for all; gets the
    scores and the served reward's components back (logged as ``reward/<name>/<part>``). Same scores
    as the reward in-process (tested; exact with ``uint8`` for rewards that quantise frames to uint8).
    A server that is down, slower than ``timeout``, or answers 5xx is retried ``max_retries`` times
    (waits ``retry_backoff·2^k`` s); then, or at once on a 4xx (bad input, named by the server), a
    reply that is not a score list, or another number of scores than videos, :class:`RemoteRewardError`
    — never a made-up reward. Non-finite scores: :class:`NonFiniteRewardError`.

    Args:
        url: the server, e.g. ``http://10.0.0.5:8100``.
        name, weight: see :class:`RewardCallback`.
        encoding: ``"uint8"`` (default), ``"float16"`` or ``"float32"``.
        batch_keys: batch entries sent along (default: captions).
        timeout: seconds per request (the server's batching wait and scoring included).
        max_retries, retry_backoff: see above.
    """

    def __init__(self, url: str, name: str = "remote", weight: float = 1.0, encoding: str = "uint8",
                 batch_keys: tuple[str, ...] | list[str] = ("caption", "prompt", "text", "fps"), timeout: float = 300.0,
                 max_retries: int = 2, retry_backoff: float = 0.5):
        super().__init__(name=name, weight=weight)
        if encoding not in _DTYPES:
            raise ValueError(f"RemoteReward: encoding must be one of {sorted(_DTYPES)}, got {encoding!r}")
        if max_retries < 0 or timeout <= 0:
            raise ValueError(f"RemoteReward: need max_retries >= 0 and timeout > 0, got {max_retries}, {timeout}")
        self.url, self.encoding, self.batch_keys = url.rstrip("/") + "/score", encoding, tuple(batch_keys)
        self.timeout, self.max_retries, self.retry_backoff = float(timeout), int(max_retries), float(retry_backoff)
        self._last: dict[str, Tensor] = {}
        #: the last 64 calls: ``{"videos": B, "batch": the reply's batch}`` (how many requests and videos shared the server's score call)
        self.recent_calls: collections.deque = collections.deque(maxlen=64)

    def _batch_payload(self, batch: dict | None) -> dict:
        out = {}
        for key in self.batch_keys:
            if not batch or key not in batch:
                continue
            v = batch[key]
            if torch.is_tensor(v):
                v = v.tolist()
            if isinstance(v, tuple):
                v = list(v)
            try:
                json.dumps(v)
            except TypeError:
                raise RewardInputError(f"RemoteReward: batch[{key!r}] is not JSON-serialisable ({type(v).__name__})") from None
            out[key] = v
        return out

    def post(self, body: bytes) -> dict:
        import urllib.error
        import urllib.request

        errors = []
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.retry_backoff * 2 ** (attempt - 1))
            try:
                req = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/octet-stream"}, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    return json.loads(resp.read().decode())
            except urllib.error.HTTPError as e:
                detail = e.read()[:500].decode(errors="replace")
                if e.code < 500:
                    if '"error":"NonFiniteRewardError"' in detail.replace(" ", ""):  # the served reward's non-finite scores: as in-process
                        raise NonFiniteRewardError(f"RemoteReward: {self.url}: {detail}") from e
                    raise RemoteRewardError(f"RemoteReward: {self.url} refused the request (HTTP {e.code}): {detail}") from e
                errors.append(f"HTTP {e.code}: {detail[:200]}")
            except (TimeoutError, OSError) as e:
                reason = getattr(e, "reason", e)
                errors.append("timeout" if isinstance(reason, TimeoutError) or "timed out" in str(reason) else f"{type(reason).__name__}: {reason}")
            except ValueError as e:
                raise RemoteRewardError(f"RemoteReward: {self.url} answered with a body that is not JSON ({e})") from e
        raise RemoteRewardError(f"RemoteReward: {self.url} failed {self.max_retries + 1} times (timeout {self.timeout} s): {errors}; is "
                                f"`vidalign serve-reward --reward <class_path> --port <port>` running there? (the URL: --trainer.callbacks.url)")

    def score(self, videos: Tensor, batch: dict | None = None) -> Tensor:
        v = check_videos(videos, "RemoteReward")
        reply = self.post(encode_request(v, self._batch_payload(batch), self.encoding))
        scores = reply.get("scores") if isinstance(reply, dict) else None
        if not isinstance(scores, list) or len(scores) != v.shape[0]:
            got = f"{len(scores)} scores" if isinstance(scores, list) else f"no score list ({str(reply)[:200]})"
            raise RemoteRewardError(f"RemoteReward: {self.url} answered {got} for {v.shape[0]} videos")
        try:
            r = torch.tensor([float(s) for s in scores], dtype=torch.float32)
        except (TypeError, ValueError) as e:
            raise RemoteRewardError(f"RemoteReward: {self.url} answered scores that are not numbers: {scores[:8]}") from e
        if not torch.isfinite(r).all():
            raise NonFiniteRewardError(f"RemoteReward: {self.url} answered non-finite scores {scores}")
        self.recent_calls.append({"videos": int(v.shape[0]), "batch": reply.get("batch")})
        comps = reply.get("components") or {}
        self._last = {k: torch.tensor(c, dtype=torch.float32) for k, c in comps.items() if isinstance(c, list) and len(c) == v.shape[0]}
        return r.to(videos.device)

    def score_components(self) -> dict[str, Tensor]:
        return dict(self._last)
