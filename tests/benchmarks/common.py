"""Shared helper of the benchmarks: a timed ``fit`` without logging, checkpoints or validation."""
import tempfile
import time

import lightning as L

from lightning_vidalign.rewards import FlickerReward, MotionMagnitudeReward


def timed_fit(module, datamodule, steps: int, callbacks=None) -> float:
    """Seconds per training batch of ``fit`` over ``steps`` batches (default rewards: motion with
    target 1.07 px/frame, flicker weight 5, as the GRPO configs)."""
    if callbacks is None:
        callbacks = [MotionMagnitudeReward(target=1.07), FlickerReward(weight=5.0)]
    with tempfile.TemporaryDirectory() as run_dir:  # (the fit-end LoRA export goes to the run folder, not the cwd)
        trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            limit_val_batches=0, callbacks=list(callbacks), default_root_dir=run_dir)
        start = time.perf_counter()
        trainer.fit(module, datamodule=datamodule)
        return (time.perf_counter() - start) / steps


def interleaved_medians(fns: dict, repeats: int) -> tuple[dict, dict]:
    """Time each callable of ``fns`` ``repeats`` times, interleaved (a, b, a, b, ...: a load change hits both alike);
    returns ``(seconds per name: list, median per name)``."""
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return times, {k: sorted(v)[len(v) // 2] for k, v in times.items()}
