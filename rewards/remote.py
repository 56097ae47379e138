"""Rewards as a service (issue 22, item 2): :class:`RewardServer` serves any :class:`RewardCallback`'s
``score`` over HTTP with dynamic batching (``vidalign serve-reward``), and :class:`RemoteReward` is the
reward callback that scores through it.

Server choice: the standard library's ``ThreadingHTTPServer`` and one model thread, not LitServe: no new
dependencies in the training environment (LitServe brings FastAPI, uvicorn and their pins), and the
batching needed here — concatenate requests of equally shaped videos for up to ``batch_timeout`` seconds
— is a few lines. Put the server behind a reverse proxy for TLS or several replicas.

Wire format (our choice): ``POST /score`` with body ``len(header) (4 bytes, big-endian) + header (JSON:
shape, dtype, batch) + videos (raw little-endian array, (B, T, 3, H, W))``; reply ``{"scores": [...],
"components": {name: [...]}}`` (JSON). ``dtype`` ``"uint8"`` (default: 1 byte per value, 4x less than
fp32, 3·T·H·W bytes per video — 110 kB for 9 frames of 64x64, 97 MB for 81 frames of 480x832;
exact for every reward of :mod:`~lightning_vidalign.rewards.models`, which quantise frames to uint8
themselves) or ``"float16"`` / ``"float32"`` (exact for any reward, 2x / 4x the bytes). No video codec:
H.264 would be ~50-100x smaller but lossy and costs an encode per rollout.
"""
from __future__ import annotations

