"""What a user holds to the model's input and back, as transformers' LLaVA processor does it: a chat
template over HF-style messages, images and text into left-padded token ids with the image tokens
expanded, and token ids back into text."""
from __future__ import annotations

import torch

from mmfast.data.anyres import anyres_tiles, check_pinpoints
from mmfast.data.conversations import IMAGE_PLACEHOLDER, VICUNA_SYSTEM
from mmfast.data.preprocess import Preprocess

EOS = "</s>"


class LlavaProcessor:
    def __init__(self, tokenizer, config, template: str = "vicuna_v1"):
        from mmfast.models.llava import image_tokens

        if template != "vicuna_v1":
            raise ValueError(f"LlavaProcessor: chat prompts are written for template 'vicuna_v1', got {template!r}")
        self.tokenizer, self.config, self.template = tokenizer, config, template
        self.image_processor = Preprocess(config.vision.image_size)
        self.image_tokens = image_tokens(config)
        self.pinpoints = check_pinpoints(config.image_grid_pinpoints, config.vision.image_size)
        self.pad_token_id = tokenizer.token_to_id("<pad>")
        self.eos_token_id = tokenizer.token_to_id(EOS)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """HF-style messages ({"role", "content": a string or [{"type": "image"} | {"type": "text", "text"}]})
        in LLaVA-1.5's Vicuna format; add_generation_prompt ends with "ASSISTANT:" for the answer."""
        text = next((self._content(m) for m in messages if m.get("role") == "system"), VICUNA_SYSTEM)
        for index, message in enumerate(messages):
            role = message.get("role")
            if role == "user":
                text += " USER: " + self._content(message)
            elif role == "assistant":
                text += " ASSISTANT: " + self._content(message) + EOS
            elif role != "system":
                raise ValueError(f"apply_chat_template: message {index} has role {role!r}; expected user, "
                                 "assistant or system")
        return text + (" ASSISTANT:" if add_generation_prompt else "")

    @staticmethod
    def _content(message) -> str:
        content = message.get("content", "")
        if isinstance(content, str):
            return content
        parts = []
        for part in content:
            if part.get("type") == "image":
                parts.append(IMAGE_PLACEHOLDER)
            elif part.get("type") == "text":
                parts.append(part["text"])
            else:
                raise ValueError(f"apply_chat_template: content parts are image or text, got {part!r}")
        return "".join(parts)

    def image_inputs(self, image) -> torch.Tensor:
        """uint8 [n, 3, H, W]: the tower inputs of one image (one; with AnyRes its overview and tiles)."""
        if self.pinpoints:
            from PIL import Image

            return anyres_tiles(image if isinstance(image, Image.Image) else Image.fromarray(image), self.pinpoints,
                                self.config.vision.image_size)
        return self.image_processor(image)[None]

    def __call__(self, images=None, text=None, return_tensors: str = "pt") -> dict:
        """{"input_ids", "attention_mask"} left-padded (as batched generation needs), and "pixel_values"
        (uint8 [N, 3, H, W], the model normalizes them) for the `<image>`s of the texts in order (with
        AnyRes, N counts each image's overview and tiles, and its placeholder expands to all of theirs)."""
        if return_tensors != "pt":
            raise ValueError(f"LlavaProcessor: return_tensors must be 'pt', got {return_tensors!r}")
        texts = [text] if isinstance(text, str) else list(text or [])
        images = [] if images is None else list(images)
        placeholder = self.tokenizer.token_to_id(IMAGE_PLACEHOLDER)
        tokens = [self.tokenizer.encode(prompt, add_special_tokens=False).ids for prompt in texts]
        found = sum(row.count(placeholder) for row in tokens)
        if found != len(images):
            raise ValueError(f"LlavaProcessor: the texts hold {found} '{IMAGE_PLACEHOLDER}' and {len(images)} images "
                             "were given; expected one image per placeholder")
        inputs = [self.image_inputs(image) for image in images]
        pending, rows = iter(inputs), []
        for row in tokens:
            ids = []
            for token in row:
                count = len(next(pending)) * self.image_tokens if token == placeholder else 0
                ids += [self.config.image_token_id] * count if count else [token]
            rows.append(ids)
        longest = max((len(row) for row in rows), default=0)
        input_ids = torch.full((len(rows), longest), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for index, row in enumerate(rows):
            if row:
                input_ids[index, -len(row):] = torch.tensor(row)
                attention_mask[index, -len(row):] = 1
        result = {"input_ids": input_ids, "attention_mask": attention_mask}
        if images:
            result["pixel_values"] = torch.cat(inputs)
        return result

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens).strip()

    def batch_decode(self, rows, skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(row, skip_special_tokens) for row in rows]
