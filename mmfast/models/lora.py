"""LoRA adapters on a model's linear layers (peft's), QLoRA's 4-bit base weights (bitsandbytes'), and
merging the adapters back into plain weights.

peft's `inject_adapter_in_model` keeps our module names: each adapted linear `<name>` becomes
`<name>.base_layer` (frozen) plus `<name>.lora_A.default` and `<name>.lora_B.default`, and everything
else in the adapted module is frozen. A finished run stores merged weights (W + alpha / rank x B A,
`merge_lora`), so what it exports loads and serves with no peft at all.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
QUANTIZATIONS = ("", "nf4")


@dataclass(kw_only=True)
class LoraConfig:
    """rank 0: no adapters (the model trains as `train.trainable` says)."""

    rank: int = 0
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.0  # on the adapter's input
    target_modules: list[str] = field(default_factory=lambda: list(LLAMA_LINEARS))  # names of linear layers
    quantize: str = ""  # "nf4": the adapted layers' frozen base weights in bitsandbytes 4-bit NF4 (QLoRA)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def check_lora(config: LoraConfig) -> None:
    """Refuses settings peft would misread (a ValueError naming the key)."""
    if not isinstance(config.rank, int) or config.rank < 0:
        raise ValueError(f"config: model.lora.rank must be an integer >= 0 (0: no adapters), got {config.rank!r}")
    if config.alpha <= 0:
        raise ValueError(f"config: model.lora.alpha must be > 0, got {config.alpha!r}")
    if not 0 <= config.dropout < 1:
        raise ValueError(f"config: model.lora.dropout must be in [0, 1), got {config.dropout!r}")
    if not config.target_modules:
        raise ValueError("config: model.lora.target_modules must name at least one linear layer (e.g. q_proj)")
    if config.quantize not in QUANTIZATIONS:
        raise ValueError(f"config: model.lora.quantize must be one of {QUANTIZATIONS}, got {config.quantize!r}")
    if config.quantize and not config.rank:
        raise ValueError("config: model.lora.quantize needs adapters to train (model.lora.rank > 0)")


def _targets(module: nn.Module, names) -> list[str]:
    """The qualified names of the linear layers of `module` whose last name part is in `names`."""
    found = [name for name, child in module.named_modules()
             if isinstance(child, nn.Linear) and name.rsplit(".", 1)[-1] in names]
    missing = sorted(set(names) - {name.rsplit(".", 1)[-1] for name in found})
    if missing:
        raise ValueError(f"config: model.lora.target_modules names {missing}, which are not linear layers of the "
                         f"language model; it has {sorted({n.rsplit('.', 1)[-1] for n, c in module.named_modules() if isinstance(c, nn.Linear)})}")
    return found


def import_peft():
    try:
        import peft
    except ImportError as error:
        raise ImportError("LoRA needs peft: pip install peft (or mmfast[train])") from error
    return peft


def import_bitsandbytes():
    try:
        import bitsandbytes
    except ImportError as error:
        raise ImportError("model.lora.quantize=nf4 (QLoRA) needs bitsandbytes: pip install bitsandbytes") from error
    return bitsandbytes


def _quantize(module: nn.Module, names: list[str], device: torch.device) -> None:
    """Each named nn.Linear replaced by a bitsandbytes Linear4bit (NF4) holding its weights, quantized on
    `device` (the compute stays float32)."""
    bitsandbytes = import_bitsandbytes()
    for name in names:
        parent_name, _, child_name = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        linear = getattr(parent, child_name)
        quantized = bitsandbytes.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                               compute_dtype=torch.float32, quant_type="nf4", device="cpu")
        quantized.weight = bitsandbytes.nn.Params4bit(linear.weight.data.to("cpu"), requires_grad=False,
                                                      quant_type="nf4")
        if linear.bias is not None:
            quantized.bias = nn.Parameter(linear.bias.data.to("cpu"), requires_grad=False)
        quantized = quantized.to(device)  # moving a Params4bit quantizes it
        quantized._register_load_state_dict_pre_hook(_check_quantization, with_module=True)
        setattr(parent, child_name, quantized)


def _check_quantization(module, state, prefix, *_) -> None:
    """Loading a checkpoint (resume): Linear4bit saves its quantization statistics beside the 4-bit
    weight but cannot load them. They are the ones this layer computed from the same base weights:
    checked equal, then left out."""
    own = module.weight.quant_state.as_dict(packed=True)
    for key in [key for key in state if key.startswith(prefix + "weight.")]:
        saved, name = state.pop(key), key[len(prefix + "weight."):]
        if name not in own or not torch.equal(own[name].cpu(), saved.cpu()):
            raise ValueError(f"{key}: the checkpoint's 4-bit statistics differ from this layer's: it was quantized "
                             f"from other base weights (another train.init_from?)")


def add_lora(module: nn.Module, config: LoraConfig, device: torch.device | str = "cpu") -> nn.Module:
    """Adapters on `module`'s linear layers named in config.target_modules (in place; returns it). Every
    other parameter of `module` is frozen; parameters outside it keep their requires_grad."""
    check_lora(config)
    if not config.rank:
        return module
    peft = import_peft()
    targets = _targets(module, config.target_modules)
    if config.quantize:
        _quantize(module, targets, torch.device(device))
    settings = peft.LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                               target_modules=list(config.target_modules), bias="none")
    return peft.inject_adapter_in_model(settings, module)


def _dequantized(state: dict, prefix: str) -> torch.Tensor:
    """The float32 weight of a bitsandbytes Linear4bit from its state-dict entries under `prefix`."""
    bitsandbytes = import_bitsandbytes()
    weight = state[prefix + "weight"]
    quant_state = {key[len(prefix + "weight."):]: value for key, value in state.items()
                   if key.startswith(prefix + "weight.")}
    quant_state = bitsandbytes.functional.QuantState.from_dict(quant_state, device=weight.device)
    return bitsandbytes.functional.dequantize_4bit(weight, quant_state).float()


def merge_lora(state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """A state dict with peft's adapters (and 4-bit base weights, QLoRA) as the plain model's state dict:
    `<name>.base_layer.weight` + scaling x B A becomes `<name>.weight` (float32)."""
    merged = {}
    for key, value in state.items():
        if ".lora_" in key or ".base_layer.weight." in key:
            continue  # adapters (merged below) and 4-bit quantization statistics
        if ".base_layer." not in key:
            merged[key] = value
            continue
        prefix, _, name = key.partition(".base_layer.")
        if name == "weight":
            base = value.float() if value.is_floating_point() else _dequantized(state, f"{prefix}.base_layer.")
            down, up = state[f"{prefix}.lora_A.default.weight"], state[f"{prefix}.lora_B.default.weight"]
            value = base + scaling * (up.float() @ down.float())
        merged[f"{prefix}.{name}"] = value
    return merged
