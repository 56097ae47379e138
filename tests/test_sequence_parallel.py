"""Ulysses sequence parallelism through diffusers' context parallelism (lightning_vidalign/sequence_parallel.py):
SP = 2 vs SP = 1 on the tiny Wan with 2 gloo CPU processes, alone, with activation checkpointing and with FSDP2 on
top (SFT, GRPO and DPO-decoupled gradients); in training through ``vidalign fit`` (``sequence_parallel_size``):
SP 2 + FSDP2 + activation checkpointing vs one process for a GRPO step, a DPO run and its resume; the layout and
the refusals."""
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch


def test_sequence_parallel_two_processes_match_one(tmp_path):
    job = os.path.join(os.path.dirname(__file__), "sequence_parallel_job.py")
    out = subprocess.run([sys.executable, job, str(tmp_path), "2"], capture_output=True, text=True, timeout=600, cwd=str(tmp_path),
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-4000:]
    for rank in (0, 1):
        r = torch.load(tmp_path / f"rank{rank}.pt")
        loss_ref, loss_sp = r["loss"]
        rel = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(*reversed(r["grads"])))
        lat = float((r["latents"][0] - r["latents"][1]).abs().max())
        lp = float((r["log_prob"][0] - r["log_prob"][1]).abs().max())
        print(f"rank {rank}: loss SP1 {loss_ref.tolist()} SP2 {loss_sp.tolist()}; max rel LoRA grad diff {rel:.2e}; rollout latents max diff {lat:.2e}, log-prob {lp:.2e}")
        torch.testing.assert_close(loss_sp, loss_ref, rtol=1e-6, atol=1e-7)
        assert rel <= 1e-5
        assert lat <= 1e-5 and lp <= 1e-5
        ac = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(r["grads_ac"], r["grads"][0]))
        print(f"rank {rank}: SP2 + activation checkpointing: max rel LoRA grad diff to SP1 {ac:.2e}")
        torch.testing.assert_close(r["loss_ac"], loss_ref, rtol=1e-6, atol=1e-7)
        assert ac <= 1e-5
        for k, ref in [("sft", r["grads"][0]), ("grpo", r["steps_ref"]["grpo"]), ("dpo", r["steps_ref"]["dpo"])]:
            d = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(r["fsdp"][k], ref))
            print(f"rank {rank}: SP2 + FSDP2 + checkpointing, {k}: max rel LoRA grad diff to SP1 {d:.2e}")
            # DPO's gradient is a small difference of winner and loser terms ~50x larger (tests/test_dpo.py), so fp32
            # rounding of the terms (~1.5e-6 here) shows ~50x larger relative to the result; any η or scale error is O(1)
            assert d <= (1e-3 if k == "dpo" else 1e-5), k


def test_sequence_parallel_refuses_a_model_without_a_plan():
    from diffusers import HunyuanVideo15Transformer3DModel

    from lightning_vidalign.sequence_parallel import enable_sequence_parallel

    with torch.device("meta"):
        m = HunyuanVideo15Transformer3DModel(num_layers=1, num_refiner_layers=1)
    with pytest.raises(ValueError, match="no diffusers context-parallel plan"):
        enable_sequence_parallel(m, 2)


# ------------------------------------------------------------------ layout and refusals (one process, fast)
def test_layout_and_divisibility_errors_name_the_setting():
    from lightning_vidalign.sequence_parallel import check_divisible, data_parallel_layout

    assert data_parallel_layout(8, 2) == 4 and data_parallel_layout(2, 2) == 1 and data_parallel_layout(3, 1) == 3
    with pytest.raises(ValueError, match=r"sequence_parallel_size=3 does not divide the world size 2 .*sequence_parallel_size"):
        data_parallel_layout(2, 3)
    with pytest.raises(ValueError, match="must be >= 1"):
        data_parallel_layout(2, 0)
    check_divisible("attention heads", 4, 2)
    with pytest.raises(ValueError, match=r"sequence_parallel_size=3 must divide the number of attention heads, 4"):
        check_divisible("attention heads", 4, 3)


