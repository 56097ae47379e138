"""Issue 32: every zoo model (``configs/models/``) and every reference recipe (``configs/real/``) runs through ``vidalign
fit`` as its ``# Launch:`` line writes it, on a folder laid out as the Hub's (:mod:`real_layout`, ``small`` scale),
with only resolution / frames / steps / group overrides; ``vidalign check-model`` on a good folder and on broken ones;
the pipelines' text states and first velocity at a prompt of more than 100 tokens.

``-m slow`` runs the same on ``real``-scale folders (every width of the real configuration, fewer layers; see
:mod:`real_layout`)."""
import glob
import json
import os
import shlex
import subprocess
import sys
import time

import pytest
import torch
import yaml

from lightning_vidalign.cli import main
from real_layout import LONG_PROMPT, MODELS, write_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ZOO = sorted(glob.glob(os.path.join(ROOT, "configs", "models", "*.yaml")))
RECIPES = sorted(glob.glob(os.path.join(ROOT, "configs", "real", "*.yaml")))

#: the small sizes every run uses (the allowed overrides: resolution, frames, steps)
SIZE = ["--data.init_args.height", "64", "--data.init_args.width", "64", "--data.init_args.num_frames", "9", "--model.init_args.num_inference_steps", "2",
        "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0"]
#: group overrides per recipe (rollouts per prompt and the batch sizes that must divide them), and what else a recipe needs
#: here: SAGE-GRPO's sequence parallelism 2 needs 2 processes (CPU, gloo); ViPO's DINOv2 weights are the user's local
#: file, replaced by random weights (the run refuses to start without one); SHIFT runs 1 of its 10 passes
RECIPE_OVERRIDES = {
    "flow_grpo_wan2.1_t2v_1.3b": "--model.init_args.rollouts_per_condition 2 --model.init_args.rollout_batch_size 4 --model.init_args.train_batch_size 4",
    "cps_grpo_wan2.1_t2v_1.3b": "--model.init_args.rollouts_per_condition 2 --model.init_args.rollout_batch_size 4 --model.init_args.train_batch_size 4 "
                                "--model.init_args.num_inference_steps 6",
    "dance_grpo_wan2.1_t2v_1.3b": "--model.init_args.rollouts_per_condition 2 --model.init_args.rollout_batch_size 4 --model.init_args.train_batch_size 4",
    "dance_grpo_hunyuanvideo1.5_480p_t2v": "--model.init_args.rollouts_per_condition 2 --model.init_args.rollout_batch_size 2",
    "sage_grpo_hunyuanvideo1.5_480p_t2v": "--model.init_args.rollouts_per_condition 2 --trainer.accelerator cpu --trainer.devices 2",
    "shift_svd_xt": "--model.init_args.rollouts_per_condition 2 --model.init_args.passes 1 --data.init_args.batch_size 1 --data.init_args.num_frames 8",
    "dpo_wan2.1_t2v_1.3b": "",
    "bpgo_wan2.1_t2v_1.3b": "--model.init_args.rollouts_per_condition 2 --model.init_args.rollout_batch_size 2",
    "vipo_wan2.1_t2v_1.3b": "--model.init_args.rollouts_per_condition 2 --model.init_args.rollout_batch_size 2 "
                            "--model.init_args.perceptual_backbone.init_args.random_init true",
    "self_paced_grpo_wan2.1_t2v_1.3b": "--model.init_args.rollouts_per_condition 2 --model.init_args.rollout_batch_size 2",
}
#: the method config each zoo model's Launch line pairs it with: the group there is 4 rollouts; SVD/SHIFT passes 1
ZOO_OVERRIDES = {"svd_xt": "--model.init_args.rollouts_per_condition 2 --model.init_args.passes 1 --data.init_args.num_frames 8",
                 "hunyuanvideo1.5_480p_t2v": "--model.init_args.rollouts_per_condition 2 --model.init_args.rollout_batch_size 4 --model.init_args.train_batch_size 4",
                 "hunyuanvideo1.5_480p_i2v": "--model.init_args.rollouts_per_condition 2 --model.init_args.rollout_batch_size 4 --model.init_args.train_batch_size 4"}


