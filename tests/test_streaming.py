"""Streaming data from LitData shards (issue 24, item 4): ``vidalign shard`` converts the default data of
configs/sft.yaml; the data module reading them gives the same items in the same order as decoding the videos; a run
stopped mid-epoch and resumed from its checkpoint reaches the uninterrupted run's LoRA bitwise (one process here;
2 DDP processes in the slow test); bad shards are refused with the folder or chunk named."""
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from lightning_vidalign.datamodules import VideoClipDataModule
from lightning_vidalign.datamodules.streaming import ShardError, clip_settings, open_shards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
VIDALIGN = shutil.which("vidalign", path=os.path.dirname(sys.executable)) or shutil.which("vidalign")
SFT_CONFIG = f"{ROOT}/configs/sft.yaml"
FAST = ["--data.init_args.shot_detector", "histogram"]  # start-up only (the shards then hold histogram-cut clips)


@pytest.fixture(autouse=True)
def _own_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", sys.argv[:1])  # in-process CLI runs: arguments passed explicitly, not pytest's


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """``vidalign shard --config configs/sft.yaml --output DIR`` (histogram cuts, for start-up time), in process."""
    from lightning_vidalign.cli import main

    out = tmp_path_factory.mktemp("shards") / "sft"
    old, sys.argv = sys.argv, sys.argv[:1]
    try:
        main(["shard", "--config", SFT_CONFIG, "--output", str(out), *FAST])
    finally:
        sys.argv = old
    return out


def _video_dm(**kw):
    """The data module of configs/sft.yaml with histogram cuts (as the shards fixture writes it), ``kw`` changed."""
    return VideoClipDataModule(**{"num_frames": 8, "fps": 7.0, "height": 64, "width": 64, "batch_size": 2, "shot_detector": "histogram", **kw})


def test_shards_hold_the_video_path_items_in_its_order(shards):
    """Every train and val item from the shards equals the video path's bitwise (frames, caption, path, start,
    index), and the training loader yields the same batches in the same order (two epochs)."""
    index = json.loads((shards / "train" / "index.json").read_text())
    assert index["vidalign"]["settings"]["num_frames"] == 8 and index["vidalign"]["settings"]["shot_detector"] == "histogram"
    video, streamed = _video_dm(), _video_dm(shards=str(shards))
    video.setup("fit"), streamed.setup("fit")
    for a_set, b_set in ((video.train_set, streamed.train_set), (video.val_set, streamed.val_set)):
        assert len(a_set) == len(b_set) > 0
        for i in range(len(a_set)):
            a, b = a_set[i], b_set[i]
            assert a.keys() == b.keys()
            assert torch.equal(a["video"], b["video"]) and torch.equal(a["first_frame"], b["first_frame"])
            assert (a["caption"], a["path"], a["start"], a["index"]) == (b["caption"], b["path"], b["start"], b["index"])
    for epoch in (0, 1):
        la, lb = video.train_dataloader(), streamed.train_dataloader()
        la.sampler.set_epoch(epoch), lb.sampler.set_epoch(epoch)
        batches = list(zip(la, lb))
        assert len(batches) == len(la) == len(lb) == len(video.train_set) // 2
        for a, b in batches:
            assert torch.equal(a["index"], b["index"]) and torch.equal(a["video"], b["video"]) and a["caption"] == b["caption"]
    # a DataLoader worker process opens its own LitData reader (the dataset pickles without it)
    workers = _video_dm(shards=str(shards), num_workers=1)
    workers.setup("fit")
    loader = workers.train_dataloader()
    loader.sampler.set_epoch(1)
    for a, b in zip(loader, lb):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["video"], b["video"])


def _fit(root, steps, *extra):
    from lightning_vidalign.cli import VidAlignCLI

    VidAlignCLI(args=["fit", "--config", SFT_CONFIG, "--trainer.default_root_dir", str(root), "--trainer.max_steps", str(steps),
                      "--trainer.logger", "false", "--trainer.callbacks.init_args.every_n_train_steps", "1",
                      "--model.init_args.val_num_videos", "0", *FAST, *extra])
    state = torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    return state["global_step"], {k: v for k, v in state["state_dict"].items() if "lora_" in k}


