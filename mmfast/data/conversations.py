"""LLaVA's conversation data: reading its JSON, rendering conversations with a template, labels from the
rendered conversation's role spans, and packing many conversations into one row.

Format (LLaVA's `llava_v1_5_mix665k.json`, a JSON list, or one object per line in `.jsonl`):

    {"id": "0001", "image": "0001.png",
     "conversations": [{"from": "human", "value": "<image>\\nWhat color is the shape?"},
                       {"from": "gpt", "value": "Red."}]}

`image` is relative to the image folder; samples without one are text-only. Templates: `plain` (LLaVA's
stage 1: the image, then the first answer as its caption), `vicuna_v1` (LLaVA-1.5's stage 2 default:
a system line, `USER: ... ASSISTANT: ...</s>` turns), `chat` (the tokenizer's own chat template).
Labels come from where each assistant turn lies in the rendered text: a token is supervised when its
characters (the tokenizer's offsets) fall inside an assistant turn or its end token; user turns, the
system line and image tokens are -100 (vicuna_v1: the prompt ends at "ASSISTANT:", the answer is
" answer</s>", as LLaVA's). Nothing is derived from string lengths of pieces tokenized apart.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

IMAGE_PLACEHOLDER = "<image>"
IGNORE = -100
TEMPLATES = ("plain", "vicuna_v1", "chat")
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the user's questions.")


@dataclass(frozen=True)
class Conversation:
    id: str
    image: str | None  # a path (joined with the image folder), or None for text only
    turns: tuple[tuple[str, str], ...]  # (role: user / assistant / system, text)


def _conversation(entry, where: str, image_folder: str | None) -> Conversation:
    if not isinstance(entry, dict) or not isinstance(entry.get("conversations"), list) or not entry["conversations"]:
        raise ValueError(f"{where}: expected an object with a non-empty 'conversations' list, got "
                         f"{json.dumps(entry)[:120]}")
    turns = []
    for index, turn in enumerate(entry["conversations"]):
        role = ROLES.get(turn.get("from") if isinstance(turn, dict) else None)
        if role is None or not isinstance(turn.get("value"), str):
            raise ValueError(f"{where}: turn {index} must have 'from' (one of {sorted(ROLES)}) and a string 'value', "
                             f"got {json.dumps(turn)[:120]}")
        turns.append((role, turn["value"]))
    image = entry.get("image")
    placeholders = sum(text.count(IMAGE_PLACEHOLDER) for _, text in turns)
    if image is not None:
        if placeholders > 1:
            raise ValueError(f"{where}: one image, but {placeholders} '{IMAGE_PLACEHOLDER}' placeholders")
        if image_folder is not None:
            image = os.path.join(image_folder, image)
            if not os.path.exists(image):
                raise FileNotFoundError(f"{where}: image {image} does not exist")
    elif placeholders:
        raise ValueError(f"{where}: '{IMAGE_PLACEHOLDER}' in a sample without an 'image'")
    return Conversation(str(entry.get("id", "")), image, tuple(turns))


def read_conversations(path: str, image_folder: str | None = None) -> list[Conversation]:
    """LLaVA's JSON (a list) or JSONL (one object per line); errors name the file and the line or entry."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"read_conversations: no file at {path}")
    if image_folder is not None and not os.path.isdir(image_folder):
        raise FileNotFoundError(f"read_conversations: no image folder at {image_folder}")
    with open(path, encoding="utf-8") as handle:
        if path.endswith(".jsonl"):
            entries = []
            for number, line in enumerate(handle, 1):
                if line.strip():
                    try:
                        entries.append((f"{path}, line {number}", json.loads(line)))
                    except json.JSONDecodeError as error:
                        raise ValueError(f"{path}, line {number}: malformed JSON ({error.msg})") from None
        else:
            try:
                loaded = json.load(handle)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}: malformed JSON at line {error.lineno}, column {error.colno} "
                                 f"({error.msg})") from None
            if not isinstance(loaded, list):
                raise ValueError(f"{path}: expected a JSON list of samples, got {type(loaded).__name__}")
            entries = [(f"{path}, entry {index}", entry) for index, entry in enumerate(loaded)]
    return [_conversation(entry, where, image_folder) for where, entry in entries]


