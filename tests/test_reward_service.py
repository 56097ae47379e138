"""Issue 22 item 2, on LitServe since issue 36 item 4: any reward callback served by `vidalign serve-reward`
(LitServe: batching, workers per device, health, graceful stop) and scored through RemoteReward; same scores as
in-process; per-request errors named; down / slow / refusing / miscounting servers named, never a zero."""
import os
import subprocess
import sys
import threading
import time

import pytest
import torch

from lightning_vidalign.rewards import LuminanceReward, RemoteReward, RemoteRewardError, RewardCallback, RewardServer
from lightning_vidalign.rewards.base import batch_captions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))
VIDALIGN = os.path.join(os.path.dirname(sys.executable), "vidalign")
CAPTIONS = ["a cyclist rides along a street", "a rabbit in a meadow"]
# the served classes below are imported by the service's worker: this folder on its path
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}


def _videos(b=2, t=3, h=16, w=16, seed=0):
    return torch.rand(b, t, 3, h, w, generator=torch.Generator().manual_seed(seed))


class CaptionLength(RewardCallback):
    """Mean pixel + caption length / 100 (needs the captions; the caption "nan" scores NaN). Sleeps ``batch["delay"]``
    seconds when sent; its components: each video's place in the score call and the worker's process id."""

    def __init__(self):
        super().__init__(name="caplen")
        self.n = 0

    def score(self, videos, batch=None):
        caps = batch_captions(batch, videos.shape[0], "CaptionLength")
        self.n = len(caps)
        time.sleep(float((batch or {}).get("delay", 0.0)))
        return videos.float().mean(dim=(1, 2, 3, 4)) + torch.tensor([float("nan") if c == "nan" else len(c) / 100 for c in caps])

    def score_components(self):
        return {"place": torch.arange(self.n, dtype=torch.float32), "pid": torch.full((self.n,), float(os.getpid()))}