def test_resume_from_shards_mid_epoch_matches_the_uninterrupted_run(shards, tmp_path):
    """``vidalign fit --config configs/sft.yaml --data.init_args.shards DIR``: 3 steps uninterrupted vs 2 steps, then
    ``--ckpt_path last`` to 3 (5 batches per epoch: the stop is mid-epoch): the same LoRA bitwise."""
    src = ["--data.init_args.shards", str(shards)]
    step, full = _fit(tmp_path / "full", 3, *src)
    assert step == 3
    assert _fit(tmp_path / "stopped", 2, *src)[0] == 2
    step, resumed = _fit(tmp_path / "stopped", 3, *src, "--ckpt_path", "last")
    assert step == 3 and full.keys() == resumed.keys() and full
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_training_from_shards_equals_training_from_video(shards, tmp_path):
    """The same 3 steps of configs/sft.yaml from the videos and from their shards: the same LoRA bitwise (same batches)."""
    _, from_video = _fit(tmp_path / "video", 3)
    _, from_shards = _fit(tmp_path / "shards", 3, "--data.init_args.shards", str(shards))
    assert from_video.keys() == from_shards.keys() and all(torch.equal(from_video[k], from_shards[k]) for k in from_video)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_ddp_resume_from_shards_matches_the_uninterrupted_run(shards, tmp_path, strategy):
    """2 processes (gloo) through ``vidalign fit ... --config configs/strategies/{ddp,fsdp2}.yaml --trainer.devices 2``
    from shards: 11 train clips -> 5 per rank -> 2 batches per rank and epoch. 3 steps uninterrupted vs 1 step (mid
    epoch 0), then ``--ckpt_path last`` to 3 (through epoch 1): both ranks end with the uninterrupted LoRA bitwise."""
    env = {**os.environ, "PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", ""), "HF_HUB_OFFLINE": "1", "MASTER_PORT": str(_free_port())}
    for k in ("MASTER_ADDR", "NODE_RANK", "WORLD_SIZE", "LOCAL_RANK", "GROUP_RANK", "RANK"):
        env.pop(k, None)

    def launch(root, steps, dump, *extra):
        cmd = [VIDALIGN, "fit", "--config", SFT_CONFIG, "--config", f"{ROOT}/configs/strategies/{strategy}.yaml", "--trainer.accelerator", "cpu",
               "--trainer.devices", "2", "--trainer.default_root_dir", str(root), "--trainer.max_steps", str(steps), "--trainer.logger", "false",
               "--trainer.callbacks.init_args.every_n_train_steps", "1", "--model.init_args.val_num_videos", "0", *FAST,
               "--data.init_args.shards", str(shards), "--trainer.callbacks+=rehearsal_callbacks.DumpAdapters",
               "--trainer.callbacks.out", str(tmp_path / dump), *extra]
        out = subprocess.run(cmd, cwd=tmp_path, env={**env, "MASTER_PORT": str(_free_port())}, capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stderr[-3000:]
        return [torch.load(tmp_path / dump / f"rank{r}.pt") for r in (0, 1)]

    full = launch(tmp_path / "full", 3, "full")
    first = launch(tmp_path / "stopped", 1, "first")
    assert first[0]["global_step"] == 1 and first[0]["world_size"] == 2
    resumed = launch(tmp_path / "stopped", 3, "resumed", "--ckpt_path", "last")
    for rank in (0, 1):
        a, b = full[rank], resumed[rank]
        assert a["global_step"] == b["global_step"] == 3 and a["world_size"] == 2
        assert all(torch.equal(a["lora"][k], b["lora"][k]) for k in a["lora"]), rank
        assert all(torch.equal(a["lora"][k], full[0]["lora"][k]) for k in a["lora"])  # ranks identical
    assert any(not torch.equal(first[0]["lora"][k], full[0]["lora"][k]) for k in full[0]["lora"])  # trained on after the stop


# ----- bad input -----

def _settings(**kw):
    return clip_settings(_video_dm(**kw).hparams)


def test_missing_and_empty_shard_folders_are_named(tmp_path):
    with pytest.raises(ShardError, match=f"{tmp_path / 'nowhere'}.*no such folder.*vidalign shard"):
        open_shards(str(tmp_path / "nowhere"), _settings())
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardError, match=f"{tmp_path / 'empty'}.*empty.*vidalign shard"):
        open_shards(str(tmp_path / "empty"), _settings())
    (tmp_path / "half" / "train").mkdir(parents=True)  # an unfinished or foreign folder: no index.json
    with pytest.raises(ShardError, match=f"{tmp_path / 'half' / 'train'}.*no index.json"):
        open_shards(str(tmp_path / "half"), _settings())


def test_shards_of_other_settings_are_refused_naming_the_keys(shards):
    with pytest.raises(ShardError, match=r"train'? were written with other data settings.*num_frames: shards 8, config 9.*fps: shards 7.0, config 8"):
        open_shards(str(shards), _settings(num_frames=9, fps=8))
    with pytest.raises(ShardError, match="split_seed: shards 0, config 1"):
        open_shards(str(shards), _settings(split_seed=1))
    open_shards(str(shards), _settings(batch_size=4, num_workers=0))  # loader settings are free