def render(conversation: Conversation, template: str, eos: str, tokenizer=None) -> tuple[str, list[tuple[int, int]]]:
    """(text, assistant spans as character ranges [start, end), each with its end token)."""
    turns = [(role, text.replace(IMAGE_PLACEHOLDER + "\n", IMAGE_PLACEHOLDER).strip()) for role, text in
             conversation.turns]
    has_image = conversation.image is not None
    if template == "plain":
        answer = next((text for role, text in turns if role == "assistant"), None)
        if answer is None:
            raise ValueError(f"conversation {conversation.id!r}: the plain template needs an assistant turn")
        prefix = IMAGE_PLACEHOLDER if has_image else ""
        return prefix + answer + eos, [(len(prefix), len(prefix) + len(answer) + len(eos))]
    if template == "vicuna_v1":
        spans = []
        text = next((content for role, content in turns if role == "system"), VICUNA_SYSTEM)
        for role, content in turns:
            if role == "user":
                text += " USER: " + content
            elif role == "assistant":  # the prompt ends at "ASSISTANT:"; the model writes " answer</s>"
                text += " ASSISTANT:"
                spans.append((len(text), len(text) + 1 + len(content) + len(eos)))
                text += " " + content + eos
        return text + ("" if turns[-1][0] == "assistant" else " ASSISTANT:"), spans
    if template == "chat":
        return _render_chat(turns, tokenizer, conversation.id)
    raise ValueError(f"render: template must be one of {TEMPLATES}, got {template!r}")


def _render_chat(turns, tokenizer, name):
    """The tokenizer's own chat template; an assistant turn's span is what rendering it adds after the
    generation prompt of the turns before it (templates render a conversation's prefix as a prefix)."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("render: the 'chat' template needs a tokenizer with a chat_template (or use 'vicuna_v1')")
    messages = [{"role": role, "content": text} for role, text in turns]
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for index, (role, _) in enumerate(turns):
        if role != "assistant":
            continue
        start = len(tokenizer.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True))
        end = len(tokenizer.apply_chat_template(messages[:index + 1], tokenize=False))
        if not full.startswith(tokenizer.apply_chat_template(messages[:index + 1], tokenize=False)):
            raise ValueError(f"conversation {name!r}: the tokenizer's chat template does not render a "
                             "conversation's beginning as the beginning of the whole; use 'vicuna_v1'")
        spans.append((start, end))
    return full, spans


@dataclass(frozen=True)
class Encoded:
    input_ids: torch.Tensor  # int64 [T], each image placeholder expanded to image_tokens image ids
    labels: torch.Tensor  # int64 [T], already shifted: labels[t] is the target of position t
    image: str | None


def _offsets(tokenizer, text):
    """(ids, character offsets) from an HF `tokenizers.Tokenizer` or a transformers fast tokenizer."""
    if hasattr(tokenizer, "encode_batch"):  # tokenizers.Tokenizer
        encoding = tokenizer.encode(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return encoding["input_ids"], encoding["offset_mapping"]


def encode(conversation: Conversation, template: str, tokenizer, *, eos: str, image_token_id: int,
           image_tokens: int) -> Encoded:
    """Token ids and labels of one conversation: the image placeholder becomes `image_tokens` copies of
    `image_token_id` (the model's image features take their places)."""
    text, spans = render(conversation, template, eos, tokenizer)
    ids, offsets = _offsets(tokenizer, text)
    # a token is the assistant's when its characters overlap an assistant span (a byte-level token may
    # carry the space before an answer)
    supervised = [any(begin < end and finish > start for start, end in spans) for begin, finish in offsets]
    placeholder = _placeholder_id(tokenizer)
    out_ids, out_supervised = [], []
    for token, target in zip(ids, supervised):
        if token == placeholder:
            out_ids += [image_token_id] * image_tokens
            out_supervised += [False] * image_tokens
        else:
            out_ids.append(token)
            out_supervised.append(target)
    input_ids = torch.tensor(out_ids, dtype=torch.long)
    labels = torch.full_like(input_ids, IGNORE)
    targets = torch.tensor(out_supervised[1:], dtype=torch.bool)
    labels[:-1] = torch.where(targets, input_ids[1:], IGNORE)
    if conversation.image is not None and placeholder not in ids:
        raise ValueError(f"conversation {conversation.id!r}: its image has no '{IMAGE_PLACEHOLDER}' token after "
                         "tokenizing (add it to the tokenizer as a special token)")
    return Encoded(input_ids, labels, conversation.image)


def _placeholder_id(tokenizer) -> int | None:
    return tokenizer.token_to_id(IMAGE_PLACEHOLDER) if hasattr(tokenizer, "token_to_id") else \
        tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)


