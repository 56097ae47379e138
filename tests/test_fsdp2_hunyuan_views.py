"""FSDP2's "returned a view tensor" warning on the HunyuanVideo 1.5 transformer is harmless: the LoRA gradients under
``fully_shard`` (blocks, then the transformer, as ``VideoAlignModule.configure_model``) equal the unsharded model's
exactly, t2v and i2v. ``vidalign``'s console filters the warning (``cli.quiet_console``) on this evidence."""
import copy
import socket
import warnings

import pytest
import torch
import torch.distributed as dist


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("mode", ["t2v", "i2v"])
def test_fsdp2_gradients_equal_the_unsharded_model_despite_the_view_warning(mode):
    from torch.distributed.fsdp import fully_shard

    from lightning_vidalign.backbones import HunyuanVideo15Backbone

    own_group = not dist.is_initialized()  # an earlier in-process run normally destroyed its group (cli.close_process_group)
    if own_group:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    assert dist.get_world_size() == 1
    try:
        ref = HunyuanVideo15Backbone(mode=mode, lora_rank=4, lora_alpha=4)
        with torch.no_grad():
            for name, p in ref.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
        sharded = copy.deepcopy(ref)
        for block in sharded.fsdp_modules():
            fully_shard(block)
        fully_shard(sharded.transformer)
        batch = {"caption": ["a red car drives along the coast"], "first_frame": torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))}
        x0 = torch.randn(1, 3, 8, 16, 16, generator=torch.Generator().manual_seed(2))
        noise = torch.randn(1, 3, 8, 16, 16, generator=torch.Generator().manual_seed(3))
        grads, views = [], []
        for bb in (ref, sharded):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                bb.training_loss(x0, bb.encode_condition(batch), torch.tensor([0.6]), noise).sum().backward()
            views.append(sum("returned a view tensor" in str(w.message) for w in caught))
            grads.append({n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad) for n, p in bb.named_parameters() if p.requires_grad})
        assert views == [0, 1]  # the warning this test justifies filtering
        assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
        for name in grads[0]:
            torch.testing.assert_close(grads[1][name], grads[0][name], rtol=0, atol=0)
    finally:
        if own_group:
            dist.destroy_process_group()
