"""Single-device model code for the three paradigms (so far: the CLIP / SigLIP dual encoder, a small
causal language model over captions, the Llama / Qwen2 decoder the LLaVA-style model builds on, and the
AST audio, Whisper speech and VideoMAE video encoders, masked autoencoders for images, video and audio,
and a masked language model for the text tower)."""
from mmfast.models.audio import AudioConfig, AudioEncoder, from_hf_ast
from mmfast.models.caption_lm import CaptionLM, CaptionLMConfig
from mmfast.models.clip import CLIP, ClipConfig, TextConfig, VisionConfig, clip_config
from mmfast.models.convert import from_hf_clip, from_open_clip
from mmfast.models.llama import LlamaConfig, LlamaForCausalLM, from_hf_causal_lm, to_hf_causal_lm
from mmfast.models.mae import MaeConfig, MaskedAutoencoder, VideoMaeConfig, VideoMaskedAutoencoder
from mmfast.models.masked_text import MaskedLanguageModel, MlmConfig
from mmfast.models.speech import SpeechConfig, SpeechEncoder, from_hf_whisper
from mmfast.models.video import VideoConfig, VideoEncoder, from_hf_videomae, sample_frames

__all__ = ["AudioConfig", "AudioEncoder", "CLIP", "CaptionLM", "CaptionLMConfig", "ClipConfig", "LlamaConfig",
           "LlamaForCausalLM", "MaeConfig", "MaskedAutoencoder", "MaskedLanguageModel", "MlmConfig",
           "SpeechConfig", "SpeechEncoder", "TextConfig", "VideoConfig", "VideoEncoder",
           "VideoMaeConfig", "VideoMaskedAutoencoder", "VisionConfig", "clip_config", "from_hf_ast", "from_hf_causal_lm", "from_hf_clip", "from_hf_videomae",
           "from_hf_whisper", "from_open_clip", "sample_frames", "to_hf_causal_lm"]
