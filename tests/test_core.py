import math

import pytest
import torch

from lightning_vidalign.buffer import RolloutBuffer
from lightning_vidalign.module import WarmupCosineLR


def test_warmup_cosine_exact_values():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = WarmupCosineLR(opt, warmup_steps=4, total_steps=12, min_ratio=0.1)
    lrs = []
    for _ in range(14):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:5] == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0])
    assert lrs[8] == pytest.approx(2.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))))
    assert lrs[12] == pytest.approx(0.2) and lrs[13] == pytest.approx(0.2)
    with pytest.raises(ValueError):
        WarmupCosineLR(opt, warmup_steps=-1)


def test_rollout_buffer_passes_cover_each_sample_once_and_resume():
    buf = RolloutBuffer(passes=3, minibatch_size=2, seed=1)
    assert buf.exhausted
    buf.fill(x=torch.arange(6), y=torch.arange(6) * 10)
    seen = []
    for _ in range(buf.passes * buf.minibatches_per_pass):
        mb = buf.next_minibatch()
        assert torch.equal(mb["y"], mb["x"] * 10)
        seen.append(mb["x"])
    assert buf.exhausted
    for p in range(3):
        assert sorted(torch.cat(seen[3 * p : 3 * p + 3]).tolist()) == list(range(6))
    with pytest.raises(RuntimeError):
        buf.next_minibatch()
    # resume mid-round: the restored buffer serves exactly what the original serves next
    a = RolloutBuffer(passes=2, minibatch_size=2, seed=3)
    a.fill(x=torch.arange(5))
    a.next_minibatch()
    b = RolloutBuffer(passes=1, minibatch_size=1)
    b.load_state_dict(a.state_dict())
    while not a.exhausted:
        assert torch.equal(a.next_minibatch()["x"], b.next_minibatch()["x"])
    assert b.exhausted
    with pytest.raises(ValueError):
        buf.fill(x=torch.zeros(2), y=torch.zeros(3))


def test_torchvision_shim_makes_timm_and_lightning_importable():
    import subprocess
    import sys

    code = (
        "import lightning_vidalign, lightning_vidalign._compat as c\n"
        "import torchvision, timm, lightning, peft, torchmetrics\n"
        "print('shim', c.SHIM_APPLIED, 'native_ops', torchvision.extension._has_ops())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    # the shim is applied exactly when torchvision's compiled ops could not load
    _, applied, _, native = out.stdout.split()
    assert applied != native
    from lightning_vidalign import _compat

    state = _compat.SHIM_APPLIED
    assert _compat.apply_torchvision_shim() is state  # idempotent: no second definition once torchvision is imported


def test_saved_activation_tracker_counts_what_autograd_keeps():
    from lightning_vidalign.utils import SavedActivationTracker

    w = torch.randn(100, 100, requires_grad=True)
    x = torch.randn(10, 100)
    with SavedActivationTracker(exclude=[w, x]) as tr:
        h = torch.tanh(x @ w)  # saves x, w (excluded) and tanh's output (10x100 fp32 = 4000 bytes)
        y = (h * h).sum()  # mul saves h twice: the same storage, counted once
        assert tr.current_bytes == 4000
        y.backward()
        del h, y
    assert tr.peak_bytes == 4000 and tr.current_bytes == 0
    with SavedActivationTracker(exclude=[w, x]) as tr:
        a = torch.tanh(x @ w).sum()
        b = torch.tanh(x @ (2 * w)).sum()  # two graphs alive together: 2 tanh outputs (2·w is not
        (a + b).backward()  # saved: x needs no gradient)
    assert tr.peak_bytes == 4000 + 4000


def test_cosine_schedule_shorter_than_the_run_is_named():
    """A run extended past the schedule's total_steps (``--trainer.max_steps`` raised alone) would train at lr 0."""
    import lightning as L

    from lightning_vidalign.algorithms import SFT
    from lightning_vidalign.backbones import SVDBackbone

    module = SFT(SVDBackbone(lora_rank=2, lora_alpha=2), lr_scheduler=lambda o: WarmupCosineLR(o, 1, 5), val_num_videos=0)
    module.trainer = L.Trainer(max_steps=8, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.warns(UserWarning, match=r"total_steps=5 optimizer steps, before the run's 8 .* the last 3 do not change the model; "
                                         r"set --model.init_args.lr_scheduler.init_args.total_steps 8"):
        module.configure_optimizers()
    module.trainer = L.Trainer(max_steps=5, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        module.configure_optimizers()
