"""Issue 22: reward models (CLIP score, PickScore, HPS, VideoAlign, VLM judge) on tiny random-weight instances
saved by the tests, and the captions that reach every reward through the batch."""
import os

import lightning as L
import numpy as np
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


# ------------------------------------------------------------- tiny saved instances
def _videos(b=2, t=5, h=40, w=48, seed=0):
    return torch.rand(b, t, 3, h, w, generator=torch.Generator().manual_seed(seed))


CAPTIONS = ["a cyclist rides along a street", "a rabbit in a meadow"]


def write_clip_tokenizer(folder):
    """The real CLIP BPE (vocab.json + merges.txt, 49408 tokens) built from the merges file open_clip ships,
    as openai/clip-* folders hold it."""
    import gzip
    import json

    import open_clip.tokenizer as oct

    merges = gzip.open(oct.default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    vocab = list(oct.bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(folder, exist_ok=True)
    json.dump({v: i for i, v in enumerate(vocab)}, open(os.path.join(folder, "vocab.json"), "w"))
    open(os.path.join(folder, "merges.txt"), "w").write("#version: 0.2\n" + "\n".join(merges) + "\n")
    from transformers import CLIPTokenizer

    CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")).save_pretrained(folder)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random-weight transformers CLIPModel (32x32 images) with its PIL image processor and tokenizer."""
    from transformers import CLIPConfig, CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    folder = str(tmp_path_factory.mktemp("tiny_clip"))
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8),
        projection_dim=16,
    )
    CLIPModel(cfg).save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    write_clip_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_hps(tmp_path_factory):
    """A random-weight open_clip tower (tiny ViT config JSON) saved as an HPS checkpoint {'state_dict': ...}."""
    import json

    import open_clip

    folder = tmp_path_factory.mktemp("tiny_hps")
    arch = folder / "tiny-vit-hps.json"
    json.dump({"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
               "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}, open(arch, "w"))
    open_clip.add_model_config(str(arch))
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-vit-hps", pretrained=None, load_weights=False)
    torch.save({"state_dict": model.state_dict()}, folder / "hps.pt")
    return str(folder / "hps.pt"), str(arch)


def _reference_clip_cos(folder, videos, idx):
    """Per-frame cosines (B, F) the reference way: frames saved as images, CLIPProcessor (PIL) + CLIPModel."""
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor

    model, proc = CLIPModel.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder, backend="pil")
    rows = []
    for i in range(videos.shape[0]):
        frames = [Image.fromarray((videos[i, j].permute(1, 2, 0) * 255).round().byte().numpy()) for j in idx]
        inp = proc(text=[CAPTIONS[i]] * len(idx), images=frames, return_tensors="pt", padding=True, truncation=True, max_length=77)
        with torch.no_grad():
            out = model(**inp)
        rows.append((out.image_embeds * out.text_embeds).sum(-1))
    return torch.stack(rows), float(model.logit_scale.exp())


def test_clip_score_matches_the_reference_computation(tiny_clip):
    from lightning_vidalign.rewards.models import CLIPScoreReward

    r = CLIPScoreReward(tiny_clip, num_frames=3)
    videos = _videos()
    got = r.score(videos, {"caption": CAPTIONS})
    assert got.shape == (2,) and torch.isfinite(got).all()
    cos, _ = _reference_clip_cos(tiny_clip, videos, [0, 2, 4])  # linspace(0, 4, 3)
    torch.testing.assert_close(got, (100 * cos.clamp(min=0)).mean(1), rtol=1e-4, atol=1e-4)
    assert set(r.score_components()) == {"frame_min", "frame_max"}
    hessel = CLIPScoreReward(tiny_clip, num_frames=3, scale=2.5, prefix="A photo depicts ").score(videos, {"caption": CAPTIONS})
    assert hessel.shape == (2,) and (hessel >= 0).all()


def test_pickscore_is_logit_scale_times_cosine(tiny_clip):
    from lightning_vidalign.rewards.models import PickScoreReward

    videos = _videos(seed=1)
    got = PickScoreReward(tiny_clip, num_frames=2, aggregate="min").score(videos, {"caption": CAPTIONS})
    cos, scale = _reference_clip_cos(tiny_clip, videos, [0, 4])
    torch.testing.assert_close(got, (scale * cos).min(1).values, rtol=1e-4, atol=1e-4)
    first = PickScoreReward(tiny_clip, aggregate="first").score(videos, {"caption": CAPTIONS})
    torch.testing.assert_close(first, scale * _reference_clip_cos(tiny_clip, videos, [0])[0][:, 0], rtol=1e-4, atol=1e-4)


def test_hps_matches_open_clip_with_hpsv2_preprocessing(tiny_hps):
    import open_clip
    from open_clip.transform import image_transform
    from PIL import Image

    from lightning_vidalign.rewards.models import HPSReward

    ckpt, arch = tiny_hps
    r = HPSReward(ckpt, arch=arch, num_frames=None)
    videos = _videos(t=3, h=24, w=40)  # not square: longest side resized, then padded
    got = r.score(videos, {"caption": CAPTIONS})
    model = open_clip.create_model("tiny-vit-hps", pretrained=None, load_weights=False, output_dict=True)
    model.load_state_dict(torch.load(ckpt)["state_dict"])
    model.eval()
    tf = image_transform(32, is_train=False, resize_mode="longest")
    tok = open_clip.get_tokenizer("tiny-vit-hps")
    want = []
    for i in range(2):
        scores = []
        for j in range(3):
            img = tf(Image.fromarray((videos[i, j].permute(1, 2, 0) * 255).round().byte().numpy())).unsqueeze(0)
            with torch.no_grad():
                out = model(img, tok([CAPTIONS[i]]))
            scores.append(torch.diagonal(out["image_features"] @ out["text_features"].T)[0])
        want.append(torch.stack(scores).mean())
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-4, atol=1e-5)
    # the padding is black: a 24x40 frame fills 32x19 of the 32x32 input
    px = r.transform(Image.fromarray(np.full((24, 40, 3), 255, np.uint8)))
    assert px.shape == (3, 32, 32)


