"""The reward service on LitServe (issue 36, item 4): ``vidalign serve-reward`` serves any
:class:`RewardCallback`'s ``score`` at ``POST /score`` for :class:`~lightning_vidalign.rewards.RemoteReward`,
and ``vidalign serve-vlm`` serves a Hugging Face vision-language chat model behind LitServe's
OpenAI chat-completions spec for :class:`~lightning_vidalign.rewards.VLMJudgeReward`.

LitServe (Lightning's serving library) does what a service needs and this project does not exist for: batching
of concurrent requests, several worker processes per device, device placement (``cpu``, ``cuda:0``...),
``GET /health`` (200 ``ok`` once every worker is ready, 503 before), ``GET /info``, graceful shutdown on Ctrl-C /
SIGTERM, and the OpenAI spec. The wire format of ``/score`` is the one :mod:`~lightning_vidalign.rewards.remote`
defines (raw ``application/octet-stream`` body: header + uint8/float16/float32 videos; JSON reply), so the client
is unchanged and needs no LitServe. Installed with the ``serve`` extra (``pip install -c constraints.txt -e
".[serve]"``); this module imports ``litserve`` and is imported only by the two commands and their workers.

Processes (LitServe's): the command's process validates the options, binds the port and supervises; each
inference worker is a *spawned* process that builds the reward from its config in :meth:`RewardAPI.setup` (one
model per worker: ``--devices 2 --workers_per_device 2`` loads four); the HTTP front ends are forked. Stop the
service with Ctrl-C or SIGTERM to the command's process (it stops its workers), or signal its process group.
"""

import logging
import os  # (no "from __future__ import annotations": FastAPI reads decode_request's annotation as a type)
import signal
import socket
import sys
import threading
import time
import urllib.request
from typing import Annotated, Any, Literal

import litserve as ls
import torch
from fastapi import Body
from starlette.responses import JSONResponse

from lightning_vidalign.rewards.base import RewardCallback
from lightning_vidalign.rewards.models import NonFiniteRewardError, RewardInputError
from lightning_vidalign.rewards.remote import ServiceStartError, _merge, decode_request, free_port
from lightning_vidalign.utils import cause_chain, error_message

log = logging.getLogger(__name__)

#: errors of a reward that mean the request was wrong (answered 422); any other is the server's (500)
BAD_INPUT = (RewardInputError, KeyError, ValueError)


class _Failed:
    """A request's failure, carried from ``predict`` to ``encode_response`` (answered with its own status)."""

    def __init__(self, error: BaseException):
        self.status = 422 if isinstance(error, (*BAD_INPUT, NonFiniteRewardError)) else 500
        self.error, self.message = type(error).__name__, error_message(error)


def build_reward(config: dict) -> RewardCallback:
    """A reward callback from ``{"class_path": ..., "init_args": {...}}`` (what ``--reward`` parses to).

    Raises:
        jsonargparse's ``ArgumentError``: not a :class:`RewardCallback` subclass, or init arguments it does not take.
    """
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(RewardCallback, "reward", required=True)
    return parser.instantiate_classes(parser.parse_object({"reward": config})).reward


def _own_cause(error: BaseException) -> BaseException:
    """The first error in ``error``'s ``__cause__`` chain (outermost first) that is this package's own or a missing file;
    ``error`` itself when there is none (jsonargparse wraps a reward's refusal in a "Does not validate" dump)."""
    for exc in cause_chain(error):
        if type(exc).__module__.startswith("lightning_vidalign") or isinstance(exc, FileNotFoundError):
            return exc
    return error


