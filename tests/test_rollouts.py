"""The round's record (issue 33): ``Rollouts`` selection, chunks, concatenation, gathering and checkpoint state,
with exact values."""
import pytest
import torch

from lightning_vidalign.rollouts import Rollouts


def _record(n=5, s=3):
    ar = torch.arange(n, dtype=torch.float32)
    return Rollouts(
        conditions={"prompt_embeds": ar.view(n, 1, 1).expand(n, 2, 4).clone()},
        batch={"caption": [f"c{i}" for i in range(n)], "fps": 8},
        latents=ar.view(n, 1).expand(n, 6).clone(), videos=ar.view(n, 1, 1, 1, 1).expand(n, 2, 3, 4, 4).clone(),
        sigmas=torch.linspace(1, 0, s + 1), x_t=ar.view(n, 1, 1).expand(n, s, 6).clone(), x_next=ar.view(n, 1, 1).expand(n, s, 6) + 0.5,
        log_prob=ar.view(n, 1).expand(n, s) * -1.0, group_ids=torch.arange(n) // 2, rewards=ar * 10,
        components={"motion": ar * 2, "flicker": ar * 3}, generator=torch.Generator().manual_seed(0),
    )


def test_select_and_chunks_keep_every_field_row_aligned():
    r = _record()
    assert len(r) == 5
    sub = r.select(torch.tensor([4, 1]))
    assert sub.rewards.tolist() == [40.0, 10.0] and sub.components["flicker"].tolist() == [12.0, 3.0]
    assert sub.batch == {"caption": ["c4", "c1"], "fps": 8} and sub.log_prob[:, 0].tolist() == [-4.0, -1.0]
    assert float(sub.conditions["prompt_embeds"][0].unique()) == 4.0 and float(sub.x_next[1].unique()) == 1.5
    assert sub.sigmas is r.sigmas and sub.generator is r.generator and sub.advantages is None
    chunks = r.chunks(2)
    assert [len(c) for c in chunks] == [2, 2, 1] and chunks[2].group_ids.tolist() == [2] and chunks[1].batch["caption"] == ["c2", "c3"]
    with pytest.raises(ValueError, match="size must be >= 1"):
        r.chunks(0)


def test_cat_inverts_chunks_and_refuses_ragged_parts():
    r = _record()
    back = Rollouts.cat(r.chunks(2))
    for name in ("latents", "videos", "x_t", "x_next", "log_prob", "group_ids", "rewards"):
        assert torch.equal(getattr(back, name), getattr(r, name)), name
    assert back.batch["caption"] == r.batch["caption"] and torch.equal(back.components["motion"], r.components["motion"])
    broken = r.chunks(3)
    broken[1].rewards = None
    with pytest.raises(ValueError, match="some parts only"):
        Rollouts.cat(broken)
    with pytest.raises(ValueError, match="no parts"):
        Rollouts.cat([])


def test_gather_takes_the_named_fields_only_in_rank_order():
    r = _record(4)
    world = lambda x: torch.cat([x, x + 100])  # noqa: E731  (two ranks: the second's values shifted)
    everyone = r.gather(world)
    assert everyone.rewards.tolist() == [0.0, 10.0, 20.0, 30.0, 100.0, 110.0, 120.0, 130.0]
    assert everyone.group_ids.tolist() == [0, 0, 1, 1, 100, 100, 101, 101] and everyone.components["motion"].shape == (8,)
    assert everyone.x_t is None and everyone.videos is None and everyone.conditions == {}


def test_drop_and_state_dict_round_trip():
    r = _record()
    light = r.drop("x_t", "x_next", "means", "conditions")
    assert light.x_t is None and light.conditions == {} and light.videos is r.videos and r.x_t is not None
    state = r.state_dict()
    assert "generator" not in state and "pending" not in state
    again = Rollouts.from_state_dict(state)
    assert torch.equal(again.x_next, r.x_next) and again.batch == r.batch and torch.equal(again.sigmas, r.sigmas)
    with pytest.raises(KeyError, match="lacks"):
        Rollouts.from_state_dict({"rewards": r.rewards})
    with pytest.raises(ValueError, match="empty record"):
        len(Rollouts())


def test_the_raw_batch_is_sliced_as_slice_batch_does():
    """Only the batch entries with ``N`` rows are selected (a latent cache's ``cached`` dict of ``B`` rows and a 0-d
    ``fps`` pass as they are; the rewards of a chunk see what ``slice_batch`` gives them), and ``cat`` keeps them once."""
    from lightning_vidalign.rewards.base import slice_batch

    r = _record(6)
    cached = {"latents": torch.zeros(3, 2)}
    r.batch = {"caption": [f"c{i}" for i in range(6)], "index": torch.arange(6), "cached": cached, "fps": torch.tensor(8.0)}
    for i, c in zip(range(0, 6, 4), r.chunks(4)):
        expected = slice_batch(r.batch, i, i + 4, 6)
        assert c.batch["caption"] == expected["caption"] and torch.equal(c.batch["index"], expected["index"])
        assert c.batch["cached"] is cached and c.batch["fps"] is r.batch["fps"]
    back = Rollouts.cat(r.chunks(4))
    assert back.batch["cached"] is cached and torch.equal(back.batch["index"], torch.arange(6)) and back.batch["caption"] == r.batch["caption"]
