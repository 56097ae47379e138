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
    return make_tiny_clip(str(tmp_path_factory.mktemp("tiny_clip")))


def make_tiny_clip(folder):
    """A random-weight transformers CLIPModel (32x32 images) with its PIL image processor and tokenizer in ``folder``."""
    from transformers import CLIPConfig, CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

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


# ------------------------------------------------------------- VideoAlign on a tiny Qwen2-VL
# the chat template of Qwen/Qwen2-VL-2B-Instruct (chat_template.json)
QWEN2VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_tiny_qwen2vl(folder, weights=True):
    """A tiny random-weight Qwen2-VL base folder: byte-level BPE tokenizer with Qwen2-VL's special tokens,
    Qwen2-VL image/video processors (the real defaults), the chat template, config (and weights)."""
    from open_clip.tokenizer import bytes_to_unicode
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    tk = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(bytes_to_unicode().values())}, merges=[]))
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tok.add_tokens(specials, special_tokens=True)
    tok.pad_token, tok.eos_token = "<|endoftext|>", "<|im_end|>"
    ids = dict(zip(specials, tok.convert_tokens_to_ids(specials)))
    proc = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=tok, video_processor=Qwen2VLVideoProcessor(), chat_template=QWEN2VL_CHAT_TEMPLATE)
    proc.save_pretrained(folder)
    cfg = Qwen2VLConfig(
        text_config=dict(vocab_size=280, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, max_position_embeddings=4096),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(cfg)
    if weights:
        model.save_pretrained(folder)
    else:
        cfg.save_pretrained(folder)
    return model


def _legacy_state(model, rm_head):
    """The state dict as VideoAlign's Qwen2VLRewardModelBT saved it with transformers 4 (visual.*, model.* text)."""
    out = {}
    for k, v in model.state_dict().items():
        if k.startswith("model.visual."):
            out["visual." + k[len("model.visual."):]] = v
        elif k.startswith("model.language_model."):
            out["model." + k[len("model.language_model."):]] = v
        else:
            out[k] = v
    out["rm_head.weight"] = rm_head
    return out


VIDEOREWARD_CONFIG = {
    "data_config": {"meta_data": "/path/meta.csv", "data_dir": "/path", "max_frame_pixels": 448 * 448, "num_frames": None, "fps": 2.0,
                    "eval_dim": ["VQ", "MQ", "TA"], "prompt_template_type": "detailed_special", "sample_type": "uniform"},
    "model_config": {"model_name_or_path": "Qwen/Qwen2-VL-2B-Instruct", "output_dim": 1, "use_special_tokens": True, "reward_token": "special"},
    "peft_lora_config": {"lora_enable": True, "lora_r": 4, "lora_alpha": 8},
    "inference_config": {"VQ_mean": 0.1, "VQ_std": 2.0, "MQ_mean": -0.2, "MQ_std": 0.5, "TA_mean": 0.3, "TA_std": 4.0},
}


@pytest.fixture(scope="module")
def tiny_videoreward(tmp_path_factory):
    """A VideoReward folder (model_config.json + checkpoint-7/model.pth in transformers-4 key names) on a tiny
    Qwen2-VL base folder; the 3 reward tokens added to the tokenizer and the embeddings resized as VideoAlign does."""
    import json

    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("videoreward")
    base = root / "base"
    model = write_tiny_qwen2vl(str(base))
    n = len(AutoTokenizer.from_pretrained(str(base))) + 3
    model.resize_token_embeddings(n)
    torch.manual_seed(1)
    rm_head = torch.randn(1, 32)
    ckpt = root / "VideoReward" / "checkpoint-7"
    os.makedirs(ckpt)
    torch.save(_legacy_state(model, rm_head), ckpt / "model.pth")
    json.dump(VIDEOREWARD_CONFIG, open(root / "VideoReward" / "model_config.json", "w"))
    return str(root / "VideoReward"), str(base), model, rm_head


def test_videoalign_frames_prompt_and_scores_match_the_reference(tiny_videoreward):
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    from lightning_vidalign.rewards.models import VideoAlignReward

    path, base, model, rm_head = tiny_videoreward
    r = VideoAlignReward(path, base_model=base, video_fps=8.0)
    videos = _videos(b=2, t=9, h=64, w=48, seed=3)
    # frames: 9 frames at 8 fps, 2 fps -> 2.25 -> at least 4 (even): round(linspace(0, 8, 4)) = 0, 3, 5, 8;
    # 64x48 is below 128·28² pixels: smart_resize scales up to 392x280 (ceil(64·5.72/28)·28, ceil(48·5.72/28)·28) (multiples of 28); torchvision's uint8 resize
    frames = r.frames(videos[0], 8.0)
    u8 = (videos[0, [0, 3, 5, 8]] * 255).round().to(torch.uint8)
    torch.testing.assert_close(frames, TF.resize(u8, [392, 280], interpolation=InterpolationMode.BICUBIC, antialias=True).float(), rtol=0, atol=0)
    # prompt: VideoAlign's detailed_special template around the caption, with each reward token once
    text = r.prompt(CAPTIONS[0])
    assert f"Textual prompt - {CAPTIONS[0]}\nPlease provide the ratings of Text Alignment: <|TA_reward|>\nEND\n" in text
    assert all(text.count(t) == 1 for t in ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>")) and text.startswith("\nYou are tasked")
    got = r.score(videos, {"caption": CAPTIONS})
    parts = r.score_components()
    # reference: the saved model's own modules (weights as saved, not as loaded), 1-D positions, rm_head at the tokens
    ids = r.model.special_token_ids
    want = []
    for i in range(2):
        chat = [[{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": r.prompt(CAPTIONS[i])}]}]]
        inp = r.processor(text=r.processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=True),
                          videos=[r.frames(videos[i], 8.0)], return_tensors="pt", do_rescale=True, cap_pixels_per_frame=False)
        assert inp["input_ids"][0, :3].tolist() == r.processor.tokenizer("<|im_start|>sy").input_ids  # system turn first
        n = inp["input_ids"].shape[1]
        with torch.no_grad():
            h = model.model(input_ids=inp["input_ids"], attention_mask=inp["attention_mask"], pixel_values_videos=inp["pixel_values_videos"],
                            video_grid_thw=inp["video_grid_thw"], position_ids=torch.arange(n).view(1, 1, n).expand(3, 1, n)).last_hidden_state
        raw = torch.stack([(h[0][inp["input_ids"][0] == t] @ rm_head.T).view(()) for t in ids])
        ic = VIDEOREWARD_CONFIG["inference_config"]
        want.append((raw - torch.tensor([ic["VQ_mean"], ic["MQ_mean"], ic["TA_mean"]])) / torch.tensor([ic["VQ_std"], ic["MQ_std"], ic["TA_std"]]))
    want = torch.stack(want)
    torch.testing.assert_close(torch.stack([parts["VQ"], parts["MQ"], parts["TA"]], 1), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got, want.sum(1), rtol=1e-4, atol=1e-4)  # the reference's Overall
    weighted = VideoAlignReward(path, base_model=base, video_fps=8.0, weights=(0.0, 1.0, 0.5), use_norm=False, batch_size=1)
    raw_got = weighted.score(videos, {"caption": CAPTIONS, "fps": torch.tensor([8.0, 8.0])})
    ic = VIDEOREWARD_CONFIG["inference_config"]
    torch.testing.assert_close(raw_got, (want[:, 1] * ic["MQ_std"] + ic["MQ_mean"]) + 0.5 * (want[:, 2] * ic["TA_std"] + ic["TA_mean"]), rtol=1e-4, atol=1e-4)


def test_videoalign_lora_checkpoint_equals_its_merged_full_checkpoint(tiny_videoreward, tmp_path):
    """A LoRA checkpoint (adapter_model.safetensors with peft key names, non_lora_state_dict.pth with the head
    and resized embeddings) scores as the full model.pth of the merged weights."""
    import json
    import shutil

    from safetensors.torch import save_file

    from lightning_vidalign.rewards.models import VideoAlignReward

    path, base, model, rm_head = tiny_videoreward
    g = torch.Generator().manual_seed(5)
    r_, alpha = 4, 8
    sd = model.state_dict()
    lora, merged = {}, {k: v.clone() for k, v in sd.items()}
    for legacy, ours in [("model.layers.0.self_attn.q_proj", "model.language_model.layers.0.self_attn.q_proj"), ("visual.blocks.0.attn.qkv", "model.visual.blocks.0.attn.qkv")]:
        w = sd[ours + ".weight"]
        a, b = torch.randn(r_, w.shape[1], generator=g) * 0.3, torch.randn(w.shape[0], r_, generator=g) * 0.3
        lora[f"base_model.model.{legacy}.lora_A.weight"], lora[f"base_model.model.{legacy}.lora_B.weight"] = a, b
        merged[ours + ".weight"] = w + alpha / r_ * b @ a
    folder = tmp_path / "VideoRewardLoRA"
    os.makedirs(folder / "checkpoint-3")
    shutil.copy(os.path.join(path, "model_config.json"), folder / "model_config.json")
    save_file(lora, str(folder / "checkpoint-3" / "adapter_model.safetensors"))
    json.dump({"r": r_, "lora_alpha": alpha, "use_rslora": False}, open(folder / "checkpoint-3" / "adapter_config.json", "w"))
    emb = sd["model.language_model.embed_tokens.weight"]
    torch.save({"base_model.model.rm_head.weight": rm_head, "base_model.model.model.embed_tokens.weight": emb}, folder / "checkpoint-3" / "non_lora_state_dict.pth")
    full = tmp_path / "VideoRewardFull"
    os.makedirs(full / "checkpoint-3")
    shutil.copy(os.path.join(path, "model_config.json"), full / "model_config.json")
    merged_model = type(model)(model.config)
    merged_model.load_state_dict(merged)
    torch.save(_legacy_state(merged_model, rm_head), full / "checkpoint-3" / "model.pth")

    # the base folder's weights are the un-resized tiny model: the LoRA path loads them, then resizes
    videos = _videos(b=2, t=6, h=56, w=56, seed=4)
    batch = {"caption": CAPTIONS}
    a = VideoAlignReward(str(folder), base_model=base, video_fps=8.0).score(videos, batch)
    b = VideoAlignReward(str(full), base_model=base, video_fps=8.0).score(videos, batch)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    plain = VideoAlignReward(path, base_model=base, video_fps=8.0).score(videos, batch)
    assert not torch.allclose(a, plain, atol=1e-3)  # the adapter changed the scores


def test_videoalign_names_missing_files_and_needs_the_frame_rate(tiny_videoreward, tmp_path):
    import json
    import shutil

    from lightning_vidalign.rewards.models import MissingRewardFileError, VideoAlignReward

    path, base, _, _ = tiny_videoreward
    with pytest.raises(MissingRewardFileError, match="model_config.json"):
        VideoAlignReward(str(tmp_path))
    with pytest.raises(MissingRewardFileError, match="Qwen/Qwen2-VL-2B-Instruct"):
        VideoAlignReward(path)  # the config's hub name is not a local folder
    with pytest.raises(MissingRewardFileError, match="checkpoint-99"):
        VideoAlignReward(path, base_model=base, checkpoint_step=99)
    lora = tmp_path / "lora"
    os.makedirs(lora / "checkpoint-1")
    shutil.copy(os.path.join(path, "model_config.json"), lora / "model_config.json")
    open(lora / "checkpoint-1" / "adapter_model.safetensors", "w").close()
    with pytest.raises(MissingRewardFileError, match="non_lora_state_dict.pth"):
        VideoAlignReward(str(lora), base_model=base)
    nobase = tmp_path / "base_without_weights"
    shutil.copytree(base, nobase)
    os.remove(nobase / "model.safetensors")
    open(lora / "checkpoint-1" / "adapter_config.json", "w").write(json.dumps({"r": 1, "lora_alpha": 1}))
    torch.save({}, lora / "checkpoint-1" / "non_lora_state_dict.pth")
    with pytest.raises(MissingRewardFileError, match="needs the base model's weights"):
        VideoAlignReward(str(lora), base_model=str(nobase))
    r = VideoAlignReward(path, base_model=base)  # a full checkpoint needs no base weights, but fps sampling needs the video fps
    with pytest.raises(ValueError, match="frame rate"):
        r.score(_videos(t=9), {"caption": CAPTIONS})


# ------------------------------------------------------------- VLM judge against a real HTTP server
class _JudgeServer:
    """A stdlib HTTP server on loopback answering ``POST /v1/chat/completions`` in the OpenAI chat format.

    ``mode``: ``"ok"`` replies ``"Score: s"`` with ``s`` = 1 + 9·(mean brightness of the images) so the
    score depends on what was sent; ``"garbage"`` an unparsable reply; ``"slow"`` sleeps past the client's
    timeout; ``"flaky"`` fails the first request with HTTP 503. Requests are recorded."""

    def __init__(self):
        import http.server
        import threading

        self.mode, self.requests, self.lock = "ok", [], threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                import base64
                import io
                import json
                import time

                from PIL import Image

                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.requests.append((self.path, body))
                    n = len(outer.requests)
                if outer.mode == "slow":
                    time.sleep(1.0)
                if outer.mode == "flaky" and n == 1:
                    self.send_response(503)
                    self.end_headers()
                    self.wfile.write(b"busy")
                    return
                parts = body["messages"][-1]["content"]
                imgs = [np.asarray(Image.open(io.BytesIO(base64.b64decode(p["image_url"]["url"].split(",", 1)[1])))) for p in parts if p["type"] == "image_url"]
                text = "I cannot rate this video." if outer.mode == "garbage" else f"Score: {1 + 9 * float(np.mean([i.mean() for i in imgs])) / 255:.6f}"
                out = json.dumps({"id": "x", "object": "chat.completion", "model": body["model"],
                                  "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(out)))
                    self.end_headers()
                    self.wfile.write(out)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def judge_server():
    server = _JudgeServer()
    yield server
    server.close()


def test_vlm_judge_sends_frames_and_caption_and_parses_the_score(judge_server):
    import base64
    import io

    from PIL import Image

    from lightning_vidalign.rewards.models import VLMJudgeReward

    judge = VLMJudgeReward(judge_server.url, model="tiny-judge", num_frames=3, concurrency=2)
    videos = _videos(b=2, t=5, h=16, w=24)
    videos[1] *= 0.2  # darker: a lower score from this server
    got = judge.score(videos, {"caption": CAPTIONS})
    u8 = (videos * 255).round()
    want = 1 + 9 * u8[:, [0, 2, 4]].mean(dim=(1, 2, 3, 4)) / 255  # PNG is lossless
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert len(judge_server.requests) == 2
    by_caption = {}
    for path, body in judge_server.requests:
        assert path == "/v1/chat/completions" and body["model"] == "tiny-judge" and body["temperature"] == 0.0
        content = body["messages"][0]["content"]
        assert content[0]["type"] == "text" and [p["type"] for p in content[1:]] == ["image_url"] * 3
        img = Image.open(io.BytesIO(base64.b64decode(content[1]["image_url"]["url"].split(",", 1)[1])))
        assert img.size == (24, 16) and img.format == "PNG"
        by_caption[[c for c in CAPTIONS if f'"{c}"' in content[0]["text"]][0]] = content
    assert set(by_caption) == set(CAPTIONS)  # each request carries its own video's caption
    small = VLMJudgeReward(judge_server.url, model="m", num_frames=1, max_side=8, image_format="jpeg")
    body = small.request_body(to_uint8_frames(videos)[0, :1], "c")
    img = Image.open(io.BytesIO(base64.b64decode(body["messages"][0]["content"][1]["image_url"]["url"].split(",", 1)[1])))
    assert img.size == (8, 5) and img.format == "JPEG"


def to_uint8_frames(videos):
    from lightning_vidalign.rewards.models import to_uint8

    return to_uint8(videos)


def test_vlm_judge_unparsable_reply_timeout_retries_and_a_dead_server(judge_server):
    import socket
    import time

    from lightning_vidalign.rewards.models import VLMJudgeParseError, VLMJudgeRequestError, VLMJudgeReward

    videos, batch = _videos(b=1, t=2, h=8, w=8), {"caption": CAPTIONS[:1]}
    judge_server.mode = "garbage"
    with pytest.raises(VLMJudgeParseError, match="I cannot rate this video"):
        VLMJudgeReward(judge_server.url, model="m", num_frames=1).score(videos, batch)
    judge_server.mode = "slow"
    n0 = len(judge_server.requests)
    t = time.perf_counter()
    with pytest.raises(VLMJudgeRequestError, match=r"failed 2 times.*timeout"):
        VLMJudgeReward(judge_server.url, model="m", num_frames=1, timeout=0.2, max_retries=1, retry_backoff=0.01).score(videos, batch)
    assert time.perf_counter() - t < 1.5 and len(judge_server.requests) - n0 == 2  # bounded: 2 attempts, not the server's 1 s each
    judge_server.mode, judge_server.requests = "flaky", []
    r = VLMJudgeReward(judge_server.url, model="m", num_frames=1, max_retries=1, retry_backoff=0.01).score(videos, batch)
    assert len(judge_server.requests) == 2 and 1 <= float(r) <= 10  # the 503 was retried
    judge_server.mode = "ok"
    with pytest.raises(VLMJudgeParseError, match="outside"):
        VLMJudgeReward(judge_server.url, model="m", num_frames=1, score_range=(0, 0.5)).score(videos, batch)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    with pytest.raises(VLMJudgeRequestError, match="failed 3 times"):
        VLMJudgeReward(dead, model="m", num_frames=1, max_retries=2, retry_backoff=0.01).score(videos, batch)
    with pytest.raises(ValueError, match="caption"):
        VLMJudgeReward(judge_server.url, model="m", prompt_template="no placeholder")


# ------------------------------------------------------------- the configs/rewards fragments, one GRPO step each
FRAGMENTS = sorted(os.path.basename(p) for p in os.listdir(os.path.join(ROOT, "configs", "rewards")) if p.endswith(".yaml"))


@pytest.mark.parametrize("fragment", FRAGMENTS)
def test_reward_fragment_trains_one_grpo_round(fragment, request, tmp_path, monkeypatch):
    """``vidalign fit --config configs/sage_grpo.yaml --config configs/rewards/<fragment>`` with the model
    paths overridden on the command line to tiny saved instances (the VLM judge: a loopback server): one
    round, scored by that reward only, logged finite."""
    import math

    from lightning_vidalign.cli import VidAlignCLI

    name = fragment[: -len(".yaml")]
    server = None
    if name in ("clip_score", "pickscore"):
        folder = request.getfixturevalue("tiny_clip")
        extra = [f"--trainer.callbacks.path={folder}"] + ([f"--trainer.callbacks.processor_path={folder}"] if name == "pickscore" else [])
    elif name == "hps":
        ckpt, arch = request.getfixturevalue("tiny_hps")
        extra = [f"--trainer.callbacks.checkpoint={ckpt}", f"--trainer.callbacks.arch={arch}"]
    elif name == "videoalign":
        path, base, _, _ = request.getfixturevalue("tiny_videoreward")
        extra = [f"--trainer.callbacks.path={path}", f"--trainer.callbacks.base_model={base}", "--trainer.callbacks.dtype=float32"]
    elif name == "vlm_judge":
        server = _JudgeServer()
        extra = [f"--trainer.callbacks.base_url={server.url}", "--trainer.callbacks.model=tiny-judge"]
    elif name == "remote":  # a served reward end to end: the tiny CLIP score behind `vidalign serve-reward` (LitServe) on loopback
        from lightning_vidalign.rewards import RewardServer

        server = RewardServer({"class_path": "lightning_vidalign.rewards.CLIPScoreReward", "init_args": {"path": request.getfixturevalue("tiny_clip")}}).start()
        server.close = server.stop
        extra = [f"--trainer.callbacks.url={server.url}"]
    else:
        raise AssertionError(f"configs/rewards/{fragment}: no tiny instance for it in this test")
    monkeypatch.chdir(tmp_path)
    try:
        cli = VidAlignCLI(args=[
            "fit", "--config", os.path.join(ROOT, "configs", "sage_grpo.yaml"), "--config", os.path.join(ROOT, "configs", "rewards", fragment),
            "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0", "--trainer.logger", "false", "--trainer.accelerator", "cpu",
            "--trainer.default_root_dir", str(tmp_path), "--data.captions", os.path.join(ROOT, "configs", "data", "skvideo_captions.jsonl"),
            "--model.num_inference_steps", "2", *extra,
        ])
    finally:
        if server is not None:
            server.close()
    assert cli.model.reward_names == [name] and cli.model.updates == cli.model.minibatches_per_round
    metrics = cli.trainer.callback_metrics
    assert f"reward/{name}/mean" in metrics and math.isfinite(float(metrics[f"reward/{name}/mean"]))
    assert "reward/motion/mean" not in metrics  # the config's own rewards are not scored
    if name == "vlm_judge":
        assert len(server.requests) == 8  # 2 conditions x 4 rollouts, one request each
    if name == "remote":  # the round's 2 x 4 rollouts, in two chunks scored while generating (overlap_rewards)
        remote = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "RemoteReward")
        assert [c["videos"] for c in remote.recent_calls] == [4, 4] and all(c["batch"]["videos"] == 4 for c in remote.recent_calls)
    if name in ("remote", "vlm_judge"):
        assert cli.model.overlap_rewards
