"""Zero-shot classification (prompt templates over class names) and image-text retrieval (R@1/5/10
both ways) for a CLIP model."""
from __future__ import annotations

import torch

TEMPLATES = ("a photo of a {}.", "a {}.", "an image of a {}.", "a picture showing a {}.")


@torch.no_grad()
def _encode(function, inputs: torch.Tensor, batch: int = 512) -> torch.Tensor:
    device = next(function.__self__.parameters()).device
    return torch.cat([function(inputs[start:start + batch].to(device), normalize=True).float().cpu()
                      for start in range(0, len(inputs), batch)])


@torch.no_grad()
def zero_shot_accuracy(model, tokenizer, images: torch.Tensor, labels: torch.Tensor, classes=None,
                       templates=TEMPLATES, *, prompts=None, reduce: str = "mean"):
    """Top-1 accuracy of classifying `images` by prompts: `templates` over `classes`, or `prompts`
    (one list per class). reduce="mean" averages a class's prompt embeddings (CLIP's prompt
    ensembling); "max" scores a class by its best prompt, for classes whose pictures differ in
    kind (one shape or several)."""
    predicted = zero_shot_predictions(model, tokenizer, images, classes, templates, prompts=prompts, reduce=reduce)
    return (predicted == labels).float().mean().item()


@torch.no_grad()
def zero_shot_predictions(model, tokenizer, images: torch.Tensor, classes=None, templates=TEMPLATES, *,
                          prompts=None, reduce: str = "mean") -> torch.Tensor:
    """The predicted class index of each image (see zero_shot_accuracy)."""
    if prompts is None:
        prompts = [[template.format(name) for template in templates] for name in classes]
    counts = {len(group) for group in prompts}
    if len(counts) != 1 or reduce not in ("mean", "max"):
        raise ValueError(f"zero_shot_accuracy: expected as many prompts per class and reduce 'mean' or 'max', "
                         f"got prompt counts {sorted(counts)} and reduce {reduce!r}")
    flat = [prompt for group in prompts for prompt in group]
    text = _encode(model.encode_text, tokenizer(flat)).reshape(len(prompts), counts.pop(), -1)
    image = _encode(model.encode_image, images)
    if reduce == "mean":
        scores = image @ torch.nn.functional.normalize(text.mean(1), dim=-1).T
    else:
        scores = torch.einsum("nd,cpd->ncp", image, text).amax(dim=-1)
    return scores.argmax(dim=1)


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


def attribute_breakdown(predicted: torch.Tensor, metas: list[dict], prefix: str) -> dict:
    """Zero-shot, color and shape accuracy of color x shape predictions, overall and per background
    band (where the metadata names one): `{prefix}zero_shot_accuracy`, `{prefix}color_accuracy_light`..."""
    from mmfast.data.synth import class_names

    names = [class_names()[index].split(" ", 1) for index in predicted.tolist()]
    groups = {"": list(range(len(metas)))}
    for index, meta in enumerate(metas):
        if "background" in meta:
            groups.setdefault("_" + meta["background"], []).append(index)
    result = {}
    for suffix, members in groups.items():
        rows = [(names[i], metas[i]) for i in members]
        result[f"{prefix}zero_shot_accuracy{suffix}"] = sum(color == m["color"] and shape == m["shape"]
                                                             for (color, shape), m in rows) / len(rows)
        result[f"{prefix}color_accuracy{suffix}"] = sum(color == m["color"] for (color, _), m in rows) / len(rows)
        result[f"{prefix}shape_accuracy{suffix}"] = sum(shape == m["shape"] for (_, shape), m in rows) / len(rows)
    return result


def evaluate(model, tokenizer, held_out, other=None) -> dict:
    """Retrieval recalls on (the first 1,000 pairs of) the held-out split, and zero-shot accuracy over
    the bundled color x shape classes where the split has such pictures. `other`: (images, metas) drawn
    another way (mmfast.data.other_renderer), scored with the same prompts and reported beside the
    held-out split as `other_*` keys: zero-shot, color and shape accuracy, overall and per background
    band (dark, mid, light)."""
    from mmfast.data.synth import class_prompts

    images, captions, metas = held_out
    shapes = [i for i, meta in enumerate(metas) if meta.get("kind") == "shape"]
    was_training = model.training
    model.eval()
    result = {}
    if shapes:
        labels = torch.tensor([metas[i]["label"] for i in shapes])
        result["zero_shot_accuracy"] = zero_shot_accuracy(model, tokenizer, images[shapes], labels,
                                                          prompts=class_prompts(), reduce="max")
    result.update(retrieval_recall(model, tokenizer, images[:1000], captions[:1000]))
    if other is not None:
        predicted = zero_shot_predictions(model, tokenizer, other[0], prompts=class_prompts(), reduce="max")
        result.update(attribute_breakdown(predicted, other[1], "other_"))
    model.train(was_training)
    return result
