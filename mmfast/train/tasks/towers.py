"""A vision tower handed from one run to another (train.init_from, model.vision_from): a CLIP's or a
masked autoencoder's `vision_model.*` weights, checked against the tower the new model builds."""
from __future__ import annotations

import dataclasses

from mmfast.models.clip import VisionConfig

# model.pt's task -> the key of its model config, which holds the tower's `vision` and `activation`
TOWER_CONFIGS = {"contrastive": "clip_config", "mae": "mae_config"}


def saved_tower(saved: dict) -> dict | None:
    """The model config of a model.pt whose `vision_model.*` is an image tower (a CLIP's, an MAE's), else None."""
    key = TOWER_CONFIGS.get(saved.get("task"))
    return None if key is None else saved[key]


def check_tower(saved_vision: dict, vision: VisionConfig, depth: int, source: str) -> None:
    """A saved tower (its config's `vision`) against the tower the new model builds: the differences
    named, rather than a size mismatch deep inside load_state_dict."""
    shape = ("image_size", "patch_size", "patch_stride", "channels", "width", "heads", "mlp_ratio")
    different = [f"{key} {saved_vision.get(key)!r} (the model's: {getattr(vision, key)!r})" for key in shape
                 if saved_vision.get(key) != getattr(vision, key)]
    if saved_vision.get("layers", 0) < depth:
        different.append(f"layers {saved_vision.get('layers')!r} (the model's features come from block {depth})")
    if different:
        raise ValueError(f"config: {source}'s vision tower does not fit the model's (model.vision, "
                         f"data.image_size): {', '.join(different)}")


def tower_weights(saved: dict) -> dict:
    """The `vision_model.*` entries of a model.pt's state dict."""
    return {key: value for key, value in saved["state_dict"].items() if key.startswith("vision_model.")}


def load_media_tower(model, saved: dict, media: str, config_key: str, config, fields: tuple[str, ...]) -> None:
    """train.init_from of a masked-pretraining run into a contrastive run of the same modality: its
    `<media>_model.*` weights into `model`, after the tower's shape (`fields` of the saved
    `config_key`'s `media` section against `config`, the model's) is checked, differences named."""
    mine, theirs = dataclasses.asdict(config), saved[config_key][media]
    different = [f"{key} {theirs.get(key)!r} (the model's: {mine[key]!r})" for key in fields
                 if theirs.get(key) != mine[key]]
    if different:
        raise ValueError(f"config: train.init_from's {media} tower does not fit model.{media}: {', '.join(different)}")
    model.load_state_dict({key: value for key, value in saved["state_dict"].items()
                           if key.startswith(f"{media}_model.")}, strict=False)


def load_text_tower(model, saved: dict, tokenizer, text, activation: str) -> None:
    """train.init_from of a masked-language-model run (task mlm) into a dual encoder: its `text_model.*`
    weights into `model`, after checking that the run reads the same tokens (its tokenizer) with a tower of
    the same shape (model.text, model.activation), differences named."""
    if saved.get("tokenizer") != tokenizer.tokenizer.to_str():
        raise ValueError("config: train.init_from's text tower was trained with another tokenizer than this run's: "
                         "set data.tokenizer to that run's tokenizer.json")
    mine, theirs = dataclasses.asdict(text), saved["mlm_config"]["text"]
    fields = ("vocab_size", "context_length", "width", "layers", "heads", "mlp_ratio", "causal")
    different = [f"{key} {theirs.get(key)!r} (the model's: {mine[key]!r})" for key in fields
                 if theirs.get(key) != mine[key]]
    if saved["mlm_config"]["activation"] != activation:
        different.append(f"activation {saved['mlm_config']['activation']!r} (the model's: {activation!r})")
    if different:
        raise ValueError(f"config: train.init_from's text tower does not fit model.text: {', '.join(different)}")
    model.load_state_dict({key: value for key, value in saved["state_dict"].items()
                           if key.startswith("text_model.")}, strict=False)
