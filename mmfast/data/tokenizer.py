"""Caption tokenizer: a BPE trained on the captions with HF `tokenizers`, or loaded from a local file.
Calling it gives CLIP-style rows: <sot> tokens <eot>, padded with <pad> (id 0) to context_length."""
from __future__ import annotations

import json
import os

import torch

SPECIAL = ["<pad>", "<sot>", "<eot>", "<unk>"]


class CaptionTokenizer:
    def __init__(self, tokenizer, context_length: int):
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.pad_id, self.sot_id, self.eot_id = (tokenizer.token_to_id(token) for token in SPECIAL[:3])
        if None in (self.pad_id, self.sot_id, self.eot_id):
            raise ValueError(f"CaptionTokenizer: the tokenizer must have the tokens {SPECIAL[:3]}, got ids "
                             f"{[self.pad_id, self.sot_id, self.eot_id]}")

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    @classmethod
    def train(cls, captions, vocab_size: int = 1000, context_length: int = 32) -> "CaptionTokenizer":
        from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

        tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
        tokenizer.normalizer = normalizers.Lowercase()
        tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False)
        tokenizer.train_from_iterator(captions, trainer)
        return cls(tokenizer, context_length)

    def save(self, path: str) -> None:
        """One file: the context length travels as the tokenizer's own truncation length."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.tokenizer.enable_truncation(max_length=self.context_length)
        self.tokenizer.save(path)

    @classmethod
    def load(cls, path: str, context_length: int | None = None) -> "CaptionTokenizer":
        """An HF `tokenizers` file (with <pad>, <sot>, <eot>); context_length, unless given, is the file's
        truncation length (or, for runs written before 2026-11-27, the `<path>.json` beside it; else 32)."""
        from tokenizers import Tokenizer

        if not os.path.exists(path):
            raise FileNotFoundError(f"CaptionTokenizer: no tokenizer file at {path}")
        tokenizer = Tokenizer.from_file(path)
        if context_length is None and tokenizer.truncation:
            context_length = tokenizer.truncation["max_length"]
        if context_length is None and os.path.exists(path + ".json"):
            with open(path + ".json") as handle:
                context_length = json.load(handle)["context_length"]
        return cls(tokenizer, context_length or 32)

    def __call__(self, texts) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        rows = torch.full((len(texts), self.context_length), self.pad_id, dtype=torch.long)
        for row, encoding in enumerate(self.tokenizer.encode_batch(texts)):
            ids = [self.sot_id] + encoding.ids[: self.context_length - 2] + [self.eot_id]
            rows[row, : len(ids)] = torch.tensor(ids)
        return rows

    def decode(self, ids) -> str:
        """The text of token ids, special tokens left out (words joined by spaces)."""
        return self.tokenizer.decode([int(token) for token in ids], skip_special_tokens=True)