def test_a_split_folder_is_refused_naming_its_parent(shards):
    """Passing ``<shards>/train`` (a new user's guess in the issue-24 trial) names the folder to pass instead."""
    with pytest.raises(ShardError, match=f"is one split of a shard folder.*--data.init_args.shards {shards}$"):
        open_shards(str(shards / "train"), _settings())


def test_the_cli_names_mismatching_shards_in_one_line(shards, tmp_path, capsys):
    from lightning_vidalign.cli import main

    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", SFT_CONFIG, "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false", *FAST,
              "--data.init_args.shards", str(shards), "--data.init_args.height", "32"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "vidalign: ShardError: shards" in err and "height: shards 64, config 32" in err and "Traceback" not in err


def test_corrupt_chunks_are_named(shards, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(shards, bad)
    chunk = sorted((bad / "train").glob("chunk-*.bin"))[0]
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle of a sample's frames: same size
    chunk.write_bytes(bytes(data))
    train, _ = open_shards(str(bad), _settings())
    good = [i for i in range(len(train)) if _readable(train, i)]
    assert len(good) == len(train) - 1  # exactly the sample holding the byte is refused, naming folder, chunk and sample
    broken = next(i for i in range(len(train)) if i not in good)
    with pytest.raises(ShardError, match=rf"{bad / 'train'}'?: sample {broken} in chunk {chunk.name} is corrupt"):
        train[broken]
    chunk.write_bytes(bytes(data[: len(data) // 3]))  # truncated: named at setup (LitData would wait, then blame a download)
    with pytest.raises(ShardError, match=rf"chunk {chunk.name} holds {len(data) // 3} bytes, index.json records {len(data)}"):
        open_shards(str(bad), _settings())
    chunk.unlink()
    with pytest.raises(ShardError, match=rf"chunk {chunk.name} is missing"):
        open_shards(str(bad), _settings())
    shutil.copy(shards / "train" / chunk.name, chunk)
    (bad / "val" / "index.json").write_text("{not json")
    with pytest.raises(ShardError, match=rf"{bad / 'val'}.*index.json is not readable JSON"):
        open_shards(str(bad), _settings())


def _readable(dataset, i) -> bool:
    try:
        dataset[i]
        return True
    except ShardError:
        return False


def test_shard_refuses_a_folder_that_holds_files(shards, tmp_path):
    from lightning_vidalign.cli import shard

    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("mine")
    with pytest.raises(ShardError, match="already holds files.*--overwrite"):
        shard(["--config", SFT_CONFIG, "--output", str(tmp_path / "used"), *FAST])
    assert (tmp_path / "used" / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_docs_streaming_commands_run_as_written(tmp_path):
    """The two commands of docs/data.md's "Streaming data" section, as written (the config's TransNetV2 cuts), from a
    working folder; the fit is cut to 1 step in its own run folder."""
    import re

    page = open(os.path.join(ROOT, "docs", "data.md")).read()
    section = page[page.index("## Streaming data") :]
    block = re.search(r"```\n(.*?)```", section, flags=re.S).group(1).strip().splitlines()
    assert [line.split()[:2] for line in block] == [["vidalign", "shard"], ["vidalign", "fit"]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for line, extra in zip(block, ([], ["--trainer.max_steps", "1", "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.logger", "false",
                                        "--model.init_args.val_num_videos", "0"])):
        cmd = [VIDALIGN if a == "vidalign" else (os.path.join(ROOT, a) if a.startswith("configs/") else a) for a in line.split()]
        out = subprocess.run([*cmd, *extra], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stderr[-3000:]
    index = json.loads((tmp_path / "data" / "shards" / "train" / "index.json").read_text())
    assert index["vidalign"]["settings"]["shot_detector"] == "transnetv2" and index["vidalign"]["num_samples"] > 0
    assert "`max_steps=1` reached" in out.stdout + out.stderr
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == 1


def test_an_empty_val_split_is_written_and_read_as_empty(tmp_path):
    from lightning_vidalign.datamodules import write_shards

    summary = write_shards(_video_dm(val_fraction=0.0, max_clips_per_source=1), str(tmp_path / "s"))
    assert (summary["train"], summary["val"]) == (3, 0) and not (tmp_path / "s.partial").exists()
    train, val = open_shards(str(tmp_path / "s"), _settings(val_fraction=0.0, max_clips_per_source=1))
    assert len(train) == 3 and len(val) == 0 and train[2]["index"] == 2


def test_shard_help_is_its_own():
    """``vidalign shard --help`` prints the subcommand's usage (not Lightning's fit help) and exits 0."""
    out = subprocess.run([VIDALIGN, "shard", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("usage: vidalign shard --config CONFIG") and "--output DIR" in out.stdout
    assert "--trainer" not in out.stdout
