"""Issue 22 item 3: rewards scored chunk by chunk in a background thread while the next chunk of rollouts is
generated (overlap_rewards): same rewards and updates as scoring after the last rollout, in rollout order,
errors surfaced in the training thread, bitwise resumable."""
import threading
import time

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from lightning_vidalign.backbones import WanBackbone
from lightning_vidalign.rewards import LuminanceReward, RewardCallback, batch_captions


class CaptionedLuma(RewardCallback):
    """Luma plus a caption-dependent offset (needs each rollout's caption); records the calls' captions,
    threads and times."""

    def __init__(self, delay: float = 0.0, fail: bool = False):
        super().__init__(name="captioned")
        self.delay, self.fail, self.calls = delay, fail, []

    def score(self, videos, batch=None):
        caps = batch_captions(batch, videos.shape[0], "CaptionedLuma")
        self.calls.append((time.perf_counter(), threading.current_thread().name, list(caps)))
        if self.fail:
            raise ValueError("CaptionedLuma: broken on purpose")
        time.sleep(self.delay)
        return videos.float().mean(dim=(1, 2, 3, 4)) + torch.tensor([len(c) % 7 / 100 for c in caps])

    def score_components(self):
        return {"offset": torch.tensor([0.5])}


def _module(algo, overlap, **kw):
    from lightning_vidalign.algorithms import DPO, GRPO, SHIFT

    common = dict(backbone=WanBackbone(lora_rank=4, lora_alpha=4), num_inference_steps=2, rollouts_per_condition=2, val_num_videos=0,
                  optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2), overlap_rewards=overlap, rollout_batch_size=2)
    common.update(kw)
    if algo == "grpo":
        return GRPO(sampler="ode", sde_type="flow_grpo", kl_type="none", **common)
    if algo == "shift":
        return SHIFT(sampler="sage", passes=1, **common)
    return DPO(pair_source="on_policy", sampler="ode", pair_margin=0.0, beta=500.0, **common)


def _fit(tmp_path, module, rewards, steps=2, ckpt_path=None, callbacks=()):
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=CSVLogger(str(tmp_path)), enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[*rewards, *callbacks], default_root_dir=str(tmp_path))
    trainer.fit(module, datamodule=_fit.dm, ckpt_path=ckpt_path)
    return trainer


@pytest.fixture(autouse=True)
def _dm(wan_datamodule):
    _fit.dm = wan_datamodule


@pytest.mark.parametrize("algo", ["grpo", "shift", "dpo"])
def test_overlapped_scoring_trains_exactly_as_serial_scoring(tmp_path, algo):
    runs = {}
    for overlap in (False, True):
        rec = CaptionedLuma()
        m = _module(algo, overlap)
        trainer = _fit(tmp_path / str(overlap), m, [rec, LuminanceReward(weight=0.5)])
        runs[overlap] = (m.backbone.trainable_state_dict(), rec.calls, trainer.callback_metrics)
    (serial, serial_calls, _), (over, over_calls, metrics) = runs[False], runs[True]
    for k, v in serial.items():
        assert torch.equal(v, over[k]), k  # same rewards, advantages and updates, bit for bit
    # one call per chunk of rollout_batch_size = 2 either way (values never depend on overlap): serial in the training
    # thread after the round's rollouts, overlapped in the scoring thread
    assert serial_calls and [len(c) for _, _, c in serial_calls] == [len(c) for _, _, c in over_calls] == [2] * len(over_calls)
    assert all(name == "MainThread" for _, name, _ in serial_calls) and all(name.startswith("vidalign-reward") for _, name, _ in over_calls)
    assert [c for _, _, cs in over_calls for c in cs] == [c for _, _, cs in serial_calls for c in cs]  # rollout order kept
    if algo != "dpo":
        assert float(metrics["reward/captioned/offset"]) == 0.5


def test_the_next_chunk_is_generated_while_the_previous_one_is_scored(tmp_path):
    rec = CaptionedLuma(delay=0.4)
    m = _module("grpo", True)
    ends = []
    rollout = m.backbone.rollout

    def slow_rollout(*args, **kwargs):
        time.sleep(0.4)
        out = rollout(*args, **kwargs)
        ends.append(time.perf_counter())
        return out

    m.backbone.rollout = slow_rollout
    _fit(tmp_path, m, [rec], steps=1)
    assert len(ends) == 2 and len(rec.calls) == 2
    assert rec.calls[0][0] < ends[1]  # chunk 0 was being scored before chunk 1 was generated


def test_a_reward_error_in_the_scoring_thread_stops_the_step(tmp_path):
    with pytest.raises(ValueError, match="broken on purpose"):
        _fit(tmp_path, _module("grpo", True), [CaptionedLuma(fail=True)], steps=1)


def test_overlapped_run_resumes_bitwise(tmp_path):
    full = _module("grpo", True)
    _fit(tmp_path / "full", full, [CaptionedLuma()], steps=3)
    first = _module("grpo", True)
    _fit(tmp_path / "part", first, [CaptionedLuma()], steps=2,
         callbacks=[ModelCheckpoint(dirpath=str(tmp_path / "ck"), save_last=True, every_n_train_steps=2, save_top_k=0)])
    resumed = _module("grpo", True)
    _fit(tmp_path / "res", resumed, [CaptionedLuma()], steps=3, ckpt_path=str(tmp_path / "ck" / "last.ckpt"))
    for k, v in full.backbone.trainable_state_dict().items():
        assert torch.equal(v, resumed.backbone.trainable_state_dict()[k]), k
