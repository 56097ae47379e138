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


@pytest.mark.slow  # ~35 s (default-suite time; the Wan equality tests stay in it)
def test_hunyuan_video15_sequence_parallel_matches_one_process(tmp_path):
    """Our context-parallel plan for HunyuanVideo 1.5 (video and text tokens split, key mask; diffusers 0.42 has none):
    SP 2 vs one process on the tiny model, t2v (777 text tokens: one masked token padded) and i2v — the same losses,
    LoRA gradients summed over the group, SDE rollouts with CFG, also with activation checkpointing."""
    job = os.path.join(os.path.dirname(__file__), "sequence_parallel_hv15_job.py")
    out = subprocess.run([sys.executable, job, str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=str(tmp_path),
                         env={**os.environ, "OMP_NUM_THREADS": "1", "SP_PORT": str(_cli()._free_port())})
    assert out.returncode == 0, out.stderr[-4000:]
    for rank in (0, 1):
        for mode, r in torch.load(tmp_path / f"rank{rank}.pt").items():
            (loss_ref, loss_sp, loss_ac), (g_ref, g_sp, g_ac) = r["loss"], r["grads"]
            rel = [max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(g, g_ref)) for g in (g_sp, g_ac)]
            lat, lp = float((r["latents"][0] - r["latents"][1]).abs().max()), float((r["log_prob"][0] - r["log_prob"][1]).abs().max())
            print(f"rank {rank} {mode}: loss SP1 {loss_ref.tolist()} SP2 {loss_sp.tolist()}; LoRA grad max rel diff {rel[0]:.2e} "
                  f"(+ checkpointing {rel[1]:.2e}); rollout latents max diff {lat:.2e}, log-prob {lp:.2e}")
            torch.testing.assert_close(loss_sp, loss_ref, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(loss_ac, loss_ref, rtol=1e-6, atol=1e-6)
            assert max(rel) <= 1e-5 and lat <= 1e-5 and lp <= 1e-5


def test_sequence_parallel_refuses_a_model_without_a_plan():
    from diffusers import HunyuanVideo15Transformer3DModel

    from lightning_vidalign.sequence_parallel import enable_sequence_parallel

    with torch.device("meta"):
        m = HunyuanVideo15Transformer3DModel(num_layers=1, num_refiner_layers=1)
    with pytest.raises(ValueError, match="no diffusers context-parallel plan"):  # (the class has none: HunyuanVideo15Backbone supplies ours)
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
    """No context-parallel plan (the SVD UNet); Wan / HunyuanVideo 1.5 heads or tokens not divisible: refused before
    any collective, naming the setting and the value."""
    from lightning_vidalign.backbones import HunyuanVideo15Backbone, SVDBackbone, WanBackbone

    with pytest.raises(ValueError, match=r"sequence_parallel_size=2: SVDBackbone's denoiser UNetSpatioTemporalConditionModel has no diffusers context-parallel plan"):
        SVDBackbone(lora_rank=2).enable_sequence_parallel(2)
    hy = HunyuanVideo15Backbone(lora_rank=2)  # 4 heads
    with pytest.raises(ValueError, match=r"sequence_parallel_size=3 must divide the number of attention heads of HunyuanVideo15Transformer3DModel"):
        hy.enable_sequence_parallel(3)
    hy.sequence_parallel_size = 2
    hy_cond = hy.encode_condition({"caption": ["a car"]})
    with pytest.raises(ValueError, match=r"sequence_parallel_size=2 must divide the clip's 75 tokens"):
        hy.predict(torch.zeros(1, 3, 8, 5, 5), torch.tensor([0.5]), hy_cond)
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


# ------------------------------------------------------------- training through the CLI (2 gloo CPU processes)
def _cli():
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import test_launch

    return test_launch


def _fit(args: list[str], devices: int, run_dir, cwd, sp: int = 1, strategy: str = "fsdp2"):
    """``vidalign fit`` as a user runs it: the method config, then (SP) the strategy fragment, sequence parallelism and
    activation checkpointing; both ranks dump their first step and adapters under ``run_dir/dump``."""
    launch = _cli()
    cmd = [launch.VIDALIGN, "fit", *args]
    if sp > 1:
        cmd += ["--config", f"{launch.ROOT}/configs/strategies/{strategy}.yaml", "--model.init_args.sequence_parallel_size", str(sp),
                "--model.init_args.backbone.init_args.activation_checkpointing", "true"]
    cmd += ["--trainer.accelerator", "cpu", "--trainer.devices", str(devices), "--trainer.default_root_dir", str(run_dir), *launch.FAST,
            "--data.init_args.captions", f"{launch.ROOT}/configs/data/skvideo_captions.jsonl",
            "--trainer.callbacks+=rehearsal_callbacks.DumpFirstStep", "--trainer.callbacks.out", str(run_dir / "dump"),
            "--trainer.callbacks+=rehearsal_callbacks.DumpAdapters", "--trainer.callbacks.out", str(run_dir / "dump")]
    out = subprocess.run(cmd, cwd=cwd, env=launch._env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    return out.stdout + out.stderr


def _rel(a: dict, b: dict) -> float:
    """max over tensors of max|a - b| / max|b| (tensors that are 0 in b: absolute)."""
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp(min=1e-30)) if b[k].abs().max() > 0 else float((a[k] - b[k]).abs().max()) for k in b)