def launch_args(config: str, folder: str) -> list[str]:
    """The arguments of a config's ``# Launch: vidalign ...`` line, configs made absolute and ``DIR`` replaced by ``folder``."""
    with open(config) as f:
        first = f.readline()
    assert first.startswith("# Launch: vidalign fit "), f"{config}: first line must be its launch command"
    words = shlex.split(first[len("# Launch: vidalign "):].split("  (")[0])
    out = []
    for i, w in enumerate(words):
        if i and words[i - 1] == "--config":
            w = os.path.join(ROOT, w)
        out.append(folder if w == "DIR" else w)
    return out


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The small real-layout folder of every zoo model (written once for the module)."""
    root = tmp_path_factory.mktemp("real_layout")
    return {m: write_model(str(root / m), m, "small") for m in MODELS}


def test_every_zoo_model_and_recipe_is_listed():
    assert sorted(os.path.splitext(os.path.basename(c))[0] for c in ZOO) == sorted(MODELS)
    assert sorted(os.path.splitext(os.path.basename(r))[0] for r in RECIPES) == sorted(RECIPE_OVERRIDES)


@pytest.mark.parametrize("config", ZOO, ids=[os.path.basename(c) for c in ZOO])
def test_zoo_model_runs_through_the_cli(config, folders, tmp_path, monkeypatch):
    name = os.path.splitext(os.path.basename(config))[0]
    monkeypatch.chdir(tmp_path)
    args = launch_args(config, folders[name]) + SIZE + shlex.split(ZOO_OVERRIDES.get(name, "")) + ["--trainer.default_root_dir", str(tmp_path / "run")]
    t0 = time.perf_counter()
    main(args)
    print(f"{name}: vidalign fit 1 step in {time.perf_counter() - t0:.1f} s")
    assert os.path.isfile(tmp_path / "run" / "checkpoints" / "last.ckpt") or glob.glob(str(tmp_path / "run" / "lora" / "*.safetensors"))


def _recipe_model(config: str) -> str:
    """The zoo model of a recipe: its file name ends with the model's (``<method>_<model>.yaml``)."""
    name = os.path.splitext(os.path.basename(config))[0]
    return next(m for m in MODELS if name.endswith("_" + m))