class RewardAPI(ls.LitAPI):
    """``POST /score``: a reward callback's ``score`` on the videos of the request (wire format:
    :func:`~lightning_vidalign.rewards.remote.encode_request`), answered ``{"scores": [B floats], "components":
    {name: [B floats]}, "batch": {"requests": k, "videos": n}}`` — ``batch`` says how many requests and videos
    shared the ``score`` call.

    Batching (LitServe's): a free worker takes up to ``max_batch_size`` queued requests, waiting at most
    ``batch_timeout`` seconds for them to arrive (the window starts when the worker looks at the queue, not at the first
    request's arrival), and hands them to one :meth:`predict`. There, requests whose videos have the same ``(T, 3, H, W)`` and whose batch entries have the same
    keys are concatenated in arrival order into ``score`` calls of at most ``max_batch_videos`` videos (a larger
    request is scored alone); ``batch`` entries that hold one item per video are concatenated, others must agree
    (else each request is scored on its own). Each request is answered with its own slice.

    Errors are per request: a malformed body, or the reward raising :class:`RewardInputError` / ``KeyError`` /
    ``ValueError``, is answered ``422``, and so are non-finite scores (``NonFiniteRewardError``: RemoteReward raises it as
    an in-process reward would); any other reward error ``500``; all as ``{"error": type, "message": ...}``
    (RemoteReward raises at once on 4xx and retries 5xx). Requests that shared a failed ``score`` call all get its
    error; other requests of the batch are answered as usual. A reward that returns another shape than ``(B,)`` is a
    ``500``. A component with a non-finite value is left out of the reply (logged).

    Args:
        reward: the reward's config, ``{"class_path": "pkg.Class", "init_args": {...}}``; built in each worker
            (:func:`build_reward`) and moved to the worker's device.
        max_batch_size: most requests per batch (LitServe's option).
        batch_timeout: seconds a free worker waits for queued requests to fill a batch (LitServe's option).
        max_batch_videos: most videos per ``score`` call. Our choice: 16, the old server's bound: a real 81-frame
            480x832 video is 97 MB on the wire and 388 MB as float32 in the worker, so 16 hold about 6 GB; the rollout
            chunks of one round (``rollout_batch_size``, 4-8) still share a call.
    """

    def __init__(self, reward: dict, max_batch_size: int = 8, batch_timeout: float = 0.01, max_batch_videos: int = 16):
        super().__init__(max_batch_size=int(max_batch_size), batch_timeout=float(batch_timeout), api_path="/score")
        self.reward_config, self.max_batch_videos = reward, max(1, int(max_batch_videos))
        self.reward: RewardCallback | None = None

    def setup(self, device: str) -> None:
        try:
            self.reward = build_reward(self.reward_config).to(torch.device(device))
        except Exception as e:
            cause = _own_cause(e)  # our own message under jsonargparse's wrapping, when there is one
            print(f"vidalign serve-reward: the reward {self.reward_config.get('class_path')} could not be built on {device}: {type(cause).__name__}: {cause}",
                  file=sys.stderr, flush=True)
            raise cause.with_traceback(None) from None  # LitServe logs it with its traceback: ours, not jsonargparse's chain

    def decode_request(self, request: Annotated[bytes, Body(media_type="application/octet-stream")]) -> Any:
        """The raw body → ``(videos (B, T, 3, H, W) float32 in [0, 1], batch)``, or its failure (answered 422 alone, not
        raised: a raise here would fail every request of LitServe's batch)."""
        try:
            return decode_request(request)
        except Exception as e:  # noqa: BLE001 - this request's own answer
            return _Failed(e if isinstance(e, RewardInputError) else RewardInputError(f"malformed request: {type(e).__name__}: {e}"))

    def batch(self, inputs: list) -> list:
        return list(inputs)

    def unbatch(self, outputs: list) -> list:
        return outputs

    def predict(self, requests: Any) -> Any:
        """One LitServe batch (a list of decoded requests; the request itself when ``max_batch_size`` is 1) → one reply
        dict or :class:`_Failed` per request, in order (see the class docstring for the grouping)."""
        single = not isinstance(requests, list)  # max_batch_size 1: LitServe passes the request itself
        items = [requests] if single else requests
        out: list[Any] = [x if isinstance(x, _Failed) else None for x in items]
        groups: dict[tuple, list[int]] = {}
        for i, x in enumerate(items):
            if not isinstance(x, _Failed):
                videos, batch = x
                groups.setdefault((tuple(videos.shape[1:]), tuple(sorted(batch))), []).append(i)
        for members in groups.values():
            chunk: list[int] = []
            for i in members + [None]:
                n = sum(items[j][0].shape[0] for j in chunk)
                if chunk and (i is None or n + items[i][0].shape[0] > self.max_batch_videos):
                    self._score(items, chunk, out)
                    chunk = []
                if i is not None:
                    chunk.append(i)
        return out[0] if single else out

    def _score(self, items: list, chunk: list[int], out: list) -> None:
        sizes = [items[j][0].shape[0] for j in chunk]
        try:
            batch = _merge([items[j][1] for j in chunk], sizes)
        except RewardInputError:
            if len(chunk) > 1:  # entries that differ between the requests: each scored on its own
                for j in chunk:
                    self._score(items, [j], out)
                return
            raise
        try:
            videos = torch.cat([items[j][0] for j in chunk]).to(self.reward.device)
            scores = self.reward.score(videos, batch).detach().float().cpu()
            if scores.shape != (videos.shape[0],):
                raise RuntimeError(f"{type(self.reward).__name__}.score returned shape {tuple(scores.shape)} for {videos.shape[0]} videos")
            if not torch.isfinite(scores).all():  # (JSON has no NaN: named, never sent)
                raise NonFiniteRewardError(f"{type(self.reward).__name__} returned non-finite scores {scores.tolist()}")
            parts = {k: v.detach().float().cpu() for k, v in self.reward.score_components().items() if torch.is_tensor(v) and v.shape == scores.shape}
            for k in [k for k, v in parts.items() if not torch.isfinite(v).all()]:
                log.warning("serve-reward: component %r of %s has non-finite values %s: left out of the reply", k, type(self.reward).__name__, parts.pop(k).tolist())
        except Exception as e:  # noqa: BLE001 - answered to every request of the call, named
            for j in chunk:
                out[j] = _Failed(e)
            return
        start, shared = 0, {"requests": len(chunk), "videos": int(sum(sizes))}
        for j, m in zip(chunk, sizes):
            out[j] = {"scores": scores[start : start + m].tolist(), "components": {k: v[start : start + m].tolist() for k, v in parts.items()}, "batch": shared}
            start += m

    def encode_response(self, output: Any) -> Any:
        if isinstance(output, _Failed):
            return JSONResponse({"error": output.error, "message": output.message}, status_code=output.status)
        return output


