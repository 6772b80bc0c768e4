"""Zero-shot classification (prompt templates over class names) and image-text retrieval (R@1/5/10
both ways) for a CLIP model."""
from __future__ import annotations

import torch

TEMPLATES = ("a photo of a {}.", "a {}.", "an image of a {}.", "a picture showing a {}.")


@torch.no_grad()
def _encode(function, inputs: torch.Tensor, batch: int = 512) -> torch.Tensor:
    return torch.cat([function(inputs[start:start + batch], normalize=True) for start in range(0, len(inputs), batch)])


@torch.no_grad()
def zero_shot_accuracy(model, tokenizer, images: torch.Tensor, labels: torch.Tensor, classes, templates=TEMPLATES):
    """Top-1 accuracy of classifying `images` by the prompt embeddings of `classes`."""
    prompts = [template.format(name) for name in classes for template in templates]
    text = _encode(model.encode_text, tokenizer(prompts)).reshape(len(classes), len(templates), -1).mean(1)
    text = torch.nn.functional.normalize(text, dim=-1)
    predictions = (_encode(model.encode_image, images) @ text.T).argmax(dim=1)
    return (predictions == labels).float().mean().item()


@torch.no_grad()
def retrieval_recall(model, tokenizer, images: torch.Tensor, captions, ks=(1, 5, 10)) -> dict:
    """Recall@k of image->text and text->image retrieval, pair i being the match of row i."""
    similarity = _encode(model.encode_image, images) @ _encode(model.encode_text, tokenizer(captions)).T
    target = torch.arange(len(captions))
    result = {}
    for direction, scores in (("image_to_text", similarity), ("text_to_image", similarity.T)):
        rank = (scores > scores[target, target][:, None]).sum(dim=1)  # how many beat the match
        for k in ks:
            result[f"{direction}_R@{k}"] = (rank < k).float().mean().item()
    return result
