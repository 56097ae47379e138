"""One algorithm under a multi-process strategy on 2 CPU processes (gloo); each rank dumps its full
adapter weights and logged metrics. Run by tests/test_distributed.py as
``python strategy_job.py STRATEGY ALGORITHM OUT_DIR`` with STRATEGY ``ddp | fsdp2 | fsdp2_bf16 | fsdp2_ac`` (``_ac``: FSDP2 with
the backbone's activation checkpointing) and
ALGORITHM ``sft | shift | grpo | grpo_experts | dpo | bpgo | diffusion_nft | awm | mix_grpo | grpo_guard | flow_dppo``.

The GRPO and BPGO jobs are compared across strategies (FSDP2 vs DDP) over several rounds, so their reward
must be smooth in the video: after the first update the two adapters differ by fp32 reduction order
(~1e-7), the next rollouts by ~1e-6, and a reward computed on uint8-quantised frames (the DIS-flow motion
reward, any OpenCV metric) turns that into a different reward and advantage, which the later rounds
amplify (issue 19: 2.8e-3 apart on one machine, within 1e-4 on another). The raw temporal-flicker
reward ``-mean|I_{t+1} - I_t|`` on the float frames is Lipschitz in the pixels, so equal-up-to-rounding
rollouts give equal-up-to-rounding rewards and the tight tolerance stays meaningful."""
import os
import sys

import lightning_vidalign  # noqa: F401  (torchvision shim first)
import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy

from lightning_vidalign.algorithms import BPGO, DPO, SAGEGRPO, SFT, SHIFT
from lightning_vidalign.backbones import SVDBackbone, WanBackbone
from lightning_vidalign.datamodules import VideoClipDataModule
from lightning_vidalign.rewards import FlickerReward, IMRReward
from lightning_vidalign.strategies import FSDP2Strategy

CAPTIONS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "data", "skvideo_captions.jsonl")


class Dump(L.Callback):
    def __init__(self, out):
        self.out = out

    def on_fit_end(self, trainer, pl_module):
        lora = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in pl_module.backbone.trainable_state_dict().items()}
        sharded = any(hasattr(p, "full_tensor") for p in pl_module.backbone.parameters())
        torch.save({"lora": lora, "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()}, "sharded": sharded},
                   f"{self.out}/rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    strategy_name, algo, out = sys.argv[1:4]
    opt = lambda p: torch.optim.AdamW(p, lr=5e-3)  # noqa: E731
    callbacks = [Dump(out)]
    bf16 = {"fsdp_param_dtype": "bfloat16"} if strategy_name == "fsdp2_bf16" else {}
    if algo == "sft":
        dm = VideoClipDataModule(batch_size=2, shot_detector="histogram")
        module = SFT(SVDBackbone(lora_rank=4, lora_alpha=4), optimizer=opt, val_num_videos=0, **bf16)
    elif algo == "shift":
        dm = VideoClipDataModule(batch_size=2, shot_detector="histogram")
        module = SHIFT(SVDBackbone(lora_rank=4, lora_alpha=4), optimizer=opt, rollouts_per_condition=2, passes=2, num_inference_steps=3,
                       val_num_videos=0, sampler="euler_ancestral")
        callbacks.append(IMRReward(seed=0))
    elif algo == "dpo":
        dm = VideoClipDataModule(batch_size=2, shot_detector="histogram")
        # SGD: the DPO gradient is a small difference of large terms; Adam would turn its fp32 rounding
        # noise into lr-sized updates and hide whether two strategies compute the same gradient
        module = DPO(SVDBackbone(lora_rank=4, lora_alpha=4), optimizer=lambda p: torch.optim.SGD(p, lr=0.5), beta=500.0, val_num_videos=0)
    elif algo == "bpgo":
        dm = VideoClipDataModule(batch_size=2, num_frames=9, fps=8, shot_detector="histogram", captions=CAPTIONS)
        module = BPGO(backbone=WanBackbone(lora_rank=4, lora_alpha=4), optimizer=opt, sampler="ode", num_inference_steps=3,
                      rollouts_per_condition=2, prior_rollouts=1, val_num_videos=0, crt_shift=2.0)  # raw flicker in [-1, 0]: shift >= p_max - 2 r_min
        callbacks.append(FlickerReward(name="smooth", kind="raw"))
    elif algo in ("diffusion_nft", "awm", "mix_grpo", "grpo_guard", "flow_dppo"):  # the issue-34 methods, GRPO's job settings
        from lightning_vidalign.algorithms import AWM, DiffusionNFT, FlowDPPO, GRPOGuard, MixGRPO

        dm = VideoClipDataModule(batch_size=2, num_frames=9, fps=8, shot_detector="histogram", captions=CAPTIONS)
        cls, extra = {"diffusion_nft": (DiffusionNFT, {}), "awm": (AWM, {"num_train_levels": 2}), "mix_grpo": (MixGRPO, {"window_size": 2, "shift_interval": 1}),
                      "grpo_guard": (GRPOGuard, {}), "flow_dppo": (FlowDPPO, {})}[algo]
        forward = algo in ("diffusion_nft", "awm")
        # the forward-process losses' gradients are small differences of large terms (NFT's implicit policies at
        # r ~ 0.5): as for DPO, SGD keeps the comparison linear in the gradients (Adam turned fp32 rounding into
        # lr-sized updates: 1.8e-4 apart with AdamW, seen); one optimizer step per round, as DiffusionNFT's recipe
        module = cls(backbone=WanBackbone(lora_rank=4, lora_alpha=4), optimizer=(lambda p: torch.optim.SGD(p, lr=0.5)) if forward else opt, sampler="ode",
                     num_inference_steps=4, guidance=1.0 if forward else 2.0, rollouts_per_condition=2, minibatches_per_round=1 if forward else 2,
                     val_num_videos=0, **extra)
        callbacks.append(FlickerReward(name="smooth", kind="raw"))
    elif algo == "grpo_experts":  # Wan 2.2 A14B-style two experts; each rank's samples train different steps (per_sample)
        dm = VideoClipDataModule(batch_size=2, num_frames=9, fps=8, shot_detector="histogram", captions=CAPTIONS)
        module = SAGEGRPO(backbone=WanBackbone(lora_rank=4, lora_alpha=4, boundary_ratio=0.875, guidance_scale_2=1.5), optimizer=opt, sampler="ode",
                          num_inference_steps=4, guidance=2.0, rollouts_per_condition=2, minibatches_per_round=2, anchor_interval=2, val_num_videos=0,
                          timestep_fraction=0.5, timestep_selection="per_sample")
        callbacks.append(FlickerReward(name="smooth", kind="raw"))
    else:
        dm = VideoClipDataModule(batch_size=2, num_frames=9, fps=8, shot_detector="histogram", captions=CAPTIONS)
        module = SAGEGRPO(backbone=WanBackbone(lora_rank=4, lora_alpha=4), optimizer=opt, sampler="ode", num_inference_steps=4, guidance=2.0,
                          rollouts_per_condition=2, minibatches_per_round=2, anchor_interval=2, val_num_videos=0)
        callbacks.append(FlickerReward(name="smooth", kind="raw"))
    if strategy_name.endswith("_ac"):
        module.backbone.set_activation_checkpointing(True)
    strategy = DDPStrategy() if strategy_name == "ddp" else FSDP2Strategy()
    trainer = L.Trainer(strategy=strategy, devices=2, accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, limit_val_batches=0, callbacks=callbacks)
    trainer.fit(module, datamodule=dm)
    from lightning_vidalign.cli import close_process_group

    close_process_group()  # (as vidalign does at the end of a command)