class VLMChatAPI(ls.LitAPI):
    """An OpenAI chat-completions endpoint (``POST /v1/chat/completions``, LitServe's ``OpenAISpec``) for a Hugging
    Face vision-language model folder (``AutoModelForImageTextToText`` + ``AutoProcessor``, e.g. Qwen2-VL /
    Qwen2.5-VL): what :class:`~lightning_vidalign.rewards.VLMJudgeReward` talks to, without vLLM.

    Messages follow the OpenAI vision format: text parts and ``image_url`` parts holding ``data:image/...;base64,``
    URLs (decoded with PIL; other URLs are refused: nothing is fetched). The prompt is the processor's chat
    template with the generation prompt. The reply is greedy decoding of up to ``max_tokens`` new tokens
    (``temperature`` is not used: our choice, a judge wants determinism) — or, when the service is started with
    ``choices``, the allowed reply with the highest log-likelihood under the model given the prompt: the sum of the
    log-probabilities of the choice's tokens *and of the end-of-turn token after them* (without it, ``"Score: 1"``
    would always beat ``"Score: 10"``, its prefix). One forward pass of prompt + choice per choice (no shared prompt
    cache: our choice, simple and exact; ten choices cost ten passes). Like vLLM's ``guided_choice`` the reply is
    always one of the choices (vLLM decodes constrained token by token; this ranks whole choices); with ``choices``
    such as ``["Score: 1", ..., "Score: 10"]`` a judge always answers a parsable score. Usage counts the prompt's
    tokens, image tokens included. A message that cannot be read (an ``image_url`` that is not a base64 ``data:``
    URL, an image PIL cannot decode) is answered ``400`` with the reason.

    Args:
        model: the model folder (``config.json``, weights, processor files).
        choices: allowed replies (None: free generation).
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``.

    Raises:
        ValueError: an empty choice, or ``dtype`` not one of the three.
        FileNotFoundError: (in the worker, at start) no ``config.json`` in ``model``.
    """

    def __init__(self, model: str, choices: list[str] | None = None, dtype: str = "float32"):
        if choices is not None and any(not c for c in choices):
            raise ValueError(f"VLMChatAPI: choices must be non-empty strings, got {choices}")
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"VLMChatAPI: dtype must be float32, bfloat16 or float16, got {dtype!r}")
        super().__init__(spec=ls.OpenAISpec())
        self.model_path, self.choices, self.dtype = model, list(choices) if choices else None, dtype

    def setup(self, device: str) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        if not os.path.isfile(os.path.join(self.model_path, "config.json")):
            print(f"vidalign serve-vlm: no config.json in {self.model_path} (a Hugging Face model folder is expected)", file=sys.stderr, flush=True)
            raise FileNotFoundError(os.path.join(self.model_path, "config.json"))
        self.device = torch.device(device)
        self.processor = AutoProcessor.from_pretrained(self.model_path)
        self.model = AutoModelForImageTextToText.from_pretrained(self.model_path, dtype=getattr(torch, self.dtype)).to(self.device).eval()

    def prompt_inputs(self, messages: list[dict]) -> dict:
        """OpenAI messages (dicts) → the model's inputs (``input_ids``, ``pixel_values``...), prompt with the
        generation prompt. Raises ``ValueError`` on an ``image_url`` that is not a base64 ``data:`` URL."""
        import base64
        import io

        from PIL import Image

        conversation, images = [], []
        for m in messages:
            content = m.get("content")
            if isinstance(content, str) or content is None:
                conversation.append({"role": m["role"], "content": [{"type": "text", "text": content or ""}]})
                continue
            parts = []
            for p in content:
                if p.get("type") == "image_url":
                    url = p.get("image_url") or ""
                    url = url if isinstance(url, str) else url.get("url", "")
                    if not url.startswith("data:image/") or ";base64," not in url:
                        raise ValueError(f"image_url must be a data:image/...;base64, URL (nothing is fetched), got {url[:60]!r}")
                    try:
                        images.append(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))
                    except Exception as e:  # noqa: BLE001 - named in the 400 reply
                        raise ValueError(f"image_url {len(images) + 1}: not a decodable image ({type(e).__name__}: {e})") from e
                    parts.append({"type": "image"})
                elif p.get("type") == "text":
                    parts.append({"type": "text", "text": p.get("text", "")})
            conversation.append({"role": m["role"], "content": parts})
        text = self.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        inputs = dict(self.processor(text=[text], images=images or None, return_tensors="pt"))
        dtype = getattr(torch, self.dtype)  # pixel values in the model's dtype (the processor gives float32)
        return {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}

    @torch.no_grad()
    def reply(self, messages: list[dict], max_tokens: int = 32) -> tuple[str, int, int]:
        """``(reply text, prompt tokens, completion tokens)`` for OpenAI ``messages`` (dicts)."""
        inputs = {k: v.to(self.device) for k, v in self.prompt_inputs(messages).items()}
        prompt_len = int(inputs["input_ids"].shape[1])
        tok = self.processor.tokenizer
        if self.choices:
            end = tok.convert_tokens_to_ids(tok.eos_token) if tok.eos_token else None  # the end of the assistant's turn
            best, best_lp, best_n = self.choices[0], -float("inf"), 0
            for choice in self.choices:
                ids = torch.tensor([tok.encode(choice, add_special_tokens=False) + ([end] if end is not None else [])], device=self.device)
                full = dict(inputs)
                for key, value in inputs.items():  # the per-token inputs grow by the choice's tokens (text tokens: type 0, attended)
                    if torch.is_tensor(value) and value.shape == (1, prompt_len):
                        grow = ids if key == "input_ids" else torch.ones_like(ids) if key == "attention_mask" else torch.zeros_like(ids)
                        full[key] = torch.cat([value, grow.to(value.dtype)], 1)
                logits = self.model(**full).logits[0, prompt_len - 1 : -1].float()
                lp = float(torch.log_softmax(logits, -1).gather(1, ids[0, :, None]).sum())
                if lp > best_lp:  # (a NaN never wins: the first choice stays)
                    best, best_lp, best_n = choice, lp, ids.shape[1]
            return best, prompt_len, best_n
        out = self.model.generate(**inputs, max_new_tokens=int(max_tokens), do_sample=False)
        new = out[0, prompt_len:]
        return tok.decode(new, skip_special_tokens=True), prompt_len, int(new.shape[0])

    def predict(self, request):
        """A ``ChatCompletionRequest`` (LitServe's model) → one assistant message with its usage (a generator, as
        the spec requires)."""
        from fastapi import HTTPException

        messages = [m.model_dump() if hasattr(m, "model_dump") else m for m in request.messages]
        try:
            text, n_prompt, n_new = self.reply(messages, request.max_completion_tokens or request.max_tokens or 32)
        except ValueError as e:  # the request's own fault: 400 with the reason (a judge does not retry it)
            raise HTTPException(400, f"vidalign serve-vlm: {e}") from e
        yield {"role": "assistant", "content": text, "prompt_tokens": n_prompt, "completion_tokens": n_new, "total_tokens": n_prompt + n_new}