import json
import math
import queue
import struct
import threading
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
        RewardInputError: a malformed body (header, dtype, or a byte count that does not fit the shape).
    """
    try:
        n = struct.unpack(">I", body[:4])[0]
        header = json.loads(body[4 : 4 + n])
        shape, dtype = [int(s) for s in header["shape"]], header["dtype"]
        np_dtype = np.dtype(_DTYPES[dtype]).newbyteorder("<")
    except (struct.error, ValueError, KeyError, TypeError) as e:
        raise RewardInputError(f"malformed request header: {type(e).__name__}: {e}") from e
    data = body[4 + n :]
    if len(shape) != 5 or math.prod(shape) * np_dtype.itemsize != len(data):
        raise RewardInputError(f"request data of {len(data)} bytes does not fit shape {shape} of {dtype}")
    arr = np.frombuffer(data, dtype=np_dtype).reshape(shape)
    videos = torch.from_numpy(arr.astype(np.float32))
    if dtype == "uint8":
        videos = videos / 255
    return videos, header.get("batch") or {}


class _Job:
    def __init__(self, videos: Tensor, batch: dict):
        self.videos, self.batch, self.done = videos, batch, threading.Event()
        self.scores: Tensor | None = None
        self.components: dict[str, Tensor] = {}
        self.error: BaseException | None = None


class RewardServer:
    """Serve ``reward.score`` over HTTP on ``host:port`` with dynamic batching.

    Requests wait in a queue; one model thread takes the first and, for up to ``batch_timeout`` seconds,
    adds queued requests whose videos have the same ``(T, 3, H, W)`` while the total stays within
    ``max_batch_size`` videos; it scores the concatenation once (``batch`` entries that are lists of one
    item per video are concatenated; other entries must agree) and answers each request with its slice.
    ``GET /health`` answers ``{"reward": class, "name": ..., "batches": n}``. A reward error is answered
    ``422`` for bad input (:class:`RewardInputError`, ``KeyError``, ``ValueError``) and ``500`` otherwise,
    with the error's type and message. ``batch_sizes`` keeps the size of every scored batch.

    Args:
        reward: the reward callback to serve (moved to ``device``).
        host, port: where to listen (port 0: a free port; see :attr:`url`).
        max_batch_size: most videos per ``score`` call (a larger request is scored alone).
        batch_timeout: seconds the first request waits for others.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
    """

    def __init__(self, reward: RewardCallback, host: str = "127.0.0.1", port: int = 0, max_batch_size: int = 16, batch_timeout: float = 0.01, device: str = "cpu"):
        import http.server

        self.reward = reward.to(torch.device(device))
        self.max_batch_size, self.batch_timeout = max(1, int(max_batch_size)), float(batch_timeout)
        self.queue: queue.Queue[_Job] = queue.Queue()
        self.batch_sizes: list[int] = []
        self._stop = threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _reply(self, code: int, payload: dict) -> None:
                out = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                try:
                    self.wfile.write(out)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up

            def do_GET(self):
                if self.path.rstrip("/") != "/health":
                    return self._reply(404, {"error": f"no {self.path}: GET /health, POST /score"})
                self._reply(200, {"reward": type(server.reward).__name__, "name": server.reward.name, "batches": len(server.batch_sizes)})

            def do_POST(self):
                if self.path.rstrip("/") != "/score":
                    return self._reply(404, {"error": f"no {self.path}: POST /score"})
                try:
                    videos, batch = decode_request(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                except RewardInputError as e:
                    return self._reply(422, {"error": "RewardInputError", "message": str(e)})
                job = _Job(videos, batch)
                server.queue.put(job)
                job.done.wait()
                if job.error is not None:
                    bad_input = isinstance(job.error, (RewardInputError, KeyError, ValueError))
                    return self._reply(422 if bad_input else 500, {"error": type(job.error).__name__, "message": str(job.error)})
                self._reply(200, {"scores": job.scores.tolist(), "components": {k: v.tolist() for k, v in job.components.items()}})

        try:
            self.httpd = http.server.ThreadingHTTPServer((host, port), Handler)
        except OSError as e:  # e.g. the port is taken by another server
            raise RemoteRewardError(f"RewardServer: cannot listen on {host}:{port}: {e.strerror or e} (choose another --port, or 0 for a free one)") from e
        self.httpd.daemon_threads = True
        self.host, self.port = self.httpd.server_address[:2]
        self._threads = [threading.Thread(target=self.httpd.serve_forever, daemon=True), threading.Thread(target=self._work, daemon=True)]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "RewardServer":
        for t in self._threads:
            t.start()
        return self

    def serve_forever(self) -> None:
        self.start()
        try:
            while not self._stop.is_set():
                time.sleep(0.5)
        finally:
            self.stop()

    def stop(self) -> None:
        self._stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> "RewardServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------ the model thread
    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                first = self.queue.get(timeout=0.1)
            except queue.Empty:
                continue
            jobs, n = [first], first.videos.shape[0]
            deadline = time.monotonic() + self.batch_timeout
            while n < self.max_batch_size:
                left = deadline - time.monotonic()
                try:
                    job = self.queue.get(timeout=left) if left > 0 else self.queue.get_nowait()
                except queue.Empty:
                    break
                if job.videos.shape[1:] != first.videos.shape[1:] or n + job.videos.shape[0] > self.max_batch_size or not _mergeable(first.batch, job.batch):
                    self._run([job])  # does not fit this batch: scored on its own
                    continue
                jobs.append(job)
                n += job.videos.shape[0]
            self._run(jobs)

    def _run(self, jobs: list[_Job]) -> None:
        try:
            videos = torch.cat([j.videos for j in jobs])
            batch = _merge([j.batch for j in jobs], [j.videos.shape[0] for j in jobs])
            scores = self.reward.score(videos.to(self.reward.device), batch).detach().float().cpu()
            if scores.shape != (videos.shape[0],):
                raise RewardInputError(f"{type(self.reward).__name__}.score returned shape {tuple(scores.shape)} for {videos.shape[0]} videos")
            parts = {k: v.detach().float().cpu() for k, v in self.reward.score_components().items() if torch.is_tensor(v) and v.shape == scores.shape}
            self.batch_sizes.append(int(videos.shape[0]))
            start = 0
            for j in jobs:
                m = j.videos.shape[0]
                j.scores, j.components = scores[start : start + m], {k: v[start : start + m] for k, v in parts.items()}
                start += m
        except Exception as e:  # noqa: BLE001 - answered to every waiting client, named
            for j in jobs:
                j.error = e
        finally:
            for j in jobs:
                j.done.set()


def _mergeable(a: dict, b: dict) -> bool:
    return set(a) == set(b)


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
        comps = reply.get("components") or {}
        self._last = {k: torch.tensor(c, dtype=torch.float32) for k, c in comps.items() if isinstance(c, list) and len(c) == v.shape[0]}
        return r.to(videos.device)

    def score_components(self) -> dict[str, Tensor]:
        return dict(self._last)


def serve_reward(args: list[str]) -> None:
    """``vidalign serve-reward --reward CLASS_PATH [--reward.<init arg> VALUE ...] [--config YAML] [--host H]
    [--port P] [--max_batch_size N] [--batch_timeout S] [--device D]``: serve a reward callback until
    interrupted. Prints one line ``serving <Class> [<name>] on http://H:P`` once listening."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog="vidalign serve-reward", description=serve_reward.__doc__)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_subclass_arguments(RewardCallback, "reward", required=True)
    parser.add_argument("--host", type=str, default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--max_batch_size", type=int, default=16)
    parser.add_argument("--batch_timeout", type=float, default=0.01)
    parser.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu")
    cfg = parser.parse_args(args)
    reward = parser.instantiate_classes(cfg).reward
    server = RewardServer(reward, host=cfg.host, port=cfg.port, max_batch_size=cfg.max_batch_size, batch_timeout=cfg.batch_timeout, device=cfg.device)
    print(f"serving {type(reward).__name__} [{reward.name}] on {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