def test_backbones_refuse_what_sequence_parallelism_cannot_split():
    """No context-parallel plan (SVD UNet, HunyuanVideo 1.5 in diffusers 0.42); Wan heads or tokens not divisible:
    refused before any collective, naming the setting and the value."""
    from lightning_vidalign.backbones import HunyuanVideo15Backbone, SVDBackbone, WanBackbone

    for bb, denoiser in [(SVDBackbone(lora_rank=2), "UNetSpatioTemporalConditionModel"), (HunyuanVideo15Backbone(lora_rank=2), "HunyuanVideo15Transformer3DModel")]:
        with pytest.raises(ValueError, match=rf"sequence_parallel_size=2: {type(bb).__name__}'s denoiser {denoiser} has no diffusers context-parallel plan"):
            bb.enable_sequence_parallel(2)
    wan = WanBackbone(lora_rank=2)  # 4 heads
    with pytest.raises(ValueError, match=r"sequence_parallel_size=3 must divide the number of attention heads of WanTransformer3DModel \(num_attention_heads\), 4"):
        wan.enable_sequence_parallel(3)
    assert wan.sequence_parallel_size == 1
    wan.sequence_parallel_size = 2  # (as enable_sequence_parallel leaves it; the check runs before the model call)
    cond = {"prompt_embeds": torch.zeros(1, 32, 384), "negative_prompt_embeds": torch.zeros(1, 32, 384), "image_latents": torch.zeros(1, 1)}
    with pytest.raises(ValueError, match=r"sequence_parallel_size=2 must divide the clip's 75 tokens .*data.num_frames"):
        wan.predict(torch.zeros(1, 3, 8, 10, 10), torch.tensor([0.5]), cond)  # 3 latent frames x 5 x 5 patches


def test_module_refuses_a_size_that_does_not_divide_the_world():
    import lightning as L
    from torch.utils.data import DataLoader

    from lightning_vidalign.algorithms import SFT
    from lightning_vidalign.backbones import WanBackbone

    with pytest.raises(ValueError, match="sequence_parallel_size must be >= 1"):
        SFT(WanBackbone(lora_rank=2), sequence_parallel_size=0)
    module = SFT(WanBackbone(lora_rank=2), sequence_parallel_size=2, val_num_videos=0, val_frechet=False)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match=r"sequence_parallel_size=2 does not divide the world size 1"):
        trainer.fit(module, train_dataloaders=DataLoader([0]))


def test_data_is_sharded_over_data_parallel_ranks():
    """World 4 = 2 data-parallel x 2 sequence-parallel: ranks 2 and 3 form group 1 and get its shard, training and
    validation alike."""
    from torch.utils.data import DistributedSampler

    from lightning_vidalign.datamodules import VideoClipDataModule
    from lightning_vidalign.datamodules.video import EpochSeededSampler

    shards = {}
    for rank in range(4):
        dm = VideoClipDataModule(batch_size=2)
        dm.trainer = SimpleNamespace(world_size=4, global_rank=rank, lightning_module=SimpleNamespace(sequence_parallel_size=2))
        assert dm._replicas() == (2, rank // 2)
        train, val = dm._loader(list(range(10)), shuffle=True, drop_last=True), dm._loader(list(range(10)), shuffle=False, drop_last=False)
        assert isinstance(train.sampler, EpochSeededSampler) and isinstance(val.sampler, DistributedSampler)
        shards[rank] = (list(train.sampler), list(val.sampler))
    assert shards[0] == shards[1] and shards[2] == shards[3] and not set(shards[0][0]) & set(shards[2][0])
    assert sorted(shards[0][1] + shards[2][1]) == list(range(10))
    dm = VideoClipDataModule(batch_size=2)
    dm.trainer = SimpleNamespace(world_size=2, global_rank=1, lightning_module=SimpleNamespace(sequence_parallel_size=1))
    assert dm._replicas() == (2, 1) and dm._loader(list(range(4)), shuffle=False, drop_last=False).sampler.__class__.__name__ == "SequentialSampler"
