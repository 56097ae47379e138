"""Issue 22 item 2: any reward callback served over HTTP with dynamic batching (RewardServer, `vidalign
serve-reward`) and scored through RemoteReward; same scores as in-process; named errors, never a zero."""
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
CAPTIONS = ["a cyclist rides along a street", "a rabbit in a meadow"]


def _videos(b=2, t=3, h=16, w=16, seed=0):
    return torch.rand(b, t, 3, h, w, generator=torch.Generator().manual_seed(seed))


class CaptionLength(RewardCallback):
    """Mean pixel + caption length / 100 (needs the captions), optionally slow."""

    def __init__(self, delay: float = 0.0):
        super().__init__(name="caplen")
        self.delay, self.n = delay, 0

    def score(self, videos, batch=None):
        caps = batch_captions(batch, videos.shape[0], "CaptionLength")
        self.n = len(caps)
        time.sleep(self.delay)
        return videos.float().mean(dim=(1, 2, 3, 4)) + torch.tensor([len(c) / 100 for c in caps])

    def score_components(self):
        return {"part": torch.arange(self.n, dtype=torch.float32)}  # one value per video of the last call


def test_served_scores_equal_in_process_scores():
    videos = _videos()
    lum = LuminanceReward()
    with RewardServer(LuminanceReward()) as server:
        exact = RemoteReward(server.url, encoding="float32").score(videos, {"caption": CAPTIONS})
        u8 = RemoteReward(server.url).score(videos, {"caption": CAPTIONS})
    want = lum.score(videos)
    torch.testing.assert_close(exact, want, rtol=0, atol=1e-6)  # float32 on the wire: the same floats
    torch.testing.assert_close(u8, lum.score((videos * 255).round() / 255), rtol=0, atol=1e-5)  # uint8: the quantised video
    cap = CaptionLength()
    with RewardServer(cap) as server:
        remote = RemoteReward(server.url, encoding="float32")
        got = remote.score(videos, {"caption": CAPTIONS, "index": torch.tensor([3, 4]), "video": videos})
        assert remote.score_components()["part"].tolist() == [0.0, 1.0]  # the served reward's parts come back
    torch.testing.assert_close(got, CaptionLength().score(videos, {"caption": CAPTIONS}), rtol=0, atol=1e-6)


def test_frame_reward_model_served_scores_equal_in_process(tmp_path):
    """A reward model that quantises frames to uint8 itself (CLIP score): uint8 on the wire loses nothing."""
    from test_reward_models import make_tiny_clip

    from lightning_vidalign.rewards import CLIPScoreReward

    folder = make_tiny_clip(str(tmp_path))
    videos = _videos(t=4, h=24, w=24)
    local = CLIPScoreReward(folder, num_frames=2).score(videos, {"caption": CAPTIONS})
    with RewardServer(CLIPScoreReward(folder, num_frames=2)) as server:
        served = RemoteReward(server.url).score(videos, {"caption": CAPTIONS})
    torch.testing.assert_close(served, local, rtol=0, atol=1e-5)


def test_concurrent_requests_are_batched_and_answered_in_their_own_order():
    cap = CaptionLength()
    videos = [_videos(b=1, seed=i) for i in range(3)] + [_videos(b=2, seed=9)]
    batches = [{"caption": [f"clip {i}"]} for i in range(3)] + [{"caption": CAPTIONS}]
    results = [None] * 4
    with RewardServer(cap, max_batch_size=8, batch_timeout=0.5) as server:
        def run(i):
            results[i] = RemoteReward(server.url, encoding="float32").score(videos[i], batches[i])

        threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sum(server.batch_sizes) == 5 and len(server.batch_sizes) < 4  # requests shared score calls
    for i in range(4):
        torch.testing.assert_close(results[i], CaptionLength().score(videos[i], batches[i]), rtol=0, atol=1e-6)
    with RewardServer(CaptionLength(), max_batch_size=2, batch_timeout=0.0) as server:
        RemoteReward(server.url).score(_videos(b=3), {"caption": ["a", "b", "c"]})  # larger than max: scored alone
        assert server.batch_sizes == [3]


def test_down_slow_refusing_and_miscounting_servers_raise_named_errors():
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
    with RewardServer(CaptionLength()) as server:  # a port in use: named, with the option to change
        with pytest.raises(RemoteRewardError, match=rf"cannot listen on 127.0.0.1:{server.port}: .*choose another --port"):
            RewardServer(CaptionLength(), port=server.port)
    with RewardServer(CaptionLength(delay=1.0)) as server:
        with pytest.raises(RemoteRewardError, match=r"failed 2 times.*timeout"):
            RemoteReward(server.url, timeout=0.2, max_retries=1, retry_backoff=0.01).score(videos, batch)
    with RewardServer(CaptionLength()) as server:  # the reward's own error, named, no retry
        with pytest.raises(RemoteRewardError, match=r"HTTP 422.*KeyError.*captions"):
            RemoteReward(server.url).score(videos, {"index": [0, 1]})

    class OneScore(http.server.BaseHTTPRequestHandler):
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


def test_vidalign_serve_reward_command_serves_a_reward_class():
    exe = os.path.join(os.path.dirname(sys.executable), "vidalign")
    proc = subprocess.Popen([exe, "serve-reward", "--reward", "lightning_vidalign.rewards.LuminanceReward", "--reward.scale", "2.0",
                             "--port", "0", "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving LuminanceReward [luminance] on http://127.0.0.1:"), (line, proc.stderr.read() if proc.poll() is not None else "")
        url = line.split(" on ")[1].strip()
        videos = _videos()
        got = RemoteReward(url, encoding="float32").score(videos, {"caption": CAPTIONS})
        torch.testing.assert_close(got, LuminanceReward(scale=2.0).score(videos), rtol=0, atol=1e-6)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
