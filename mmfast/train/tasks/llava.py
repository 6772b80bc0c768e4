"""The encoder + LLM generative task (LLaVA): conversations about images, packed with no padding, the
loss on the assistant's tokens only. One model through every stage of a recipe (what trains is
`train.trainable`): the language model on the conversations' text (`data.use_images=false`), the
projector on captions (`data.template=plain`, LLaVA's stage 1), then projector and language model on
the conversations (stage 2). The vision tower comes from a CLIP run (`model.vision_from`, or a
contrastive stage's model.pt as `train.init_from`, which is how a recipe chains a CLIP stage in).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass, field

import numpy
import torch
import yaml

from mmfast.data import synth_conversations
from mmfast.data.synth_conversations import choice_question, choice_text
from mmfast.data.conversations import (IGNORE, VICUNA_SYSTEM, conversation_texts, encode, read_conversations,
                                       train_tokenizer, without_image)
from mmfast.data.anyres import anyres_tiles, check_pinpoints
from mmfast.data.preprocess import Preprocess
from mmfast.data.splits import batch_indices
from mmfast.models.clip import VisionConfig
from mmfast.models.llama import LlamaConfig
from mmfast.models.llava import Llava, LlavaConfig, image_tokens, language_model_sizes, llava_with_language_model
from mmfast.models.lora import LLAMA_LINEARS, LoraConfig, add_lora, check_lora, merge_lora
from mmfast.train import checkpoint, distributed
from mmfast.train.caption_metrics import bleu, cider_d
from mmfast.train.generative_metrics import chosen_option, circular_eval, pope_metrics, vqa_accuracy
from mmfast.train.tasks.base import Task
from mmfast.train.tasks.towers import check_tower, saved_tower

EOS = "</s>"
VQA_TYPES = ("color", "shape", "count", "position")


@dataclass(kw_only=True)
class LlavaModelSection(LlavaConfig):
    """The run's `model:` section: every field of mmfast.models.llava.LlavaConfig, sized for the CPU, and
    where the vision tower comes from. text.vocab_size is the tokenizer's target; image_token_id is the
    tokenizer's `<image>`."""

    vision: VisionConfig = field(default_factory=lambda: VisionConfig(
        image_size=32, patch_size=8, patch_stride=4, width=128, layers=4, heads=4,
        mean=(0.481, 0.458, 0.408), std=(0.269, 0.261, 0.276)))
    text: LlamaConfig = field(default_factory=lambda: LlamaConfig(
        vocab_size=512, hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512))
    vision_from: str = ""  # a CLIP run directory or model.pt: its vision tower (and the tower's config)
    # a local directory of a transformers causal LM (config, weights, tokenizer.json): the language model and
    # its tokenizer (<image> and </s> added where missing, the embeddings grown to match); `text` unused
    language_model_from: str = ""
    # LoRA on the language model's linear layers (rank 0: none); the projector trains in full beside it
    # when train.trainable names it; model.pt holds the merged weights
    lora: LoraConfig = field(default_factory=LoraConfig)


def language_model_tokenizer(directory: str):
    """The tokenizer.json of a transformers model's directory, with LLaVA's `<image>` and the templates'
    end of turn `</s>` added as special tokens where it lacks them."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(os.path.join(directory, "tokenizer.json"))
    tokenizer.add_special_tokens([token for token in ("<image>", EOS) if tokenizer.token_to_id(token) is None])
    return tokenizer


def language_model(directory: str, vocab_size: int):
    """The causal LM of a local directory, its embeddings grown to the run's tokenizer."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(directory)
    if model.get_input_embeddings().weight.shape[0] < vocab_size:
        model.resize_token_embeddings(vocab_size)
    return model


def language_model_config(directory: str, text: LlamaConfig, vocab_size: int) -> tuple[LlamaConfig, dict]:
    """(text with the directory's model's sizes, its config as a dict) for a vocabulary of vocab_size."""
    import transformers

    hf = transformers.AutoConfig.from_pretrained(directory)
    hf.vocab_size = max(hf.vocab_size, vocab_size)
    return language_model_sizes(hf, text), hf.to_dict()