def test_frame_rewards_name_missing_files_bad_inputs_and_nonfinite_scores(tiny_clip, tiny_hps, tmp_path):
    import shutil

    from lightning_vidalign.rewards.models import CLIPScoreReward, HPSReward, MissingRewardFileError, NonFiniteRewardError, PickScoreReward, RewardInputError

    with pytest.raises(MissingRewardFileError, match="does not exist"):
        PickScoreReward(str(tmp_path / "nowhere"))
    broken = tmp_path / "no_merges"
    shutil.copytree(tiny_clip, broken)
    os.remove(broken / "merges.txt")
    with pytest.raises(MissingRewardFileError, match="merges.txt"):
        CLIPScoreReward(str(broken))
    os.remove(broken / "model.safetensors")
    with pytest.raises(MissingRewardFileError, match="no weights"):
        CLIPScoreReward(str(broken))
    with pytest.raises(MissingRewardFileError, match="hps_v9.pt"):
        HPSReward(str(tmp_path / "hps_v9.pt"), arch=tiny_hps[1])
    r = CLIPScoreReward(tiny_clip)
    with pytest.raises(RewardInputError, match=r"\(B, T, 3, H, W\)"):
        r.score(torch.rand(2, 3, 8, 8), {"caption": CAPTIONS})
    with pytest.raises(RewardInputError, match=r"\[0, 1\]"):
        r.score(_videos() * 2 - 1, {"caption": CAPTIONS})
    with pytest.raises(KeyError, match="caption"):
        r.score(_videos(), None)
    with pytest.raises(ValueError, match="2 strings"):
        r.score(_videos(), {"caption": CAPTIONS[:1]})
    with torch.no_grad():
        r.model.visual_projection.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteRewardError):
        r.score(_videos(), {"caption": CAPTIONS})