def _concurrently(calls):
    """Run the callables at once; their results (or errors) in order."""
    out = [None] * len(calls)

    def run(i):
        try:
            out[i] = calls[i]()
        except Exception as e:  # noqa: BLE001 - returned to the test
            out[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_served_scores_equal_in_process_and_concurrent_requests_share_score_calls():
    import urllib.error
    import urllib.request

    from lightning_vidalign.rewards import NonFiniteRewardError

    videos = _videos()
    with RewardServer("test_reward_service.CaptionLength", max_batch_size=8, batch_timeout=0.5, max_batch_videos=8, env=ENV) as server:
        exact = RemoteReward(server.url, encoding="float32")
        got = exact.score(videos, {"caption": CAPTIONS, "index": torch.tensor([3, 4]), "video": videos})
        assert exact.score_components()["place"].tolist() == [0.0, 1.0]  # the served reward's parts come back
        torch.testing.assert_close(got, CaptionLength().score(videos, {"caption": CAPTIONS}), rtol=0, atol=1e-6)  # float32: the same floats
        u8 = RemoteReward(server.url).score(videos, {"caption": CAPTIONS})
        torch.testing.assert_close(u8, CaptionLength().score((videos * 255).round() / 255, {"caption": CAPTIONS}), rtol=0, atol=1e-5)

        # concurrent requests: batched by LitServe, concatenated into one score call, each answered with its own slice;
        # one without captions (the reward's KeyError) is answered 422 alone, the others are scored
        vids = [_videos(b=1, seed=i) for i in range(3)] + [_videos(b=2, seed=9), _videos(b=1, seed=7)]
        batches = [{"caption": [f"clip {i}"]} for i in range(3)] + [{"caption": CAPTIONS}, {"index": [0]}]
        clients = [RemoteReward(server.url, encoding="float32", batch_keys=("caption", "index")) for _ in vids]

        def garbage():  # a malformed body among them: answered 422 alone
            try:
                urllib.request.urlopen(urllib.request.Request(server.url + "/score", data=b"\0\0\0\2{}xx", method="POST"), timeout=30)
            except urllib.error.HTTPError as e:
                return e.code, e.read().decode()

        results = _concurrently([lambda i=i: clients[i].score(vids[i], batches[i]) for i in range(5)] + [garbage])
        assert results[5][0] == 422 and "RewardInputError" in results[5][1], results[5]

        # max_batch_videos: a request of more videos is scored alone; two that would exceed it together are not concatenated
        big = RemoteReward(server.url)
        big.score(_videos(b=9), {"caption": ["a"] * 9})
        assert big.recent_calls[-1]["batch"] == {"requests": 1, "videos": 9}
        pair = [RemoteReward(server.url) for _ in range(2)]
        _concurrently([lambda i=i: pair[i].score(_videos(b=5, seed=i), {"caption": ["c"] * 5}) for i in range(2)])
        assert all(c.recent_calls[-1]["batch"]["videos"] == 5 for c in pair)  # 5 + 5 > 8
        # non-finite scores: the in-process error, not a made-up or retried score
        with pytest.raises(NonFiniteRewardError, match="non-finite"):
            RemoteReward(server.url, max_retries=2).score(videos, {"caption": ["nan", "x"]})
    for i in range(4):
        torch.testing.assert_close(results[i], CaptionLength().score(vids[i], batches[i]), rtol=0, atol=1e-6)
    assert isinstance(results[4], RemoteRewardError) and "HTTP 422" in str(results[4]) and "KeyError" in str(results[4])
    shared = [c.recent_calls[-1]["batch"] for c in clients[:4]]
    assert max(b["requests"] for b in shared) >= 2, shared  # requests shared score calls
    assert all(b["videos"] <= 8 for b in shared)
    assert "Traceback" not in server.log() or "KeyError" in server.log()  # nothing but the refused request went wrong


def test_several_workers_score_at_once_and_errors_are_named():
    """Two workers on the CPU (LitServe's workers_per_device), one request per batch: while one worker sleeps on a slow
    request the other takes the next, so two slow requests are scored by two processes at once; a timeout and a refused
    input are named."""
    with RewardServer("test_reward_service.CaptionLength", max_batch_size=1, workers_per_device=2, env=ENV) as server:
        slow = [RemoteReward(server.url, batch_keys=("caption", "delay")) for _ in range(2)]
        t = time.perf_counter()
        _concurrently([lambda i=i: slow[i].score(_videos(b=1, seed=i), {"caption": ["x"], "delay": 1.5}) for i in range(2)])
        both = time.perf_counter() - t
        pids = {float(c.score_components()["pid"][0]) for c in slow}
        assert len(pids) == 2, pids  # two worker processes
        assert both < 2.9, both  # at once: 1.5 s each (sleeping: no CPU), not 3 s in a row
        with pytest.raises(RemoteRewardError, match=r"failed 2 times.*timeout"):
            RemoteReward(server.url, timeout=0.3, max_retries=1, retry_backoff=0.01, batch_keys=("caption", "delay")).score(
                _videos(), {"caption": CAPTIONS, "delay": 1.0})
        with pytest.raises(RemoteRewardError, match=r"HTTP 422.*KeyError.*captions"):  # the reward's own error, named, no retry
            RemoteReward(server.url).score(_videos(), {"index": [0, 1]})


def test_frame_reward_model_served_scores_equal_in_process(tmp_path):
    """A reward model that quantises frames to uint8 itself (CLIP score): uint8 on the wire loses nothing."""
    from test_reward_models import make_tiny_clip

    from lightning_vidalign.rewards import CLIPScoreReward

    folder = make_tiny_clip(str(tmp_path))
    videos = _videos(t=4, h=24, w=24)
    local = CLIPScoreReward(folder, num_frames=2).score(videos, {"caption": CAPTIONS})
    config = {"class_path": "lightning_vidalign.rewards.CLIPScoreReward", "init_args": {"path": folder, "num_frames": 2}}
    with RewardServer(config, env=ENV) as server:
        served = RemoteReward(server.url).score(videos, {"caption": CAPTIONS})
    torch.testing.assert_close(served, local, rtol=0, atol=1e-5)


def test_down_and_miscounting_servers_raise_named_errors():
    import http.server
    import json
    import socket

    videos, batch = _videos(), {"caption": CAPTIONS}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    t = time.perf_counter()
    with pytest.raises(RemoteRewardError, match=r"failed 3 times.*vidalign serve-reward .*--trainer.callbacks.url"):
        RemoteReward(dead, max_retries=2, retry_backoff=0.01).score(videos, batch)
    assert time.perf_counter() - t < 5

    class OneScore(http.server.BaseHTTPRequestHandler):  # a broken service (a stand-in: LitServe's own never miscounts)
        def log_message(self, *a):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            out = json.dumps({"scores": [0.5]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), OneScore)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        with pytest.raises(RemoteRewardError, match="1 scores for 2 videos"):
            RemoteReward(f"http://127.0.0.1:{httpd.server_address[1]}").score(videos, batch)
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_vidalign_serve_reward_command_serves_refuses_a_taken_port_and_names_a_reward_that_cannot_be_built(tmp_path):
    proc = subprocess.Popen([VIDALIGN, "serve-reward", "--reward", "lightning_vidalign.rewards.LuminanceReward", "--reward.scale", "2.0",
                             "--port", "0", "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, start_new_session=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving LuminanceReward on http://127.0.0.1:"), (line, proc.stderr.read() if proc.poll() is not None else "")
        url = line.split(" on ")[1].split()[0]
        videos = _videos()
        got = RemoteReward(url, encoding="float32").score(videos, {"caption": CAPTIONS})
        torch.testing.assert_close(got, LuminanceReward(scale=2.0).score(videos), rtol=0, atol=1e-6)
        port = url.rsplit(":", 1)[1]
        taken = subprocess.run([VIDALIGN, "serve-reward", "--reward", "lightning_vidalign.rewards.LuminanceReward", "--port", port],
                               capture_output=True, text=True, env=ENV, timeout=120)
        assert taken.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in taken.stderr and "choose another --port" in taken.stderr, taken.stderr
        assert "(the service did not start" in taken.stderr
    finally:
        proc.terminate()  # SIGTERM: LitServe's graceful stop, its workers with it
        assert proc.wait(timeout=60) == 0, proc.stderr.read()[-2000:]
    missing = str(tmp_path / "no_clip")
    bad = subprocess.run([VIDALIGN, "serve-reward", "--reward", "lightning_vidalign.rewards.CLIPScoreReward", "--reward.path", missing, "--port", "0"],
                         capture_output=True, text=True, env=ENV, timeout=180)
    assert bad.returncode == 2, bad.stderr[-3000:]
    assert "could not be built on cpu" in bad.stderr and missing in bad.stderr, bad.stderr[-3000:]
    assert "vidalign: ServiceStartError: no worker started" in bad.stderr


def test_vlm_judge_scores_through_a_tiny_qwen2vl_served_on_litserves_openai_spec(tmp_path):
    """VLMJudgeReward → `vidalign serve-vlm` (LitServe's OpenAISpec, /v1/chat/completions) → a tiny random-weight Qwen2-VL
    that sees the frames: the served replies are the most likely of the allowed choices under that model given the
    frames and the caption, as computed here directly with transformers."""
    import json

    from test_reward_models import write_tiny_qwen2vl
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from lightning_vidalign.rewards import VLMJudgeReward
    from lightning_vidalign.rewards.models import frame_indices, to_uint8

    folder = str(tmp_path / "qwen2vl")
    write_tiny_qwen2vl(folder)
    choices = [f"Score: {i}" for i in range(1, 11)]
    proc = subprocess.Popen([VIDALIGN, "serve-vlm", "--model", folder, "--choices", json.dumps(choices), "--port", "0", "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, start_new_session=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving ") and "/v1" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
        base_url = line.split(" on ")[1].split()[0]
        judge = VLMJudgeReward(base_url, model="tiny-qwen2vl", num_frames=2, concurrency=2)
        videos = _videos(b=2, t=4, h=28, w=28)
        videos[1] = 1 - videos[1]
        scores = judge.score(videos, {"caption": CAPTIONS})
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert all(r in choices for r in judge.last_replies), judge.last_replies

    # the oracle: each choice's log-likelihood under the model, given the prompt VLMJudgeReward sent (its frames as PIL images)
    processor, model = AutoProcessor.from_pretrained(folder), AutoModelForImageTextToText.from_pretrained(folder).eval()
    frames = to_uint8(videos[:, frame_indices(videos.shape[1], 2)])
    likelihoods = []
    for b in range(2):
        from PIL import Image

        text = judge.prompt_template.format(caption=CAPTIONS[b], num_frames=2)
        conversation = [{"role": "user", "content": [{"type": "text", "text": text}, {"type": "image"}, {"type": "image"}]}]
        prompt = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        inputs = processor(text=[prompt], images=[Image.fromarray(f) for f in frames[b]], return_tensors="pt")
        n = inputs["input_ids"].shape[1]
        lps = []
        end = processor.tokenizer.eos_token  # the reply ends the assistant's turn ("Score: 1" alone is a prefix of "Score: 10")
        for c in choices:
            ids = torch.tensor([processor.tokenizer.encode(c + end, add_special_tokens=False)])
            full = processor(text=[prompt + c + end], images=[Image.fromarray(f) for f in frames[b]], return_tensors="pt")  # tokenized together
            assert torch.equal(full["input_ids"][0, n:], ids[0]) and torch.equal(full["input_ids"][0, :n], inputs["input_ids"][0])
            assert int(ids[0, -1]) == processor.tokenizer.convert_tokens_to_ids(end)
            with torch.no_grad():
                logits = model(**full).logits
            lps.append(float(torch.log_softmax(logits[0, n - 1 : -1].float(), -1).gather(1, ids[0, :, None]).sum()))
        likelihoods.append(lps)
        served = choices.index(judge.last_replies[b])
        assert lps[served] >= max(lps) - 1e-4, (b, judge.last_replies[b], lps)  # the served reply is the most likely choice
        assert float(scores[b]) == served + 1  # and VLMJudgeReward parsed its score
    assert likelihoods[0] != likelihoods[1]  # the frames (and captions) reach the model
