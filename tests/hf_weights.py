"""Random models built from configs start some weights at zero (HF's biases, AST's tokens, LoRA's B):
give them values, so a conversion test compares something."""
import torch


def nudge(model, match=lambda name: name.endswith("bias"), std: float = 0.1):
    """Every parameter whose name `match`es, drawn from N(0, std); returns the model."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if match(name):
                parameter.normal_(std=std)
    return model
