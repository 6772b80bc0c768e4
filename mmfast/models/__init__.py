"""Single-device model code for the three paradigms (so far: the CLIP / SigLIP dual encoder)."""
from mmfast.models.clip import CLIP, ClipConfig, TextConfig, VisionConfig, clip_config
from mmfast.models.convert import from_hf_clip, from_open_clip

__all__ = ["CLIP", "ClipConfig", "TextConfig", "VisionConfig", "clip_config", "from_hf_clip", "from_open_clip"]