@dataclass(frozen=True)
class PackedBatch:
    input_ids: torch.Tensor  # [total]
    labels: torch.Tensor  # [total]
    cu_seqlens: torch.Tensor  # int32 [sequences + 1]
    max_seqlen: int
    images: list[str]  # in the order of their image tokens
    capacity: int  # tokens the row could hold: efficiency = total / capacity


def pack(samples: list[Encoded], capacity: int) -> list[PackedBatch]:
    """Greedy first-fit of conversations (in order) into rows of at most `capacity` tokens (a longer
    conversation is an error: cutting one could cut an image's tokens)."""
    rows: list[list[Encoded]] = []
    used: list[int] = []
    for sample in samples:
        if len(sample.input_ids) > capacity:
            raise ValueError(f"pack: a conversation of {len(sample.input_ids)} tokens exceeds the row capacity "
                             f"{capacity}")
        for index, filled in enumerate(used):
            if filled + len(sample.input_ids) <= capacity:
                rows[index].append(sample)
                used[index] += len(sample.input_ids)
                break
        else:
            rows.append([sample])
            used.append(len(sample.input_ids))
    batches = []
    for row in rows:
        lengths = torch.tensor([0] + [len(sample.input_ids) for sample in row])
        batches.append(PackedBatch(torch.cat([sample.input_ids for sample in row]),
                                   torch.cat([sample.labels for sample in row]),
                                   lengths.cumsum(0).to(torch.int32), int(lengths.max()),
                                   [sample.image for sample in row if sample.image is not None], capacity))
    return batches


SPECIAL_TOKENS = ("<pad>", "<unk>", "</s>", IMAGE_PLACEHOLDER)


def train_tokenizer(texts, vocab_size: int = 512):
    """A byte-level BPE (GPT-2's kind: every string encodes, spaces survive decoding) trained on `texts`,
    with `<pad>`, `<unk>`, `</s>` (end of turn) and `<image>` as special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def conversation_texts(conversations) -> list[str]:
    """Every turn's text, and the template's own words, for training a tokenizer."""
    return [VICUNA_SYSTEM + " USER: ASSISTANT:"] + [text for c in conversations for _, text in c.turns]


def without_image(conversation: Conversation) -> Conversation:
    """The conversation as text alone (a language model's pretraining on the same words)."""
    turns = tuple((role, text.replace(IMAGE_PLACEHOLDER + "\n", "").replace(IMAGE_PLACEHOLDER, "").strip())
                  for role, text in conversation.turns)
    return Conversation(conversation.id, None, turns)


def option_letters(options: Sequence[str]) -> str:
    """"A. circle B. square C. star": the options as a multiple-choice question lists them."""
    return " ".join(f"{chr(ord('A') + index)}. {option}" for index, option in enumerate(options))
