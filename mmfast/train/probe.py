"""Linear probes: how much a frozen encoder's features say about a label, the standard measure of a
self-supervised representation (MAE's and DINO's linear evaluation)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def encode(function, inputs: torch.Tensor, device, batch: int = 512) -> torch.Tensor:
    """`function` over `inputs` in batches on `device`; float32 features on the CPU."""
    return torch.cat([function(inputs[start:start + batch].to(device)).float().cpu()
                      for start in range(0, len(inputs), batch)])


def linear_classifier(train_features: torch.Tensor, train_labels: torch.Tensor, classes: int,
                      weight_decay: float = 1e-4, iterations: int = 200):
    """A multinomial logistic regression fitted (L-BFGS, full batch) on standardized features (the train
    rows' mean and deviation): returns predict(features) -> labels."""
    if len(train_features) != len(train_labels):
        raise ValueError(f"linear_classifier: {len(train_features)} feature rows for {len(train_labels)} labels")
    mean, deviation = train_features.mean(0), train_features.std(0) + 1e-6
    train = (train_features - mean) / deviation
    weight = torch.zeros(train.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=iterations, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(train @ weight + bias, train_labels) + weight_decay * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    weight, bias = weight.detach(), bias.detach()
    return lambda features: (((features - mean) / deviation) @ weight + bias).argmax(1)


def linear_probe(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, classes: int, weight_decay: float = 1e-4, iterations: int = 200) -> float:
    """Top-1 accuracy on the test rows of linear_classifier fitted on the train rows."""
    if len(train_features) != len(train_labels) or len(test_features) != len(test_labels):
        raise ValueError(f"linear_probe: features and labels differ in length: {len(train_features)} vs "
                         f"{len(train_labels)} (train), {len(test_features)} vs {len(test_labels)} (test)")
    predict = linear_classifier(train_features, train_labels, classes, weight_decay, iterations)
    return (predict(test_features) == test_labels).float().mean().item()