@pytest.mark.parametrize("config", RECIPES, ids=[os.path.basename(r) for r in RECIPES])
def test_reference_recipe_runs_through_the_cli(config, folders, tmp_path):
    """Each recipe as its Launch line writes it, in a subprocess (``vidalign`` as a user runs it; SAGE-GRPO's two
    sequence-parallel processes need a command to relaunch)."""
    name = os.path.splitext(os.path.basename(config))[0]
    model = _recipe_model(config)
    args = launch_args(config, folders[model]) + SIZE + shlex.split(RECIPE_OVERRIDES[name]) + ["--trainer.default_root_dir", str(tmp_path / "run")]
    t0 = time.perf_counter()
    # a fresh rendezvous: Lightning leaves MASTER_PORT etc. in this process's environment after the in-process runs
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "LOCAL_WORLD_SIZE")}
    proc = subprocess.run([os.path.join(os.path.dirname(sys.executable), "vidalign"), *args], cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    print(f"{name} on {model}: vidalign fit 1 step in {time.perf_counter() - t0:.1f} s")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "settings (" in proc.stdout + proc.stderr  # the checkpoint's settings are printed at the start


def test_recipes_cite_their_sources_and_state_gpus_and_memory():
    for config in RECIPES + ZOO:
        with open(config) as f:
            text = f.read()
        assert "GPUs assumed:" in text, config
        assert "vidalign estimate" in text or "not modelled by `vidalign estimate`" in text, config
        cfg = yaml.safe_load(text)
        placeholder = cfg["model"]["init_args"]["backbone"]["init_args"]["pretrained_path"]
        assert placeholder.startswith("<set: ") and placeholder.endswith(">"), config
    for config in RECIPES:  # every setting of the method carries a source comment (or says "ours"/"our choice")
        with open(config) as f:
            lines = f.read().split("\n")
        body = lines[next(i for i, l in enumerate(lines) if l.startswith("model:")):]
        for key in ("lr:", "clip_range:", "rollouts_per_condition:", "num_inference_steps:", "beta:", "lam:"):
            for line in body:
                if line.strip().startswith(key):
                    assert "#" in line, f"{config}: {line.strip()} has no source"


def test_zoo_and_recipe_memory_figures_are_the_estimates():
    """The per-GPU figures in the zoo and recipe headers are what ``memory.estimate_setting`` gives for those settings."""
    from lightning_vidalign.memory import REAL_MODELS, ModelSpec, estimate_setting

    wan = dict(patch_size=(1, 2, 2), attention_head_dim=128, freq_dim=256, text_dim=4096, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6)
    ti2v = ModelSpec("Wan 2.2 TI2V 5B", "wan", {**wan, "num_attention_heads": 24, "ffn_dim": 14336, "num_layers": 30, "in_channels": 48, "out_channels": 48},
                     "diffusers scripts/convert_wan_to_diffusers.py", 16, 4, 512)
    cases = {"wan2.1_t2v_1.3b": (REAL_MODELS["wan2.1-1.3b"], 480, 832, 81, 1, "7.7"), "wan2.1_t2v_14b": (REAL_MODELS["wan2.1-14b"], 480, 832, 81, 1, "31.3"),
             "wan2.2_ti2v_5b": (ti2v, 704, 1280, 121, 1, "13.7"), "wan2.2_t2v_a14b": (REAL_MODELS["wan2.1-14b"], 480, 832, 81, 2, "61.2"),
             "hunyuanvideo1.5_480p_t2v": (REAL_MODELS["hunyuanvideo1.5"], 480, 848, 121, 1, "25.5")}
    for name, (spec, h, w, t, experts, figure) in cases.items():
        est = estimate_setting(spec, h, w, t, 8, 80.0, 32, 1, True, "lora", experts)
        assert f"{est['total_GB']:.1f}" == figure, (name, est["total_GB"])
        with open(os.path.join(ROOT, "configs", "models", f"{name}.yaml")) as f:
            assert f"{figure} GB/GPU" in f.read(), name
    w13, hy = REAL_MODELS["wan2.1-1.3b"], REAL_MODELS["hunyuanvideo1.5"]
    recipes = {"flow_grpo_wan2.1_t2v_1.3b": (w13, 240, 416, 33, 1, 1, "lora", "4.1"), "cps_grpo_wan2.1_t2v_1.3b": (w13, 240, 416, 33, 1, 1, "lora", "4.1"),
               "dance_grpo_wan2.1_t2v_1.3b": (w13, 512, 512, 33, 8, 1, "full", "5.2"), "dance_grpo_hunyuanvideo1.5_480p_t2v": (hy, 480, 480, 53, 32, 1, "full", "10.1"),
               "sage_grpo_hunyuanvideo1.5_480p_t2v": (hy, 480, 848, 81, 8, 2, "full", "26.1"), "dpo_wan2.1_t2v_1.3b": (w13, 480, 832, 49, 8, 1, "full", "7.8"),
               "bpgo_wan2.1_t2v_1.3b": (w13, 480, 832, 49, 8, 1, "full", "7.8"), "vipo_wan2.1_t2v_1.3b": (w13, 480, 832, 49, 8, 1, "full", "7.8"),
               "self_paced_grpo_wan2.1_t2v_1.3b": (w13, 480, 832, 49, 8, 1, "full", "7.8")}
    for name, (spec, h, w, t, gpus, sp, finetune, figure) in recipes.items():
        assert f"{estimate_setting(spec, h, w, t, gpus, 80.0, 32, sp, True, finetune)['total_GB']:.1f}" == figure, name
        with open(os.path.join(ROOT, "configs", "real", f"{name}.yaml")) as f:
            assert f"{figure} GB/GPU" in f.read(), name


# ------------------------------------------------------------------------------------------- check-model
def test_check_model_on_a_good_folder(folders, capsys):
    main(["check-model", folders["wan2.1_t2v_1.3b"], "--config", "flow_grpo", "--config", "models/wan2.1_t2v_1.3b", "--gpus", "8"])
    out = capsys.readouterr().out
    print(out)
    assert "WanPipeline (model_index.json) -> WanBackbone" in out and "ok: the folder is complete" in out
    assert "max_sequence_length       512" in out and "WanPipeline.__call__ default" in out
    assert "text_encoder       UMT5EncoderModel" in out and " shards" in out.split("transformer ")[1].split("\n")[0]
    assert "memory estimate" in out and "8 GPU(s) x 80 GB" in out


def _set_json(path: str, key: str, value) -> None:
    with open(path) as f:
        data = json.load(f)
    data[key] = value
    with open(path, "w") as f:
        json.dump(data, f)


def _copy(folder, tmp_path, name):
    import shutil

    dst = str(tmp_path / name)
    shutil.copytree(folder, dst)
    return dst


@pytest.mark.parametrize("broken", ["missing shard", "truncated download", "missing tokenizer", "tokenizer that does not load", "wrong transformer class",
                                    "wrong pipeline"])
def test_check_model_names_the_first_problem(broken, folders, tmp_path, capsys):
    folder = _copy(folders["wan2.1_t2v_1.3b"], tmp_path, "wan")
    if broken == "missing shard":
        shard = sorted(glob.glob(os.path.join(folder, "transformer", "*-00002-of-*.safetensors")))[0]
        os.remove(shard)
        expected = f"transformer: missing shard {shard}"
    elif broken == "truncated download":
        path = os.path.join(folder, "vae", "diffusion_pytorch_model.safetensors")
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        expected = f"vae: {path}: truncated: "
    elif broken == "missing tokenizer":
        import shutil

        shutil.rmtree(os.path.join(folder, "tokenizer"))
        expected = f"tokenizer: missing folder {folder}/tokenizer"
    elif broken == "tokenizer that does not load":
        with open(os.path.join(folder, "tokenizer", "tokenizer.json"), "w") as f:
            f.write("{not json")
        expected = "tokenizer: the tokenizer in"
    elif broken == "wrong transformer class":
        _set_json(os.path.join(folder, "transformer", "config.json"), "_class_name", "HunyuanVideo15Transformer3DModel")
        expected = "transformer/config.json is a HunyuanVideo15Transformer3DModel; the backbone needs WanTransformer3DModel"
    else:
        _set_json(os.path.join(folder, "model_index.json"), "_class_name", "CogVideoXPipeline")
        expected = "pipeline 'CogVideoXPipeline' is not one the backbones load"
    with pytest.raises(SystemExit) as exit_info:
        main(["check-model", folder])
    captured = capsys.readouterr()
    print(captured.out + captured.err)
    assert exit_info.value.code == 2
    assert captured.err.startswith("vidalign check-model: ") and expected in captured.err.splitlines()[0]


def test_placeholder_path_is_refused_naming_the_option(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "flow_grpo", "--config", "models/wan2.1_t2v_1.3b", "--trainer.max_steps", "1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "model-zoo placeholder '<set: local folder of Wan-AI/Wan2.1-T2V-1.3B-Diffusers>'" in err and "--model.init_args.backbone.init_args.pretrained_path" in err


# ------------------------------------------------------------------------------------------- parity
def test_wan_text_states_and_first_velocity_equal_the_pipeline_at_100_plus_tokens(folders):
    from diffusers import WanPipeline

    from lightning_vidalign.backbones import WanBackbone

    folder = folders["wan2.1_t2v_1.3b"]
    pipe = WanPipeline.from_pretrained(folder, local_files_only=True)
    bb = WanBackbone(pretrained_path=folder)
    n_tokens = len(pipe.tokenizer(LONG_PROMPT).input_ids)
    assert n_tokens >= 100 and bb.max_sequence_length == 512
    # as WanPipeline.__call__ calls it (its max_sequence_length 512; encode_prompt alone defaults to 226)
    theirs, theirs_neg = pipe.encode_prompt(LONG_PROMPT, negative_prompt="", do_classifier_free_guidance=True, device="cpu", max_sequence_length=512)
    cond = bb.encode_condition({"caption": [LONG_PROMPT]})
    err = (cond["prompt_embeds"] - theirs.float()).abs().max().item()
    err_neg = (cond["negative_prompt_embeds"] - theirs_neg.float()).abs().max().item()
    x = torch.randn(1, 3, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([999.0])
    v_pipe = pipe.transformer(x.permute(0, 2, 1, 3, 4), t, encoder_hidden_states=theirs, return_dict=False)[0].permute(0, 2, 1, 3, 4)
    v_ours = bb.predict(x, t / 1000, cond)
    err_v = (v_ours - v_pipe).abs().max().item()
    print(f"Wan real layout, {n_tokens} tokens: max |text states - pipeline| = {err:.1e} (negative {err_neg:.1e}); first velocity {err_v:.1e}")
    assert err <= 1e-5 and err_neg <= 1e-5 and err_v <= 1e-5


@pytest.mark.parametrize("model", ["hunyuanvideo1.5_480p_t2v"])
def test_hunyuan_text_states_and_first_velocity_equal_the_pipeline_at_100_plus_tokens(model, folders):
    from diffusers import HunyuanVideo15Pipeline

    from lightning_vidalign.backbones import HunyuanVideo15Backbone

    folder = folders[model]
    pipe = HunyuanVideo15Pipeline.from_pretrained(folder, local_files_only=True)
    bb = HunyuanVideo15Backbone(pretrained_path=folder)
    n_tokens = len(pipe.tokenizer(LONG_PROMPT).input_ids)
    assert n_tokens >= 100 and (bb.max_sequence_length, bb.max_sequence_length_2) == (1000, 256)
    assert bb.default_setting("guidance") == pipe.guider.guidance_scale == 6.0
    embeds, mask, embeds_2, mask_2 = pipe.encode_prompt(LONG_PROMPT, device="cpu")
    cond = bb.encode_condition({"caption": [LONG_PROMPT]})
    errs = [(cond["prompt_embeds"] - embeds.float()).abs().max().item(), (cond["prompt_embeds_2"] - embeds_2.float()).abs().max().item()]
    assert torch.equal(cond["prompt_mask"], mask.long()) and torch.equal(cond["prompt_mask_2"], mask_2.long())
    x = torch.randn(1, 3, 8, 4, 4, generator=torch.Generator().manual_seed(0))
    hidden = torch.cat([x.permute(0, 2, 1, 3, 4), torch.zeros_like(x.permute(0, 2, 1, 3, 4)), torch.zeros(1, 1, 3, 4, 4)], dim=1)
    image = torch.zeros(1, 729, pipe.transformer.config.image_embed_dim)
    v_pipe = pipe.transformer(hidden_states=hidden, timestep=torch.tensor([1000.0]), image_embeds=image, encoder_hidden_states=embeds,
                              encoder_attention_mask=mask, encoder_hidden_states_2=embeds_2, encoder_attention_mask_2=mask_2, return_dict=False)[0]
    err_v = (bb.predict(x, torch.tensor([1.0]), cond) - v_pipe.permute(0, 2, 1, 3, 4)).abs().max().item()
    print(f"HunyuanVideo 1.5 real layout, {n_tokens} tokens: max |MLLM states - pipeline| = {errs[0]:.1e}, ByT5 {errs[1]:.1e}; first velocity {err_v:.1e}")
    assert max(errs) <= 1e-5 and err_v <= 1e-5


# ---------------------------------------------------------------------------------------------- slow: real widths
@pytest.mark.slow
@pytest.mark.parametrize("config", ZOO, ids=[os.path.basename(c) for c in ZOO])
def test_zoo_model_runs_on_a_real_width_folder(config, tmp_path, monkeypatch):
    """The same CLI run on a ``real``-scale folder: every width of the real configuration (fewer layers, see
    :mod:`real_layout`), bf16 compute as the zoo config sets it."""
    name = os.path.splitext(os.path.basename(config))[0]
    folder = write_model(str(tmp_path / name), name, "real")
    monkeypatch.chdir(tmp_path)
    args = launch_args(config, folder) + SIZE + shlex.split(ZOO_OVERRIDES.get(name, "")) + ["--trainer.default_root_dir", str(tmp_path / "run")]
    t0 = time.perf_counter()
    main(args)
    print(f"{name} (real widths): vidalign fit 1 step in {time.perf_counter() - t0:.1f} s")


def test_check_model_names_a_mode_the_folder_cannot_run_and_a_missing_variant(folders, tmp_path, capsys):
    # configs/flow_grpo.yaml alone trains the demo's Wan 2.2-style ti2v: a Wan 2.1 folder is text-to-video
    with pytest.raises(SystemExit):
        main(["check-model", folders["wan2.1_t2v_1.3b"], "--config", "flow_grpo"])
    assert "the config's mode is ti2v, but this folder is text-to-video" in capsys.readouterr().err
    # an SVD folder holding only fp16 files (the Hub repo has both) without `variant: fp16`
    folder = _copy(folders["svd_xt"], tmp_path, "svd")
    os.rename(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"), os.path.join(folder, "unet", "diffusion_pytorch_model.fp16.safetensors"))
    with pytest.raises(SystemExit):
        main(["check-model", folder])
    assert "unet: no weight file (*.safetensors or *.bin) of no variant (set backbone variant, e.g. fp16" in capsys.readouterr().err


def test_fit_names_a_folder_that_does_not_load_and_a_zoo_config_given_first(folders, tmp_path, monkeypatch, capsys):
    """A truncated weight file stops ``fit`` with one line naming the folder and check-model (not a parser dump); a zoo
    config given as the first --config is refused naming the order; check-model with it alone names the missing method."""
    folder = _copy(folders["wan2.1_t2v_1.3b"], tmp_path, "wan")
    path = os.path.join(folder, "vae", "diffusion_pytorch_model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(launch_args(os.path.join(ROOT, "configs", "models", "wan2.1_t2v_1.3b.yaml"), folder) + SIZE)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "CheckpointLoadError: Wan checkpoint in" in err and f"vidalign check-model {folder}" in err
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "models/wan2.1_t2v_1.3b", "--config", "flow_grpo"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "is a model-zoo config (a backbone, no method): give it as the SECOND --config" in err
    with pytest.raises(SystemExit):
        main(["check-model", folders["wan2.1_t2v_1.3b"], "--config", "models/wan2.1_t2v_1.3b"])
    assert "the configs name no method (model.class_path)" in capsys.readouterr().err