def _clip_file(path: str) -> dict:
    path = os.path.join(path, "model.pt") if os.path.isdir(path) else path
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config: model.vision_from names {path!r}, which does not exist")
    saved = checkpoint.load_tensors(path)
    if saved.get("task", "contrastive") != "contrastive":
        raise ValueError(f"config: model.vision_from must be a CLIP run's model.pt, got a {saved['task']!r} model")
    return saved


def _tower_state(saved: dict, depth: int) -> dict:
    """A CLIP model.pt's vision tower as Llava's `model.vision_tower.*` keys (blocks up to `depth`)."""
    state = {}
    for key, value in saved["state_dict"].items():
        if not key.startswith("vision_model.") or key.startswith("vision_model.post_layernorm."):
            continue
        parts = key.split(".")
        if parts[1] == "layers" and int(parts[2]) >= depth:
            continue
        state["model.vision_tower." + key[len("vision_model."):]] = value
    return state


class LlavaTask(Task):
    name = "llava"
    model_section = LlavaModelSection
    headline = {"held_out_loss": "held-out loss", "vqa_accuracy": "VQA", "pope_f1": "POPE F1",
                "other_vqa_shape": "shape, drawn another way"}
    plot_metrics = {"held_out_loss": "held-out loss", "vqa_accuracy": "VQA accuracy", "pope_f1": "POPE F1",
                    "caption_bleu4": "description BLEU-4"}

    def check(self, world_size: int) -> None:
        config = self.config
        if config.train.micro_batch:
            raise ValueError("config: task llava packs conversations; use train.accumulation_steps, not "
                             "train.micro_batch")
        if config.data.source not in ("synth", "files"):
            raise ValueError(f"config: task llava reads LLaVA's JSON (data.source=files, data.conversations) or "
                             f"the bundled conversations (synth), got data.source={config.data.source!r}")
        if config.data.existence_first and (config.data.source != "synth" or config.data.template == "plain"):
            raise ValueError(f"config: data.existence_first picks a set of the bundled conversations (data.source=synth, "
                             f"a chat template), got data.source={config.data.source!r}, "
                             f"data.template={config.data.template!r}")
        check_lora(config.model.lora)
        unknown = sorted(set(config.model.lora.target_modules) - set(LLAMA_LINEARS))
        if config.model.lora.rank and unknown:  # before anything is written into the run directory
            raise ValueError(f"config: model.lora.target_modules names {unknown}, which are not linear layers of the "
                             f"language model; it has {list(LLAMA_LINEARS)}")
        if config.model.lora.quantize and config.engine.name not in ("auto", "single", "ddp"):
            raise ValueError(f"config: model.lora.quantize={config.model.lora.quantize!r} (QLoRA) runs on engines "
                             f"single and ddp; engine.name={config.engine.name!r} would shard 4-bit weights it "
                             f"cannot split (train LoRA without quantize there)")
        directory = config.model.language_model_from
        missing = [name for name in ("config.json", "tokenizer.json")
                   if directory and not os.path.isfile(os.path.join(directory, name))]
        if missing:  # before anything is written into the run directory
            raise ValueError(f"config: model.language_model_from={directory!r} has no {' or '.join(missing)} (a "
                             f"transformers model directory with its fast tokenizer, from save_pretrained)")
        if config.data.source == "files" and not config.data.conversations:
            raise ValueError("config: data.source=files with task llava needs data.conversations (LLaVA's JSON)")

    # --- data ----------------------------------------------------------------------------------------

    def _paths(self) -> tuple[str, str, str]:
        """(train JSON, held-out JSON, image folder)."""
        data = self.config.data
        if data.source == "files":
            return data.conversations, data.held_out_conversations, data.image_folder
        folder = os.path.join(data.synth_dir, "llava")
        suffix = "-captions" if data.template == "plain" else ""
        train = "train-existence" if data.existence_first and not suffix else f"train{suffix}"
        return (os.path.join(folder, f"{train}.json"), os.path.join(folder, f"held_out{suffix}.json"),
                os.path.join(folder, "images"))

    def _write_synth(self, progress: bool) -> None:
        data = self.config.data
        folder = os.path.join(data.synth_dir, "llava")
        marker = os.path.join(folder, "conversations.json")
        # a folder written before train-existence.json existed ("files"), or before the existence answers
        # said what the picture shows ("existence_reply"), is written again
        wanted = {"train": data.train_samples, "held_out": data.held_out_samples, "size": data.image_size,
                  "seed": data.seed, "geometry": data.synth_geometry, "files": ["train-existence"],
                  "existence_reply": "described"}
        if os.path.exists(marker) and json.load(open(marker)) == wanted:
            return
        synth_conversations.write_conversations(folder, train=data.train_samples, held_out=data.held_out_samples,
                                                size=data.image_size, seed=data.seed, geometry=data.synth_geometry,
                                                progress=progress)
        with open(marker, "w") as handle:
            json.dump(wanted, handle)

    def prepare(self, progress: bool, train: bool = True) -> None:
        config, placement = self.config, self.placement
        if placement.is_main and config.data.source == "synth":
            self._write_synth(progress)
        distributed.barrier()
        train_path, held_out_path, images = self._paths()
        folder = images or None
        self.train_conversations = read_conversations(train_path, folder) if train else []
        self.held_out_conversations = read_conversations(held_out_path, folder) if held_out_path else []
        if not config.data.use_images:
            self.train_conversations = [without_image(c) for c in self.train_conversations]
            self.held_out_conversations = [without_image(c) for c in self.held_out_conversations]
        path = os.path.join(config.run_dir, "tokenizer.json")
        if placement.is_main and not os.path.exists(path):
            previous = self._previous_tokenizer()
            if previous:  # a stage goes on with the tokens its model was trained on
                shutil.copyfile(previous, path)
            elif config.model.language_model_from:
                language_model_tokenizer(config.model.language_model_from).save(path)
            else:
                texts = conversation_texts(self.train_conversations or self.held_out_conversations)
                train_tokenizer(texts, config.model.text.vocab_size).save(path)
        distributed.barrier()
        self.restore(config.run_dir)
        self.pixels = self._load_images(self.train_conversations + self.held_out_conversations)
        self.train_encoded = [self._encode(c) for c in self.train_conversations]
        self.held_out_encoded = [self._encode(c) for c in self.held_out_conversations]

    def prepare_evaluation(self, progress: bool) -> None:
        self.prepare(progress, train=False)

    def _previous_tokenizer(self) -> str | None:
        source = self.config.train.init_from
        if not source:
            return None
        folder = source if os.path.isdir(source) else os.path.dirname(source)
        path, run_config = os.path.join(folder, "tokenizer.json"), os.path.join(folder, "config.yaml")
        # the run's config names its task: no need to load its weights (the trainer loads them once)
        is_llava = os.path.exists(run_config) and (yaml.safe_load(open(run_config)) or {}).get("task") == self.name
        return path if os.path.exists(path) and is_llava else None

    def _encode(self, conversation):
        inputs = len(self.pixels[conversation.image]) if conversation.image is not None else 1
        return encode(conversation, self.config.data.template, self.tokenizer, eos=EOS,
                      image_token_id=self.model_config.image_token_id, image_tokens=inputs * self.image_tokens)

    def _load_images(self, conversations) -> dict[str, torch.Tensor]:
        """Each image's tower inputs, uint8 [n, 3, S, S]: the image at the tower's size (n = 1), or with
        AnyRes (model.image_grid_pinpoints) its overview and tiles, so a larger image gets more tokens."""
        from PIL import Image

        pixels = {}
        for conversation in conversations:
            if conversation.image is not None and conversation.image not in pixels:
                with Image.open(conversation.image) as image:
                    pixels[conversation.image] = self.tower_inputs(image)
        return pixels

    def tower_inputs(self, image) -> torch.Tensor:
        """uint8 [n, 3, S, S] of one PIL image (LlavaProcessor's image_inputs)."""
        size, pinpoints = self.model_config.vision.image_size, self.model_config.image_grid_pinpoints
        return anyres_tiles(image, pinpoints, size) if pinpoints else Preprocess(size)(image)[None]

    def restore(self, run_dir: str) -> None:
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(os.path.join(run_dir, "tokenizer.json"))
        section = self.config.model
        fields = {item.name: getattr(section, item.name) for item in dataclasses.fields(LlavaConfig)}
        vision, activation = section.vision, section.vision_activation
        # the tower's input: the pictures' size, or with AnyRes (larger pictures cut into tiles) model.vision's
        tower_size = vision.image_size if section.image_grid_pinpoints else self.config.data.image_size
        if section.vision_from:
            clip = _clip_file(section.vision_from)["clip_config"]
            vision, activation = VisionConfig(**clip["vision"]), clip["activation"]
            if vision.image_size != tower_size and not section.image_grid_pinpoints:
                raise ValueError(f"config: model.vision_from's CLIP takes {vision.image_size}-pixel images, "
                                 f"data.image_size is {self.config.data.image_size}")
            tower_size = vision.image_size
        check_pinpoints(section.image_grid_pinpoints, tower_size)
        text, text_hf = dataclasses.replace(section.text, vocab_size=self.tokenizer.get_vocab_size()), {}
        if section.language_model_from:
            text, text_hf = language_model_config(section.language_model_from, text, self.tokenizer.get_vocab_size())
        fields.update(vision=dataclasses.replace(vision, image_size=tower_size),
                      vision_activation=activation, text=text, text_hf=text_hf,
                      image_token_id=self.tokenizer.token_to_id("<image>"))
        self.model_config = LlavaConfig(**fields)
        self.image_tokens = image_tokens(self.model_config)

    # --- model -----------------------------------------------------------------------------------------

    def build_model(self) -> Llava:
        if self.config.model.language_model_from:
            model = llava_with_language_model(
                language_model(self.config.model.language_model_from, self.tokenizer.get_vocab_size()),
                self.model_config)
        else:
            model = Llava(self.model_config)
        if self.config.model.vision_from:
            model.load_state_dict(_tower_state(_clip_file(self.config.model.vision_from),
                                               self.model_config.feature_depth), strict=False)
        return model

    def adapt(self, model: Llava) -> Llava:
        """model.lora: adapters on the language model's linear layers (its other weights frozen)."""
        device = self.placement.device if self.placement else "cpu"
        add_lora(model.model.language_model, self.config.model.lora, device)
        return model

    def initial_weights(self, model, saved: dict) -> None:
        """train.init_from: a llava model.pt (strict), or a CLIP's or masked autoencoder's (its vision tower:
        how a recipe's contrastive stage hands its tower on)."""
        tower = saved_tower(saved)
        if tower is not None:
            check_tower(tower["vision"], self.model_config.vision, self.model_config.feature_depth, "train.init_from")
            activation = tower["activation"]
            if activation != self.model_config.vision_activation:
                raise ValueError(f"config: train.init_from's vision tower uses {activation!r}, model.vision_activation "
                                 f"is {self.model_config.vision_activation!r}")
            missing, unexpected = model.load_state_dict(_tower_state(saved, self.model_config.feature_depth),
                                                        strict=False)
            if unexpected or any(key.startswith("model.vision_tower.") for key in missing):
                raise ValueError(f"config: train.init_from's CLIP vision tower does not fit model.vision "
                                 f"(missing {[k for k in missing if 'vision_tower' in k][:4]}, unexpected "
                                 f"{unexpected[:4]})")
            return
        model.load_state_dict(saved["state_dict"])

    # --- batches and loss --------------------------------------------------------------------------------

    def _pack(self, samples) -> tuple[torch.Tensor, ...]:
        """One micro-batch: (input_ids [total], labels [total], cu_seqlens [n + 1], pixels [images, 3, H, W])."""
        lengths = torch.tensor([0] + [len(sample.input_ids) for sample in samples])
        size = self.model_config.vision.image_size
        images = [self.pixels[sample.image] for sample in samples if sample.image is not None]
        pixels = torch.cat(images) if images else torch.zeros(0, 3, size, size, dtype=torch.uint8)
        return (torch.cat([sample.input_ids for sample in samples]), torch.cat([sample.labels for sample in samples]),
                lengths.cumsum(0).to(torch.int32), pixels)

    def batches(self, accumulation: int, start: int):
        """This rank's micro-batches of every global batch of data.batch_size conversations, each packed
        into one sequence set, after the count of supervised tokens in the whole global batch (so the
        loss is the global batch's token mean on any number of ranks)."""
        data, seed, placement = self.config.data, self.config.train.seed, self.placement
        supervised = torch.tensor([int((sample.labels != IGNORE).sum()) for sample in self.train_encoded])
        step = start
        while True:
            rows = batch_indices(step, len(self.train_encoded), data.batch_size, seed)
            count = supervised[rows].sum().clamp(min=1).reshape(1)
            mine = rows.view(accumulation, placement.world_size, -1)[:, placement.rank]
            parts = [self._pack([self.train_encoded[int(index)] for index in part]) for part in mine]
            yield (count, *[tensor for part in parts for tensor in part])
            step += 1

    def _token_losses(self, model, input_ids, labels, cu_seqlens, pixels):
        return model(input_ids, pixels if len(pixels) else None, cu_seqlens=cu_seqlens, labels=labels)

    def loss(self, model, batch) -> torch.Tensor:
        """The mean loss over one packed micro-batch's supervised tokens."""
        input_ids, labels, cu_seqlens, pixels = batch
        losses = self._token_losses(model, input_ids, labels, cu_seqlens, pixels)
        return losses.sum() / (labels != IGNORE).sum().clamp(min=1)

    def forward_backward(self, engine, batch) -> torch.Tensor:
        count, parts = batch[0], [batch[index:index + 4] for index in range(1, len(batch), 4)]
        scale = engine.accumulation * self.placement.world_size / count.float()  # undone by the engine's means
        total = torch.zeros((), device=count.device)
        self.last_cu_seqlens = [cu_seqlens for _, _, cu_seqlens, _ in parts]  # read by log(), at logged steps only
        for index, (input_ids, labels, cu_seqlens, pixels) in enumerate(parts):
            with engine.autocast():
                losses = self._token_losses(engine.wrapped, input_ids, labels, cu_seqlens, pixels)
            part = losses.float().sum() * scale
            engine.backward(part, sync=index == len(parts) - 1)
            total = total + part.detach() / engine.accumulation
        return total  # the ranks' mean is the global batch's token mean

    def log(self, engine) -> dict:
        """This rank's last batch: its real tokens, and `padded_efficiency`. The batches are packed, so no
        slot is padding; right-padded to each micro-batch's longest conversation (the usual collator's
        layout) they would keep this share of real tokens: what packing saves."""
        lengths = [cu_seqlens.diff().cpu() for cu_seqlens in getattr(self, "last_cu_seqlens", [])]
        if not lengths:
            return {}
        real = sum(int(part.sum()) for part in lengths)
        padded = sum(len(part) * int(part.max()) for part in lengths if len(part))
        return {"tokens": real, "padded_efficiency": real / max(1, padded)}

    def flops_per_sample(self) -> float:
        """Training FLOPs of one conversation: 6 x the language model's parameters per token, plus the
        tower's forward (2 x its parameters per patch, frozen)."""
        text = self.model_config.text
        per_layer = 4 * text.hidden_size ** 2 + 3 * text.hidden_size * text.intermediate_size
        parameters = text.num_hidden_layers * per_layer + text.hidden_size * text.vocab_size
        vision = self.model_config.vision
        inputs = sum(len(value) for value in self.pixels.values()) / max(len(self.pixels), 1)  # AnyRes: > 1
        tower = self.model_config.feature_depth * 12 * vision.width ** 2 * self.image_tokens * inputs
        return 6.0 * parameters * self.tokens_per_sample() + 2.0 * tower

    def tokens_per_sample(self) -> int:
        encoded = self.train_encoded or self.held_out_encoded
        return max(1, round(sum(len(sample.input_ids) for sample in encoded) / max(len(encoded), 1)))

    # --- results -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        """Held-out token loss of the run's template; with images and a chat template, answers generated
        to each held-out question asked alone (greedy), scored as VQA accuracy per question type and as
        POPE on the yes/no existence questions."""
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        samples = self.held_out_encoded[:500]
        total = count = 0.0
        for start in range(0, len(samples), 64):
            input_ids, labels, cu_seqlens, pixels = (t.to(device) for t in self._pack(samples[start:start + 64]))
            losses = self._token_losses(model, input_ids, labels, cu_seqlens, pixels)
            total, count = total + losses.sum().item(), count + (labels != IGNORE).sum().item()
        result = {"held_out_loss": total / max(count, 1)}
        if self.config.data.use_images and self.config.data.template != "plain" and self.config.data.source == "synth":
            result.update(self._answers(model, device))
        model.train(was_training)
        return result

    def _answers(self, model, device, limit: int = 200) -> dict:
        """VQA and POPE over the bundled held-out questions (their types and answers are known)."""
        folder = os.path.dirname(self._paths()[1])
        with open(os.path.join(folder, "held_out.json")) as handle:
            entries = json.load(handle)[:limit]
        questions = [(entry, item) for entry in entries for item in entry["questions"]
                     if item["type"] in VQA_TYPES + ("exists",)]
        answers = self._generate(model, device, folder, questions, max_new_tokens=12)  # 'Each is a ..., so no.'
        result, by_type = {}, {}
        for (_, item), answer in zip(questions, answers):
            by_type.setdefault(item["type"], []).append((answer, item["answer"]))
        scored = [vqa_accuracy(answer, [truth]) for kind in VQA_TYPES for answer, truth in by_type.get(kind, [])]
        for kind in VQA_TYPES:
            if by_type.get(kind):
                result[f"vqa_{kind}"] = sum(vqa_accuracy(a, [t]) for a, t in by_type[kind]) / len(by_type[kind])
        if scored:
            result["vqa_accuracy"] = sum(scored) / len(scored)
        if by_type.get("exists"):
            pope = pope_metrics([a for a, _ in by_type["exists"]], [t for _, t in by_type["exists"]])
            result.update({f"pope_{key}": value for key, value in pope.items()})
        descriptions = [(entry, item) for entry in entries for item in entry["questions"] if item["type"] == "describe"]
        if descriptions:  # the description as a caption, scored as COCO scores captions
            generated = self._generate(model, device, folder, descriptions, max_new_tokens=24)
            references = [[item["answer"]] for _, item in descriptions]
            result["caption_bleu4"] = bleu(generated, references)[3]
            result["caption_cider"] = cider_d(generated, references)
        result.update(self._multiple_choice(model, device, folder, entries))
        result.update(self._drawn_another_way(model, device))
        return result

    def _multiple_choice(self, model, device, folder: str, entries, count: int = 100) -> dict:
        """MMBench's CircularEval on four-option shape questions about held-out pictures: right only if
        every rotation of the options gets the right option, by letter or by naming it
        (`choice_circular`); `choice_single`: the first order alone."""
        rng = numpy.random.default_rng(0)  # the same questions at every evaluation
        items = [(entry, *choice_question("shape", entry["meta"]["shape"], rng)[1:]) for entry in entries[:count]]
        rotations = [(entry, {"question": choice_text("shape", options[shift:] + options[:shift])})
                     for entry, options, _ in items for shift in range(len(options))]
        replies = iter(self._generate(model, device, folder, rotations, max_new_tokens=3))
        circular = single = 0
        for entry, options, index in items:
            answers = [next(replies) for _ in options]
            single += chosen_option(answers[0], len(options), options) == index
            pending = iter(answers)
            circular += circular_eval(lambda question, rotated: chosen_option(next(pending), len(rotated), rotated),
                                      "", options, index)
        return {"choice_circular": circular / max(len(items), 1), "choice_single": single / max(len(items), 1)}

    def _generate(self, model, device, folder: str, questions, max_new_tokens: int) -> list[str]:
        """Greedy answers to (entry, question) pairs of the bundled JSON, each asked alone about its picture."""
        answers = []
        for start in range(0, len(questions), 64):
            chunk = questions[start:start + 64]
            images = [self.pixels[os.path.join(folder, "images", entry["image"])] for entry, _ in chunk]
            prompts = [self.prompt_ids(item["question"], image_inputs=len(inputs)).to(device)
                       for (_, item), inputs in zip(chunk, images)]
            pixels = torch.cat(images)
            outputs = model.generate_packed(prompts, pixels.to(device), max_new_tokens=max_new_tokens,
                                            eos_token_id=self.tokenizer.token_to_id(EOS))
            answers += [self.tokenizer.decode(output.tolist(), skip_special_tokens=True).strip() for output in outputs]
        return answers

    def _drawn_another_way(self, model, device, count: int = 216) -> dict:
        """Color and shape questions about pictures another renderer drew (mmfast.data.other_renderer:
        one shape each, every color x shape x background band equally often): `other_vqa_color`,
        `other_vqa_shape`."""
        from mmfast.data.other_renderer import other_renderer_set

        from PIL import Image

        pictures, metas = other_renderer_set(count, self.config.data.image_size)
        images = torch.stack([self.tower_inputs(Image.fromarray(picture.permute(1, 2, 0).numpy()))
                              for picture in pictures])  # [count, n, 3, S, S]: one size, one n
        result = {}
        for kind, question in (("color", "What color is the shape?"), ("shape", "What shape is shown?")):
            prompt = self.prompt_ids(question, image_inputs=images.shape[1]).to(device)
            answers = []
            for start in range(0, count, 64):
                chunk = images[start:start + 64].flatten(0, 1).to(device)
                outputs = model.generate_packed([prompt] * (len(chunk) // images.shape[1]), chunk, max_new_tokens=8,
                                                eos_token_id=self.tokenizer.token_to_id(EOS))
                answers += [self.tokenizer.decode(o.tolist(), skip_special_tokens=True) for o in outputs]
            result[f"other_vqa_{kind}"] = sum(vqa_accuracy(answer, [meta[kind]])
                                              for answer, meta in zip(answers, metas)) / count
        return result

    def prompt_ids(self, question: str, image_inputs: int = 0) -> torch.Tensor:
        """A one-question prompt in the run's template, up to where the assistant's answer begins, about an
        image of `image_inputs` tower inputs (0: no image; with AnyRes its overview and tiles)."""
        image = "<image>" if image_inputs else ""
        if self.config.data.template == "vicuna_v1":
            text = f"{VICUNA_SYSTEM} USER: {image}{question} ASSISTANT:"
        else:
            raise ValueError(f"prompt_ids: generation prompts are written for template vicuna_v1, got "
                             f"{self.config.data.template!r}")
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        image_id = self.tokenizer.token_to_id("<image>")
        expanded = [token for piece in ids for token in
                    ([self.model_config.image_token_id] * self.image_tokens * image_inputs if piece == image_id
                     else [piece])]
        return torch.tensor(expanded, dtype=torch.long)

    def export(self, run_dir: str, folder: str) -> str:
        path = os.path.join(run_dir, "model.pt")
        state, lora = checkpoint.consolidate(folder), self.config.model.lora
        if lora.rank:  # served and chained as a plain model
            state = merge_lora(state, lora.scaling)
        torch.save({"task": self.name, "llava_config": dataclasses.asdict(self.model_config),
                    "template": self.config.data.template, "state_dict": state}, path)
        return path

    @classmethod
    def load_file(cls, saved: dict, directory: str, device="cpu"):
        """(Llava, tokenizer)."""
        from tokenizers import Tokenizer

        fields = dict(saved["llava_config"])
        fields["vision"], fields["text"] = VisionConfig(**fields["vision"]), LlamaConfig(**fields["text"])
        model = Llava(LlavaConfig(**fields))
        model.load_state_dict(saved["state_dict"])
        return model.to(device).eval(), Tokenizer.from_file(os.path.join(directory, "tokenizer.json"))
