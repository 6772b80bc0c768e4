"""`mmfast.load_clip`: a trained CLIP back from its run directory, open_clip style."""
from __future__ import annotations

import os

import torch

from mmfast.data.preprocess import Preprocess
from mmfast.data.tokenizer import CaptionTokenizer
from mmfast.models import CLIP, ClipConfig
from mmfast.models.clip import TextConfig, VisionConfig
from mmfast.train import checkpoint
from mmfast.train.files import load_tensors


def export_run(run_dir: str, step: int | None = None) -> str:
    """Consolidates a run's checkpoint (the latest, or the one taken after `step`), whatever engine
    wrote it, into <run_dir>/model.pt; returns its path."""
    from mmfast.train.config import load_config
    from mmfast.train.tasks import build_task

    checkpoints = os.path.join(run_dir, "checkpoints")
    folder = checkpoint.latest(checkpoints) if step is None else os.path.join(checkpoints,
                                                                               checkpoint.folder_name(step))
    if folder is None or not os.path.isdir(folder):
        raise FileNotFoundError(f"export: {run_dir} has no checkpoint" + (f" of step {step}" if step else ""))
    task = build_task(load_config(path=os.path.join(run_dir, "config.yaml")))
    task.load_tokenizer(run_dir)
    return task.export(run_dir, folder)


def _model_file(path: str) -> str:
    """model.pt of a run directory (consolidated from its latest checkpoint when missing), or `path`."""
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise FileNotFoundError(f"load_clip: {path!r} is neither a run directory nor a model file")
    model_path = os.path.join(path, "model.pt")
    return model_path if os.path.exists(model_path) else export_run(path)


def load_clip(path: str, device: str | torch.device = "cpu"):
    """(model, preprocess, tokenizer) from a run directory or its model.pt (tokenizer.json beside it).

    model.encode_image(torch.stack([preprocess(image) for image in images])) and
    model.encode_text(tokenizer(texts)) as with open_clip; the model is in eval mode."""
    model_path = _model_file(path)
    saved = load_tensors(model_path)
    fields = dict(saved["clip_config"])
    fields["vision"], fields["text"] = VisionConfig(**fields["vision"]), TextConfig(**fields["text"])
    model = CLIP(ClipConfig(**fields))
    model.vision_model.embeddings.mean, model.vision_model.embeddings.std = saved["mean"], saved["std"]
    model.load_state_dict(saved["state_dict"])
    tokenizer = CaptionTokenizer.load(os.path.join(os.path.dirname(model_path), "tokenizer.json"))
    return model.to(device).eval(), Preprocess(model.config.vision.image_size), tokenizer
