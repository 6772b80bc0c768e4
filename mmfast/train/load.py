"""A finished run back from its directory: `mmfast.load` (any task) and `mmfast.load_clip` (the CLIP
form, open_clip style); `export_run` consolidates a checkpoint into model.pt first where needed."""
from __future__ import annotations

import json
import os

import torch

from mmfast.train import checkpoint
from mmfast.train.config import load_config
from mmfast.train.files import load_tensors
from mmfast.train.tasks import TASKS, build_task


def export_run(run_dir: str, step: int | None = None) -> str:
    """Consolidates a run's checkpoint (the latest, or the one taken after `step`), whatever engine
    wrote it, into <run_dir>/model.pt; returns its path."""
    checkpoints = os.path.join(run_dir, "checkpoints")
    folder = checkpoint.latest(checkpoints) if step is None else os.path.join(checkpoints,
                                                                               checkpoint.folder_name(step))
    if folder is None or not os.path.isdir(folder):
        raise FileNotFoundError(f"export: {run_dir} has no checkpoint" + (f" of step {step}" if step else ""))
    task = build_task(load_config(path=os.path.join(run_dir, "config.yaml")))
    task.restore(run_dir)
    return task.export(run_dir, folder)


def final_stage(path: str) -> str:
    """The last stage's directory of a multi-stage run (its stages.json), else `path` itself."""
    listing = os.path.join(path, "stages.json")
    if os.path.isdir(path) and os.path.exists(listing):
        with open(listing) as handle:
            return os.path.join(path, json.load(handle)["stages"][-1])
    return path


def _model_file(path: str, caller: str) -> str:
    """model.pt of a run directory (of its last stage, for a multi-stage run; consolidated from its
    latest checkpoint when missing), or `path`."""
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{caller}: {path!r} is neither a run directory nor a model file")
    path = final_stage(path)
    model_path = os.path.join(path, "model.pt")
    return model_path if os.path.exists(model_path) else export_run(path)


def load(path: str, device: str | torch.device = "cpu"):
    """The model of a run directory or of its model.pt (the files beside it, e.g. tokenizer.json, too),
    in eval mode, as its task gives it: for contrastive runs (model, preprocess, tokenizer) as
    load_clip; for caption_lm runs (model, tokenizer); for mae and videomae runs (model, preprocess); for
    unified runs the generator of load_unified."""
    model_path = _model_file(path, "load")
    saved = load_tensors(model_path)
    name = saved.get("task", "contrastive")  # model.pt files of CLIP runs before 2026-11-27 name none
    if name not in TASKS:
        raise ValueError(f"load: {model_path} holds a model of task {name!r}; this mmfast knows {sorted(TASKS)}")
    return TASKS[name].load_file(saved, os.path.dirname(model_path), device)


def load_clip(path: str, device: str | torch.device = "cpu"):
    """(model, preprocess, tokenizer) from a CLIP run directory or its model.pt (tokenizer.json beside it);
    an audio-text run (task audio_contrastive) gives its CLAP, whose preprocess takes (waveform, sample rate);
    a video-text run (task video_contrastive) its VideoCLIP, whose preprocess takes uint8 frames [T, H, W, 3].

    model.encode_image(torch.stack([preprocess(image) for image in images])) and
    model.encode_text(tokenizer(texts)) as with open_clip; the model is in eval mode."""
    model_path = _model_file(path, "load_clip")
    saved = load_tensors(model_path)
    name = saved.get("task", "contrastive")
    if name not in ("contrastive", "audio_contrastive", "video_contrastive"):
        raise ValueError(f"load_clip: {model_path} holds a {name!r} model, not a CLIP; use mmfast.load")
    return TASKS[name].load_file(saved, os.path.dirname(model_path), device)


def load_llava(path: str, device: str | torch.device = "cpu"):
    """(model, processor) of a LLaVA run directory (a multi-stage run's last stage) or its model.pt, as
    transformers gives a LlavaForConditionalGeneration and its processor:

        prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                 {"type": "text", "text": "What color is the shape?"}]}],
                                               add_generation_prompt=True)
        inputs = processor(images=[image], text=[prompt], return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=16)
        answer = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
    """
    from mmfast.data.llava_processor import LlavaProcessor

    model_path = _model_file(path, "load_llava")
    saved = load_tensors(model_path)
    if saved.get("task") != "llava":
        raise ValueError(f"load_llava: {model_path} holds a {saved.get('task', 'contrastive')!r} model, not a "
                         "LLaVA; use mmfast.load")
    model, tokenizer = TASKS["llava"].load_file(saved, os.path.dirname(model_path), device)
    return model, LlavaProcessor(tokenizer, model.config, saved.get("template", "vicuna_v1"))


def load_unified(path: str, device: str | torch.device = "cpu"):
    """The unified any-to-any model of a run directory or its model.pt, ready to generate
    (mmfast.train.unified_eval.UnifiedGenerator):

        model = mmfast.load_unified(run_dir)
        model.generate_text(image=pil_image)                      # also audio=(waveform, rate), video=frames
        image = model.generate_image("a red circle")              # a PIL image
        waveform, sample_rate = model.generate_audio("two high beeps")
    """
    model_path = _model_file(path, "load_unified")
    saved = load_tensors(model_path)
    if saved.get("task") != "unified":
        raise ValueError(f"load_unified: {model_path} holds a {saved.get('task', 'contrastive')!r} model, not a "
                         "unified one; use mmfast.load")
    return TASKS["unified"].load_file(saved, os.path.dirname(model_path), device)