@pytest.mark.parametrize("strategy", ["fsdp2", pytest.param("ddp", marks=pytest.mark.slow)])
def test_grpo_step_sequence_parallel_fsdp2_checkpointing_matches_one_process(tmp_path, strategy):
    """Flow-GRPO on the Wan demo base (configs/recipes/flow_grpo.yaml: its luminance reward is linear in the pixels, so
    rollouts equal to rounding give rewards equal to rounding; a uint8-quantised reward could flip), one round with one
    optimizer step: one process (SP 1) vs 2 processes as one sequence-parallel group (SP 2, FSDP2 over both or DDP,
    activation checkpointing). Same rollouts, loss, reduced LoRA gradient and LoRA after the step; the LoRA file is written."""
    launch = _cli()
    args = ["--config", f"{launch.ROOT}/configs/recipes/flow_grpo.yaml", "--trainer.max_steps", "1", "--model.init_args.heldout_conditions", "0",
            "--model.init_args.minibatches_per_round", "1", "--model.init_args.grad_clip", "0",
            # SGD: the step is linear in the gradient; Adam's first step is ~lr·sign(g), which turns the rounding of
            # near-zero gradient elements into lr-sized differences (2.5e-3 of a tensor's largest value here)
            "--model.init_args.optimizer", "torch.optim.SGD", "--model.init_args.optimizer.init_args.lr", "0.1"]
    _fit(args, 1, tmp_path / "sp1", tmp_path)
    console = _fit(args, 2, tmp_path / "sp2", tmp_path, sp=2, strategy=strategy)
    assert "returned a view tensor" not in console and "all_gather_tensor" not in console  # quiet console
    ref = torch.load(tmp_path / "sp1" / "dump" / "first_step_rank0.pt")
    ref_lora = torch.load(tmp_path / "sp1" / "dump" / "rank0.pt")["lora"]
    for rank in (0, 1):
        got = torch.load(tmp_path / "sp2" / "dump" / f"first_step_rank{rank}.pt")
        lora = torch.load(tmp_path / "sp2" / "dump" / f"rank{rank}.pt")
        assert got["world_size"] == 2 and lora["sharded"] == (strategy == "fsdp2") and torch.equal(got["index"], ref["index"])  # the same clips
        video = float((got["videos"] - ref["videos"]).abs().max())
        grad, after = _rel(got["grads"], ref["grads"]), _rel(lora["lora"], ref_lora)
        # the loss at ratio 1 is mean(-A·ρ) + β·KL with Σ A = 0 over each group: O(1) terms that cancel, its value
        # (~1.7e-5) is the rounding of the ratios ρ = exp(log π - log π_old) and the KL; compared on the terms' scale
        loss = abs(got["loss"] - ref["loss"])
        print(f"rank {rank}: rollouts max |diff| {video:.2e}; loss {got['loss']:.6e} vs {ref['loss']:.6e} (|diff| {loss:.1e}); "
              f"LoRA gradient max rel diff {grad:.2e}; LoRA after the step {after:.2e}")
        assert video <= 1e-5 and loss <= 1e-6 and grad <= 1e-5 and after <= 1e-5
        assert got["metrics"]["reward/total/mean"] == pytest.approx(ref["metrics"]["reward/total/mean"], rel=1e-6)
        assert any(float(g.abs().max()) > 0 for g in got["grads"].values())
    assert (tmp_path / "sp2" / "lora" / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.slow  # 4 + 2 processes on 2 shared cores (~3 min)
def test_data_by_sequence_mesh_matches_data_parallel_alone(tmp_path):
    """World 4 = data 2 x sequence 2 (FSDP2 over all four) vs world 2 = data 2 (FSDP2): ranks 2d and 2d + 1 get data
    rank d's clips and rollouts, the advantages come from each group's rewards once (a duplicated group would change
    the group statistics), and the reduced LoRA gradient and the SGD step equal the data-parallel run's."""
    launch = _cli()
    args = ["--config", f"{launch.ROOT}/configs/recipes/flow_grpo.yaml", "--trainer.max_steps", "1", "--model.init_args.heldout_conditions", "0",
            "--model.init_args.minibatches_per_round", "1", "--model.init_args.grad_clip", "0",
            "--model.init_args.optimizer", "torch.optim.SGD", "--model.init_args.optimizer.init_args.lr", "0.1"]
    _fit([*args, "--config", f"{launch.ROOT}/configs/strategies/fsdp2.yaml"], 2, tmp_path / "dp2", tmp_path)
    _fit(args, 4, tmp_path / "dp2sp2", tmp_path, sp=2)
    for rank in range(4):
        ref = torch.load(tmp_path / "dp2" / "dump" / f"first_step_rank{rank // 2}.pt")
        ref_lora = torch.load(tmp_path / "dp2" / "dump" / f"rank{rank // 2}.pt")["lora"]
        got = torch.load(tmp_path / "dp2sp2" / "dump" / f"first_step_rank{rank}.pt")
        lora = torch.load(tmp_path / "dp2sp2" / "dump" / f"rank{rank}.pt")["lora"]
        video, grad, after = float((got["videos"] - ref["videos"]).abs().max()), _rel(got["grads"], ref["grads"]), _rel(lora, ref_lora)
        print(f"rank {rank} (data rank {rank // 2}): clips {got['index'].tolist()}; rollouts max |diff| {video:.2e}; "
              f"LoRA gradient max rel diff {grad:.2e}; LoRA after the step {after:.2e}")
        assert torch.equal(got["index"], ref["index"]) and video <= 1e-5 and grad <= 1e-5 and after <= 1e-5
    assert not torch.equal(torch.load(tmp_path / "dp2" / "dump" / "first_step_rank0.pt")["index"], torch.load(tmp_path / "dp2" / "dump" / "first_step_rank1.pt")["index"])


@pytest.mark.slow  # ~50 s (default-suite time; the GRPO step under SP + FSDP2 + checkpointing stays in it)
def test_dpo_sequence_parallel_fsdp2_checkpointing_runs_and_resumes(tmp_path):
    """configs/dpo_wan.yaml (on-policy pairs, decoupled backward) under SP 2 + FSDP2 + activation checkpointing: a
    1-step run ends (rc 0) with identical adapters on both ranks and the LoRA file written; the run resumes from its
    last.ckpt (whose identity records the sequence-parallel size) to step 2."""
    launch = _cli()
    args = ["--config", f"{launch.ROOT}/configs/dpo_wan.yaml"]  # (last.ckpt written at the end of training)
    _fit([*args, "--trainer.max_steps", "1"], 2, tmp_path / "run", tmp_path, sp=2)
    a, b = (torch.load(tmp_path / "run" / "dump" / f"rank{r}.pt") for r in (0, 1))
    assert a["batches"] == 1 and a["sharded"] and all(torch.equal(a["lora"][k], b["lora"][k]) for k in a["lora"])
    assert (tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=False)["vidalign"]["identity"]["sequence_parallel_size"] == 2
    _fit([*args, "--trainer.max_steps", "2", "--ckpt_path", str(ckpt)], 2, tmp_path / "run", tmp_path, sp=2)
    c, d = (torch.load(tmp_path / "run" / "dump" / f"rank{r}.pt") for r in (0, 1))
    assert c["batches"] == d["batches"] == 2 and c["global_step"] == 2
    assert all(torch.equal(c["lora"][k], d["lora"][k]) for k in c["lora"]) and any(not torch.equal(c["lora"][k], a["lora"][k]) for k in a["lora"])


@pytest.mark.slow  # 3 launches of 2 processes (~2.5 min)
def test_sequence_parallel_resume_continues_exactly(tmp_path):
    """Flow-GRPO (2 optimizer steps per round) under SP 2 + FSDP2 + checkpointing: 1 round, then a resume from its
    last.ckpt to round 2, gives the adapters of an uninterrupted 2-round run bitwise (same clips, generators keyed by
    the data-parallel rank and batch, optimizer state)."""
    launch = _cli()
    args = ["--config", f"{launch.ROOT}/configs/recipes/flow_grpo.yaml", "--model.init_args.heldout_conditions", "0"]
    _fit([*args, "--trainer.max_steps", "2"], 2, tmp_path / "full", tmp_path, sp=2)
    _fit([*args, "--trainer.max_steps", "1"], 2, tmp_path / "split", tmp_path, sp=2)
    _fit([*args, "--trainer.max_steps", "2", "--ckpt_path", str(tmp_path / "split" / "checkpoints" / "last.ckpt")], 2, tmp_path / "split", tmp_path, sp=2)
    for rank in (0, 1):
        a, b = (torch.load(tmp_path / run / "dump" / f"rank{rank}.pt") for run in ("full", "split"))
        assert a["batches"] == b["batches"] == 2 and all(torch.equal(a["lora"][k], b["lora"][k]) for k in a["lora"])


@pytest.mark.slow  # ~1 min
def test_hunyuan_video15_grpo_under_sequence_parallel_fsdp2_runs(tmp_path):
    """configs/flow_grpo.yaml with the tiny HunyuanVideo 1.5 (t2v) in place of the Wan demo base, under SP 2 + FSDP2 +
    activation checkpointing: one round runs to the end, both ranks hold the same adapters, the LoRA file is written."""
    launch = _cli()
    _fit(["--config", f"{launch.ROOT}/configs/flow_grpo.yaml", "--model.init_args.backbone", "lightning_vidalign.backbones.HunyuanVideo15Backbone",
          "--model.init_args.backbone.init_args.mode", "t2v", "--model.init_args.backbone.init_args.pretrained_path", "tiny",
          "--model.init_args.num_inference_steps", "4", "--model.init_args.rollouts_per_condition", "2", "--trainer.max_steps", "1"],
         2, tmp_path / "run", tmp_path, sp=2)
    a, b = (torch.load(tmp_path / "run" / "dump" / f"rank{r}.pt") for r in (0, 1))
    assert a["batches"] == 1 and a["sharded"] and all(torch.equal(a["lora"][k], b["lora"][k]) for k in a["lora"])
    assert any(v.abs().sum() > 0 for k, v in a["lora"].items() if "lora_B" in k)
    assert (tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.slow  # ~45 s
def test_docs_sequence_parallel_command_runs_as_written(tmp_path):
    """The command of docs/scale.md (configs/flow_grpo.yaml: Wan demo base, motion and flicker rewards; FSDP2; SP 2), run from
    the repository root for 1 round with CPU and a run folder of its own: it ends, both ranks equal, LoRA written."""
    import re

    launch = _cli()
    page = open(os.path.join(launch.ROOT, "docs", "scale.md")).read()
    command = re.search(r"`(vidalign fit --config configs/flow_grpo\.yaml[^`]*sequence_parallel_size 2)`", page).group(1).split()
    out = subprocess.run([launch.VIDALIGN, *command[1:], "--trainer.accelerator", "cpu", "--trainer.max_steps", "1", "--trainer.default_root_dir", str(tmp_path / "run"),
                          *launch.FAST, "--trainer.callbacks+=rehearsal_callbacks.DumpAdapters", "--trainer.callbacks.out", str(tmp_path / "dump")],
                         cwd=launch.ROOT, env=launch._env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    a, b = (torch.load(tmp_path / "dump" / f"rank{r}.pt") for r in (0, 1))
    assert a["world_size"] == 2 and a["batches"] == 1 and a["sharded"] and all(torch.equal(a["lora"][k], b["lora"][k]) for k in a["lora"])
    assert (tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors").is_file()