# ---------------------------------------------------------------------------------------------- the commands
def _check_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ServiceStartError(f"cannot listen on {host}:{port}: {e.strerror or e} (choose another --port, or 0 for a free one)") from e


def run_service(server: "ls.LitServer", host: str, port: int, banner: str, log_level: str = "warning") -> None:
    """Run a LitServer on ``host:port`` until Ctrl-C or SIGTERM; print ``banner`` (with ``{url}`` filled) once the
    service answers ``GET /health`` with 200. Port 0 takes a free port. Raises :class:`ServiceStartError` when the
    port is taken or no worker starts (the worker's own error is printed above by the worker)."""
    if host not in ("127.0.0.1", "0.0.0.0", "::"):
        raise ServiceStartError(f"--host must be 127.0.0.1 (this machine), 0.0.0.0 or :: (every interface; LitServe's choices), got {host!r}")
    port = free_port(host) if port == 0 else port
    _check_port(host, port)
    shown = socket.gethostname() if host in ("0.0.0.0", "::") else host
    probe = f"http://{'127.0.0.1' if host != '::' else '[::1]'}:{port}/health"

    def announce():
        while True:
            try:
                with urllib.request.urlopen(probe, timeout=2) as r:
                    if r.status == 200:
                        print(banner.format(url=f"http://{shown}:{port}"), flush=True)
                        return
            except OSError:
                pass
            time.sleep(0.1)

    threading.Thread(target=announce, daemon=True).start()
    main_pid = os.getpid()

    def on_sigterm(signum, frame):
        if os.getpid() == main_pid:  # LitServe's graceful stop, as on Ctrl-C; a second SIGTERM does not break it off
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            raise KeyboardInterrupt
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a forked front end (uvicorn re-raises the signal it handled): the default
        os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        server.run(host=host, port=port, generate_client_file=False, log_level=log_level)
    except RuntimeError as e:
        if "failed to start" in str(e):
            raise ServiceStartError("no worker started: the reward or model could not be built (the worker's error is above)") from e
        raise
    except KeyboardInterrupt:  # stopped while the workers were starting (LitServe's own shutdown covers a running service)
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        for worker in getattr(server, "inference_workers", None) or []:  # none may outlive the command (a worker still loading)
            if worker.is_alive():
                worker.terminate()
                worker.join(timeout=10)


