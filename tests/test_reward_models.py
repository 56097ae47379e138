"""Issue 22: reward models (CLIP score, PickScore, HPS, VideoAlign, VLM judge) on tiny random-weight instances
saved by the tests, and the captions that reach every reward through the batch."""
import os

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from lightning_vidalign.backbones import WanBackbone
from lightning_vidalign.rewards import RewardCallback, batch_captions, repeat_batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------- captions reach the rewards
class CaptionRecorder(RewardCallback):
    """Records the captions each ``score`` call gets; the reward is a fixed function of the video."""

    def __init__(self):
        super().__init__(name="recorder")
        self.calls = []

    def score(self, videos, batch=None):
        caps = batch_captions(batch, videos.shape[0], "CaptionRecorder")
        self.calls.append(caps)
        return videos.float().mean(dim=(1, 2, 3, 4)) * 10


def test_repeat_batch_and_batch_captions():
    b = {"video": torch.zeros(2, 3), "caption": ["a", "b"], "index": torch.tensor([4, 5]), "first_frame": torch.arange(2).view(2, 1), "fps": 8}
    r = repeat_batch(b, 3)
    assert "video" not in r and r["fps"] == 8
    assert r["caption"] == ["a", "a", "a", "b", "b", "b"] and r["index"].tolist() == [4, 4, 4, 5, 5, 5]
    assert r["first_frame"].view(-1).tolist() == [0, 0, 0, 1, 1, 1]
    assert batch_captions(r, 6, "x") == r["caption"]
    with pytest.raises(KeyError, match="captions"):
        batch_captions({"video": 1}, 2, "x")
    with pytest.raises(KeyError, match="no batch"):
        batch_captions(None, 2, "x")
    with pytest.raises(ValueError, match="must hold 3 strings"):
        batch_captions({"caption": ["a", "b"]}, 3, "x")


def _captions_file():
    import json

    return {json.loads(line)["caption"] for line in open(os.path.join(ROOT, "configs", "data", "skvideo_captions.jsonl")) if line.strip()}


@pytest.mark.parametrize("algo", ["grpo", "bpgo", "shift", "dpo"])
def test_algorithms_pass_each_rollouts_caption_to_the_rewards(tmp_path, wan_datamodule, algo):
    """GRPO, BPGO's prior rollouts, SHIFT and on-policy DPO score B·G rollouts: the reward gets the batch
    repeated per rollout (each caption G times in a row, the rollouts' order)."""
    from lightning_vidalign.algorithms import BPGO, DPO, GRPO, SHIFT

    common = dict(backbone=WanBackbone(lora_rank=4, lora_alpha=4), num_inference_steps=2, rollouts_per_condition=2, val_num_videos=0,
                  optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    if algo == "grpo":
        m = GRPO(sampler="ode", sde_type="flow_grpo", kl_type="none", **common)
    elif algo == "bpgo":
        m = BPGO(sampler="ode", sde_type="flow_grpo", kl_type="none", prior_rollouts=2, **common)
    elif algo == "shift":
        m = SHIFT(sampler="sage", passes=1, **common)
    else:
        m = DPO(pair_source="on_policy", sampler="ode", pair_margin=0.0, **common)
    rec = CaptionRecorder()
    trainer = L.Trainer(max_steps=1, accelerator="cpu", devices=1, logger=CSVLogger(str(tmp_path)), enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[rec], default_root_dir=str(tmp_path))
    trainer.fit(m, datamodule=wan_datamodule)
    known = _captions_file()
    assert rec.calls, "the reward was never called"
    for caps in rec.calls:
        g = 2
        assert len(caps) % g == 0 and all(c in known for c in caps)
        assert all(caps[i] == caps[i + j] for i in range(0, len(caps), g) for j in range(g))
    rollouts = [c for c in rec.calls if len(c) == 4]  # the B·G = 2·2 training rollouts
    assert rollouts and len(set(rollouts[0])) == 2  # the batch's two clips, each G times
