"""Policies (``VideoBackbone``) wrapping diffusers video models."""
from lightning_vidalign.backbones.base import VideoBackbone
from lightning_vidalign.backbones.hunyuan_video15 import HUNYUAN15_ATTN_LORA, HunyuanVideo15Backbone, tiny_hunyuan15_components
from lightning_vidalign.backbones.svd import SVD_TEMPORAL_ATTN_LORA, SVDBackbone, tiny_svd_components
from lightning_vidalign.backbones.wan import WAN_ATTN_LORA, WanBackbone, tiny_wan_components

__all__ = ["VideoBackbone", "SVDBackbone", "SVD_TEMPORAL_ATTN_LORA", "tiny_svd_components", "WanBackbone", "WAN_ATTN_LORA", "tiny_wan_components", "HunyuanVideo15Backbone", "HUNYUAN15_ATTN_LORA", "tiny_hunyuan15_components"]