def _accelerator(cfg) -> tuple[str, Any]:
    """``--accelerator/--devices``, or the older ``--device cpu|cuda|cuda:K`` (``cuda:K``: CUDA_VISIBLE_DEVICES=K, one device)."""
    option = f"--accelerator {cfg.accelerator}" if cfg.device is None else f"--device {cfg.device}"
    kind, _, index = (cfg.accelerator, "", "") if cfg.device is None else cfg.device.partition(":")
    if cfg.device is not None and (kind not in ("cpu", "cuda", "mps") or (index and (kind != "cuda" or not index.isdigit()))):
        raise ServiceStartError(f"--device must be cpu, cuda, cuda:K (K a GPU index) or mps, got {cfg.device!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ServiceStartError(f"{option}: no CUDA GPU is visible here (torch.cuda.is_available() is False)")
    if cfg.device is None:
        return cfg.accelerator, cfg.devices
    if index:  # the workers are spawned after this: they see that GPU only (K counts within CUDA_VISIBLE_DEVICES when set)
        visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        if visible and int(index) >= len(visible):
            raise ServiceStartError(f"--device {cfg.device}: CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']} has {len(visible)} GPU(s)")
        os.environ["CUDA_VISIBLE_DEVICES"] = visible[int(index)] if visible else index
    return kind, 1


def _service_arguments(parser, port: int) -> None:
    parser.add_argument("--host", type=str, default="127.0.0.1", help="127.0.0.1 (this machine), 0.0.0.0 or :: (every interface)")
    parser.add_argument("--port", type=int, default=port, help="0: a free port (printed)")
    parser.add_argument("--accelerator", type=str, default="auto", help="auto, cpu, cuda or mps (LitServe's)")
    parser.add_argument("--devices", type=int | str, default="auto", help="number of devices, or auto (all)")
    parser.add_argument("--workers_per_device", type=int, default=1, help="worker processes per device, each with its own model")
    parser.add_argument("--device", type=str | None, default=None, help="shorthand that overrides --accelerator/--devices: cpu, cuda, cuda:K (that GPU only, one device), mps")
    parser.add_argument("--timeout", type=float, default=-1, help="seconds a request may wait in the queue (-1: no limit; the client has its own)")
    parser.add_argument("--log_level", type=str, default="warning", help="LitServe's and uvicorn's log level")


def serve_reward(args: list[str]) -> None:
    """``vidalign serve-reward --reward CLASS_PATH [--reward.<init arg> VALUE ...] [--config YAML] [--host H]
    [--port P] [--accelerator A] [--devices N] [--workers_per_device W] [--max_batch_size N] [--batch_timeout S]
    [--max_batch_videos V]``: serve a reward callback (:class:`RewardAPI`) until Ctrl-C / SIGTERM. Prints one line
    ``serving <Class> on http://H:P (...)`` once it answers."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog="vidalign serve-reward", description=serve_reward.__doc__)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_subclass_arguments(RewardCallback, "reward", required=True)
    _service_arguments(parser, port=8100)  # (configs/rewards/remote.yaml's url)
    parser.add_argument("--max_batch_size", type=int, default=8, help="most requests per batch")
    parser.add_argument("--batch_timeout", type=float, default=0.01, help="seconds the first request of a batch waits for others")
    parser.add_argument("--max_batch_videos", type=int, default=16, help="most videos per score call")
    cfg = parser.parse_args(args)
    reward = cfg.reward.as_dict()
    accelerator, devices = _accelerator(cfg)
    api = RewardAPI(reward, max_batch_size=cfg.max_batch_size, batch_timeout=cfg.batch_timeout, max_batch_videos=cfg.max_batch_videos)
    server = ls.LitServer(api, accelerator=accelerator, devices=devices, workers_per_device=cfg.workers_per_device,
                          timeout=False if cfg.timeout < 0 else cfg.timeout, model_metadata={"reward": reward["class_path"]})
    name = reward["class_path"].rsplit(".", 1)[-1]
    run_service(server, cfg.host, cfg.port, f"serving {name} on {{url}} ({cfg.workers_per_device} worker(s) per device, accelerator {accelerator})", cfg.log_level)


def serve_vlm(args: list[str]) -> None:
    """``vidalign serve-vlm --model FOLDER [--choices C ...] [--dtype D] [--host H] [--port P] [...]``: serve a
    vision-language chat model (:class:`VLMChatAPI`) at ``/v1/chat/completions`` until Ctrl-C / SIGTERM. Prints
    ``serving <folder> on http://H:P/v1`` once it answers (the ``base_url`` of VLMJudgeReward)."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog="vidalign serve-vlm", description=serve_vlm.__doc__)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_argument("--model", type=str, required=True, help="a Hugging Face vision-language model folder")
    parser.add_argument("--choices", type=list[str] | None, default=None, help="allowed replies: the most likely one is answered")
    parser.add_argument("--dtype", type=Literal["float32", "bfloat16", "float16"], default="float32", help="the model's dtype")
    _service_arguments(parser, port=8000)  # (configs/rewards/vlm_judge.yaml's base_url, vLLM's default)
    cfg = parser.parse_args(args)
    if not os.path.isfile(os.path.join(cfg.model, "config.json")):
        raise FileNotFoundError(f"vidalign serve-vlm: no config.json in --model {cfg.model} (a Hugging Face model folder is expected)")
    accelerator, devices = _accelerator(cfg)
    server = ls.LitServer(VLMChatAPI(cfg.model, choices=cfg.choices, dtype=cfg.dtype), accelerator=accelerator, devices=devices,
                          workers_per_device=cfg.workers_per_device, timeout=False if cfg.timeout < 0 else cfg.timeout, model_metadata={"model": cfg.model})
    run_service(server, cfg.host, cfg.port, f"serving {cfg.model} on {{url}}/v1 (OpenAI chat completions)", cfg.log_level)
