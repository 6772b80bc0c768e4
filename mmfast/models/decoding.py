"""Token-by-token decoding shared by the generative models (LLaVA, the unified model): prompts of any
lengths run packed, then one token per active row, greedy or sampled with temperature and top-p."""
from __future__ import annotations

from collections.abc import Callable

import torch


def choose(logits: torch.Tensor, temperature: float, top_p: float, generator) -> torch.Tensor:
    """Greedy, or a sample from the top-p nucleus of softmax(logits / temperature)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probabilities = torch.softmax(logits / temperature, dim=-1)
    ordered, order = probabilities.sort(dim=-1, descending=True)
    outside = ordered.cumsum(dim=-1) - ordered > top_p  # keep the smallest prefix reaching top_p
    ordered = ordered.masked_fill(outside, 0)
    picked = torch.multinomial(ordered / ordered.sum(-1, keepdim=True), 1, generator=generator)
    return order.gather(-1, picked).squeeze(-1)


def check_decoding(caller: str, max_new_tokens: int, temperature: float, top_p: float) -> None:
    if max_new_tokens < 0 or temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"{caller}: expected max_new_tokens >= 0, temperature >= 0 and 0 < top_p <= 1, "
                         f"got {max_new_tokens}, {temperature}, {top_p}")


def decode(next_logits: Callable, prompts: list[torch.Tensor], *, max_new_tokens: int, eos_token_id: int | None,
           temperature: float, top_p: float, generator: torch.Generator | None, cached: bool) -> list[torch.Tensor]:
    """The new tokens of each prompt. `next_logits(rows, sequences, whole)` gives the next-token logits
    `[len(rows), vocab]` of `rows` whose tokens are `sequences`: whole sequences (prompt and tokens so
    far) on the first step or when not `cached`, else each row's last token (the rest in the caller's
    KV cache). A row stops at eos_token_id (kept in its output)."""
    check_decoding("decode", max_new_tokens, temperature, top_p)
    sequences, new = [prompt.clone() for prompt in prompts], [[] for _ in prompts]
    active = [index for index, prompt in enumerate(prompts) if len(prompt)]
    for step in range(max_new_tokens):
        if not active:
            break
        whole = not cached or step == 0
        logits = next_logits(active, [sequences[row] if whole else sequences[row][-1:] for row in active], whole)
        tokens = choose(logits, temperature, top_p, generator)
        still = []
        for row, token in zip(active, tokens.tolist()):
            new[row].append(token)
            sequences[row] = torch.cat([sequences[row], sequences[row].new_tensor([token])])
            if token != eos_token_id:
                still.append(row)
        active = still
    return [torch.tensor(tokens, dtype=torch.long) for tokens in new]
