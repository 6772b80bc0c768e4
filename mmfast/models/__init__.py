"""Single-device model code for the three paradigms (so far: the CLIP / SigLIP dual encoder, and a small
causal language model over captions)."""
from mmfast.models.caption_lm import CaptionLM, CaptionLMConfig
from mmfast.models.clip import CLIP, ClipConfig, TextConfig, VisionConfig, clip_config
from mmfast.models.convert import from_hf_clip, from_open_clip

__all__ = ["CLIP", "CaptionLM", "CaptionLMConfig", "ClipConfig", "TextConfig", "VisionConfig", "clip_config", "from_hf_clip",
           "from_open_clip"]
