"""The encoder + LLM generative model (LLaVA): a CLIP vision tower's patch features at a chosen layer,
projected into the language model's embedding space, take the places of the image tokens among the
text tokens; the decoder (mmfast.models.llama) predicts the text.

Module names are HF's LlavaForConditionalGeneration's (`model.vision_tower`, `model.multi_modal_projector`
with `linear_1`/`linear_2`, `model.language_model`, `lm_head`), the vision tower's are mmfast's CLIP
tower's (HF's `encoder.layers` -> `layers`, `out_proj` -> `o_proj`), so `from_hf_llava` and `to_hf_llava`
are renames. Sequences are packed (`cu_seqlens`, many conversations per row, no padding) or padded
`[B, T]`; with `image_attention="bidirectional"` each image is a bidirectional span inside causal text
(LLaVA's own is causal).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
from torch import nn

from mmfast.models.clip import VisionConfig, VisionTransformer, patch_count
from mmfast.models.decoding import check_decoding, decode
from mmfast.models.hf_language_model import (HFDecodingCache, decoder_layers, hf_decoder, run_hf_decoder,
                                             switch_to_mmfast)
from mmfast.models.llama import LlamaConfig, LlamaModel, hf_config_of, llama_config_of_hf
from mmfast.nn.kv_cache import KVCache
from mmfast.nn.linear_cross_entropy import LinearCrossEntropy
from mmfast.nn.patch_embed import SiglipVisionEmbeddings
from mmfast.ops.mixed_attention import span_ids_from_token_ids

PROJECTORS = ("linear", "mlp2x_gelu")
TOWERS = ("clip", "siglip")  # SigLIP's: patches with a bias, no class token, no norm before the blocks
SELECT_STRATEGIES = ("default", "full")  # HF's names: drop the class token, or keep it
IMAGE_ATTENTION = ("causal", "bidirectional")


@dataclass(kw_only=True)
class LlavaConfig:
    vision: VisionConfig = field(default_factory=lambda: VisionConfig(image_size=32, patch_size=8, width=128,
                                                                      layers=4, heads=4))
    text: LlamaConfig = field(default_factory=LlamaConfig)
    vision_tower: str = "clip"
    vision_activation: str = "quick_gelu"  # the tower's (mmfast.models.clip.ACTIVATIONS; SigLIP: gelu_tanh)
    vision_feature_layer: int = -2  # HF's hidden-state index: 0 the embeddings, -1 the last layer's output
    vision_feature_select_strategy: str = "default"
    projector: str = "mlp2x_gelu"
    image_token_id: int = 0
    image_attention: str = "causal"
    # AnyRes ([height, width] grids, multiples of the tower's input; mmfast.data.anyres): an image becomes an
    # overview plus tiles, each a tower input of `image_tokens` tokens; empty: one tower input per image
    image_grid_pinpoints: list = field(default_factory=list)
    # an HF causal LM's config (its to_dict()): set, the language model is that transformers model's decoder
    # on mmfast attention (llava_with_language_model sets it and text's sizes); empty: mmfast's decoder
    text_hf: dict = field(default_factory=dict)

    def __post_init__(self):
        for name, allowed in (("vision_feature_select_strategy", SELECT_STRATEGIES), ("projector", PROJECTORS),
                              ("image_attention", IMAGE_ATTENTION), ("vision_tower", TOWERS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"LlavaConfig: {name} must be one of {allowed}, got {getattr(self, name)!r}")
        layers = self.vision.layers
        if not -(layers + 1) <= self.vision_feature_layer <= layers:
            raise ValueError(f"LlavaConfig: vision_feature_layer must index the tower's {layers + 1} hidden states "
                             f"(from {-(layers + 1)} to {layers}), got {self.vision_feature_layer}")

    @property
    def feature_depth(self) -> int:
        """How many of the tower's blocks the selected features pass through (the rest never run)."""
        layer = self.vision_feature_layer
        return layer if layer >= 0 else self.vision.layers + 1 + layer


def image_tokens(config: LlavaConfig) -> int:
    """Image tokens per image: the tower's tokens (patches, and CLIP's class token), less the first with
    strategy "default" (HF drops the first token whatever it is: a SigLIP tower loses a patch)."""
    tokens = patch_count(config.vision) + (config.vision_tower == "clip")
    return tokens - (config.vision_feature_select_strategy == "default")


def vision_tower(config: LlavaConfig) -> VisionTransformer:
    """mmfast's CLIP tower, or SigLIP's shape of it (its embeddings, no norm before the blocks)."""
    tower = VisionTransformer(config.vision, config.vision_activation, config.text.backend)
    if config.vision_tower == "siglip":
        vision = config.vision
        hf_like = SimpleNamespace(hidden_size=vision.width, image_size=vision.image_size,
                                  patch_size=vision.patch_size, num_channels=vision.channels)
        tower.embeddings = SiglipVisionEmbeddings(hf_like, mean=vision.mean, std=vision.std,
                                                  stride=vision.patch_stride, backend=config.text.backend)
        nn.init.normal_(tower.embeddings.position_embedding.weight, std=0.02)  # as the CLIP tower's
        tower.pre_layrnorm = nn.Identity()
    return tower


class Projector(nn.Module):
    """linear_1, then for mlp2x_gelu a GELU and linear_2 (LLaVA-1.5's; HF's LlavaMultiModalProjector)."""

    def __init__(self, kind: str, vision_width: int, text_width: int):
        super().__init__()
        self.linear_1 = nn.Linear(vision_width, text_width)
        if kind == "mlp2x_gelu":
            self.act = nn.GELU()
            self.linear_2 = nn.Linear(text_width, text_width)

    def forward(self, x):
        x = self.linear_1(x)
        return self.linear_2(self.act(x)) if hasattr(self, "linear_2") else x


class LlavaModel(nn.Module):
    def __init__(self, config: LlavaConfig, language_model: nn.Module | None = None):
        super().__init__()
        self.vision_tower = vision_tower(config)
        # blocks past the selected layer and the final norm never run: drop them (and their parameters)
        del self.vision_tower.layers[config.feature_depth:]
        self.vision_tower.post_layernorm = nn.Identity()
        self.multi_modal_projector = Projector(config.projector, config.vision.width, config.text.hidden_size)
        if language_model is None:
            language_model = hf_decoder(config.text_hf) if config.text_hf else LlamaModel(config.text)
        self.language_model = language_model


class Llava(nn.Module):
    """`forward(input_ids, pixel_values, ...)`: logits, or with labels the per-token losses.

    input_ids hold `image_token_id` once per image feature (`image_tokens` per image: the tower's
    patches, plus one with the class token kept), the images in order; pixel_values `[N, C, H, W]`
    (uint8 when the tower's config has a mean and std, else normalized floats, as HF's processor gives).
    With AnyRes each image is several tower inputs (its overview and tiles, mmfast.data.anyres): N counts
    those, and the image's tokens are theirs, in order.
    """

    def __init__(self, config: LlavaConfig, language_model: nn.Module | None = None):
        """language_model: the decoder to use (llava_with_language_model's), else one built from config."""
        super().__init__()
        self.config = config
        self.model = LlavaModel(config, language_model)
        self.lm_head = LinearCrossEntropy(config.text.hidden_size, config.text.vocab_size, bias=False,
                                          reduction="none", backend=config.text.backend)
        if config.text.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.model.language_model.get_input_embeddings()

    def _language_model(self, embeds: torch.Tensor, **packing) -> torch.Tensor:
        """The decoder's final hidden states: mmfast's, or an HF decoder's (whose generation cache is
        HFDecodingCache's, kept by generate_packed: mmfast's KVCache arguments do not reach it)."""
        if isinstance(self.model.language_model, LlamaModel):
            return self.model.language_model(inputs_embeds=embeds, **packing)
        for name in ("cache", "cache_rows"):
            packing.pop(name, None)
        return run_hf_decoder(self.model.language_model, embeds, **packing)

    @property
    def image_tokens(self) -> int:
        return image_tokens(self.config)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        language_model = self.model.language_model
        if isinstance(language_model, LlamaModel):
            language_model.grad_checkpointing = enable
        elif enable:
            language_model.gradient_checkpointing_enable({"use_reentrant": False})
        else:
            language_model.gradient_checkpointing_disable()

    def blocks(self) -> list[nn.Module]:
        """The units an engine shards, compiles or checkpoints (the language model's layers)."""
        return decoder_layers(self.model.language_model)

    def towers(self) -> dict[str, nn.Module]:
        """The encoder feeding the language model: kept whole on every rank when frozen (as LLaVA's
        stages freeze it) by the engines that shard parameters."""
        return {"model.vision_tower": self.model.vision_tower}

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> projected features [N, image_tokens, text hidden]. A tower with no trainable
        parameter runs without autograd (stage 1 and 2 of LLaVA freeze it)."""
        tower = self.model.vision_tower
        frozen = not any(parameter.requires_grad for parameter in tower.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            x = tower.pre_layrnorm(tower.embeddings(pixel_values))
            for layer in tower.layers:
                x = layer(x)
        if self.config.vision_feature_select_strategy == "default":
            x = x[:, 1:]
        return self.model.multi_modal_projector(x)

    def _check_images(self, places: torch.Tensor, pixel_values: torch.Tensor | None) -> int:
        """The number of images, checked against the image tokens (`places`: where they are)."""
        images = 0 if pixel_values is None else pixel_values.shape[0]
        expected, found = images * self.image_tokens, int(places.sum())
        if found != expected:
            raise ValueError(f"Llava: input_ids hold {found} image tokens (id {self.config.image_token_id}), "
                             f"expected {self.image_tokens} for each of the {images} images, {expected} in all")
        return images

    def embeddings(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """The token embeddings with the image features in the image tokens' places."""
        embeds = self.embed_tokens(input_ids)
        places = input_ids == self.config.image_token_id
        images = self._check_images(places, pixel_values)
        if images:
            features = self.image_features(pixel_values).to(embeds.dtype).reshape(-1, embeds.shape[-1])
            embeds = embeds.masked_scatter(places[..., None], features)
        return embeds

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None, *,
                cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None,
                position_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                ignore_index: int = -100) -> torch.Tensor:
        """Padded `[B, T]` or packed `[total]` input_ids (with cu_seqlens); labels as LlamaForCausalLM's
        (already shifted). Returns logits, or with labels the per-token losses."""
        span_ids = None
        if self.config.image_attention == "bidirectional":
            span_ids = span_ids_from_token_ids(input_ids, self.config.image_token_id)
        hidden = self._language_model(self.embeddings(input_ids, pixel_values), cu_seqlens=cu_seqlens,
                                      max_seqlen=max_seqlen, span_ids=span_ids, position_ids=position_ids)
        if labels is None:
            return self.lm_head(hidden)
        return self.lm_head(hidden, labels, ignore_index=ignore_index)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, *, max_new_tokens: int = 20, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, eos_token_id: int | None = None,
                 pad_token_id: int = 0, generator: torch.Generator | None = None) -> torch.Tensor:
        """transformers' form: left-padded `[B, T]` input_ids (and their attention_mask) -> `[B, T + new]`,
        the prompts then the new tokens, rows that ended early padded with pad_token_id. Greedy unless
        do_sample. The prompts run packed (padding removed), see generate_packed."""
        if input_ids.dim() != 2:
            raise ValueError(f"Llava.generate: expected input_ids [B, T], got shape {tuple(input_ids.shape)}")
        keep = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        prompts = [row[mask] for row, mask in zip(input_ids, keep)]
        new = self.generate_packed(prompts, pixel_values, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                                   temperature=temperature if do_sample else 0.0, top_p=top_p, generator=generator)
        width = max((len(tokens) for tokens in new), default=0)
        out = torch.full((len(prompts), input_ids.shape[1] + width), pad_token_id, dtype=input_ids.dtype,
                         device=input_ids.device)
        out[:, :input_ids.shape[1]] = input_ids
        for row, tokens in enumerate(new):
            out[row, input_ids.shape[1]:input_ids.shape[1] + len(tokens)] = tokens.to(out.device)
        return out

    @torch.no_grad()
    def generate_packed(self, prompts: list[torch.Tensor], pixel_values: torch.Tensor | None = None, *,
                        max_new_tokens: int = 16, eos_token_id: int | None = None, temperature: float = 0.0,
                        top_p: float = 1.0, generator: torch.Generator | None = None,
                        use_cache: bool = True) -> list[torch.Tensor]:
        """The new tokens of each prompt (1-D ids holding their image tokens; pixel_values: their images
        in order), greedy (temperature 0) or sampled with temperature and top-p. Prompts of any lengths
        run packed, with no padding; a row stops at eos_token_id (kept in its output). With use_cache
        the prompts run once and each step runs one token per row against a KV cache (mmfast's; an HF
        decoder's: transformers' DynamicCache over the left-padded prompts); without, each step runs the
        whole sequences again (the same tokens, slower). Image features are computed once."""
        check_decoding("Llava.generate_packed", max_new_tokens, temperature, top_p)
        images_per_prompt = [int((prompt == self.config.image_token_id).sum()) // self.image_tokens for prompt in prompts]
        features = None
        ids = torch.cat(prompts) if prompts else torch.zeros(0, dtype=torch.long)
        if self._check_images(ids == self.config.image_token_id, pixel_values):
            features = self.image_features(pixel_values)
        first_image = [sum(images_per_prompt[:index]) for index in range(len(prompts))]

        def run(rows: list[int], sequences: list[torch.Tensor], whole: bool) -> torch.Tensor:
            """The next-token logits of each of `rows`, whose tokens are `sequences` (whole: from the
            prompt on, with its images; else one new token after the cached ones)."""
            ids = torch.cat(sequences)
            embeds = self.embed_tokens(ids)
            chosen = [features[first_image[row] + k] for row in rows for k in range(images_per_prompt[row])
                      if features is not None and whole]
            if chosen:  # the prompts' image tokens (generated tokens are text)
                places = (ids == self.config.image_token_id)[:, None]
                embeds = embeds.masked_scatter(places, torch.cat(chosen).to(embeds.dtype))
            lengths = torch.tensor([0] + [len(sequence) for sequence in sequences])
            cu_seqlens = lengths.cumsum(0).to(torch.int32).to(ids.device)
            bidirectional = self.config.image_attention == "bidirectional"
            if hf_cache is not None:
                if not whole:
                    return self.lm_head(hf_cache.step(rows, embeds)).float()
                spans = span_ids_from_token_ids(ids, self.config.image_token_id) if bidirectional else None
                bounds = cu_seqlens.tolist()
                hidden = hf_cache.prompts(rows, [embeds[start:end] for start, end in zip(bounds, bounds[1:])],
                                          None if spans is None else [spans[start:end] for start, end
                                                                      in zip(bounds, bounds[1:])])
                return self.lm_head(hidden).float()
            hidden = self._language_model(
                embeds, cu_seqlens=cu_seqlens, cache=cache,
                cache_rows=None if cache is None else torch.tensor(rows, device=ids.device),
                span_ids=span_ids_from_token_ids(ids, self.config.image_token_id) if bidirectional else None)
            return self.lm_head(hidden[cu_seqlens[1:].long() - 1]).float()

        cache = hf_cache = None
        if use_cache and isinstance(self.model.language_model, LlamaModel):
            cache = KVCache(len(prompts), max((len(prompt) for prompt in prompts), default=0) + max_new_tokens)
        elif use_cache:
            hf_cache = HFDecodingCache(self.model.language_model)
        return decode(run, prompts, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, temperature=temperature,
                      top_p=top_p, generator=generator, cached=use_cache)


def language_model_sizes(hf_text_config, text: LlamaConfig) -> LlamaConfig:
    """`text` with an HF language model's sizes and tying: what the rest of mmfast reads of config.text
    (the projector's width, the head, FLOPs) when the decoder is transformers' own."""
    hf = hf_text_config
    return dataclasses.replace(text, hidden_size=hf.hidden_size, vocab_size=hf.vocab_size,
                               tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
                               num_hidden_layers=getattr(hf, "num_hidden_layers", text.num_hidden_layers),
                               intermediate_size=getattr(hf, "intermediate_size", text.intermediate_size))


def llava_with_language_model(causal_lm, config: LlavaConfig) -> Llava:
    """A Llava whose language model is `causal_lm`, any transformers causal LM (e.g.
    `AutoModelForCausalLM.from_pretrained(local_dir)`), switched to mmfast attention: its decoder becomes
    `model.language_model` (its weights, HF's names) and its output head's weight `lm_head` (tied when its
    config ties them). config's vision tower and projector are built fresh; its `text` takes the LM's
    hidden size, vocabulary and tying, and `text_hf` its config, so the saved model is rebuilt the same
    way. Training runs it packed like mmfast's decoder; generation runs without a KV cache."""
    head = causal_lm.get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None:
        raise ValueError(f"llava_with_language_model: expected a causal LM with a bias-free output head, got "
                         f"{type(causal_lm).__name__} with {head!r}")
    switch_to_mmfast(causal_lm)
    text = language_model_sizes(causal_lm.config, config.text)
    model = Llava(dataclasses.replace(config, text=text, text_hf=causal_lm.config.to_dict()), causal_lm.base_model)
    if not text.tie_word_embeddings:
        with torch.no_grad():
            model.lm_head.weight.copy_(head.weight)
    return model


def _unused_by_llava(key: str, depth: int) -> bool:
    """An HF vision-tower key LLaVA never reads: a block past the selected layer, the final norm, or
    SigLIP's pooling head."""
    found = re.match(r"model\.vision_tower\.(?:encoder\.)?(?:layers\.(\d+)\.|post_layernorm\.|head\.)", key)
    return bool(found) and (found.group(1) is None or int(found.group(1)) >= depth)


_VISION_RENAMES = [(r"\.encoder\.layers\.", ".layers."), (r"\.self_attn\.out_proj\.", ".self_attn.o_proj.")]


def from_hf_llava(hf_model, backend: str | None = None, *, mean=None, std=None) -> Llava:
    """A Llava with the weights of an HF LlavaForConditionalGeneration (CLIP or SigLIP vision tower; any
    language model: a Llama or Qwen2 becomes mmfast's decoder, any other stays transformers' own on mmfast
    attention, as llava_with_language_model keeps it). mean, std: set to take uint8 pixels normalized inside the tower (the HF processor's
    image_mean / image_std); None takes HF's normalized float pixel_values."""
    hf_config = hf_model.config
    vision = hf_config.vision_config
    if vision.model_type not in ("clip_vision_model", "clip", "siglip_vision_model"):
        raise ValueError(f"from_hf_llava: the vision tower must be CLIP's or SigLIP's, got {vision.model_type!r}")
    activations = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh"}
    if vision.hidden_act not in activations:
        raise ValueError(f"from_hf_llava: the tower's hidden_act must be one of {sorted(activations)}, got "
                         f"{vision.hidden_act!r}")
    if not isinstance(hf_config.vision_feature_layer, int):
        raise ValueError(f"from_hf_llava: one vision feature layer is implemented, got "
                         f"{hf_config.vision_feature_layer!r}")
    if hf_config.projector_hidden_act != "gelu" or not getattr(hf_config, "multimodal_projector_bias", True):
        raise ValueError(f"from_hf_llava: the projector must be LLaVA's (GELU, biases), got "
                         f"{hf_config.projector_hidden_act!r}")
    try:
        text, text_hf = llama_config_of_hf(hf_config.text_config, backend), {}
    except ValueError:  # not a decoder mmfast's covers (another architecture, rotary scaling, windows)
        text_hf = hf_config.text_config.to_dict()
        text = language_model_sizes(hf_config.text_config, LlamaConfig(backend=backend))
    config = LlavaConfig(
        vision=VisionConfig(image_size=vision.image_size, patch_size=vision.patch_size, channels=vision.num_channels,
                            width=vision.hidden_size, layers=vision.num_hidden_layers,
                            heads=vision.num_attention_heads, mlp_ratio=vision.intermediate_size / vision.hidden_size,
                            mean=mean, std=std),
        text=text, text_hf=text_hf,
        vision_tower="siglip" if vision.model_type == "siglip_vision_model" else "clip",
        vision_activation=activations[vision.hidden_act],
        vision_feature_layer=hf_config.vision_feature_layer,
        vision_feature_select_strategy=hf_config.vision_feature_select_strategy,
        projector="mlp2x_gelu", image_token_id=hf_config.image_token_id)
    model = Llava(config)
    state = {}
    depth = config.feature_depth
    for key, value in hf_model.state_dict().items():
        for pattern, replacement in _VISION_RENAMES:
            key = re.sub(pattern, replacement, key)
        if not _unused_by_llava(key, depth):
            state[key] = value
    if config.text.tie_word_embeddings:
        state.setdefault("lm_head.weight", model.embed_tokens.weight)
    model.load_state_dict(state, strict=True)
    return model


def to_hf_llava(model: Llava):
    """The HF LlavaForConditionalGeneration with `model`'s weights (the vision tower's unused last blocks
    are left as HF initializes them: LLaVA never reads them)."""
    import transformers

    config = model.config
    if config.projector != "mlp2x_gelu":
        raise ValueError(f"to_hf_llava: HF's LLaVA has the mlp2x_gelu projector only, got {config.projector!r}")
    if config.vision.patch_stride not in (None, config.vision.patch_size):
        raise ValueError("to_hf_llava: HF's CLIP tower has no overlapping patches (vision.patch_stride)")
    if config.image_attention != "causal":
        raise ValueError("to_hf_llava: HF's LLaVA attends causally over image tokens; image_attention="
                         f"{config.image_attention!r} would give other outputs")
    if config.image_grid_pinpoints:
        raise ValueError("to_hf_llava: AnyRes tiles (image_grid_pinpoints) are LLaVA-NeXT's; HF's "
                         "LlavaForConditionalGeneration would see one tower input per image")
    vision = config.vision
    siglip = config.vision_tower == "siglip"
    vision_class = transformers.SiglipVisionConfig if siglip else transformers.CLIPVisionConfig
    vision_config = vision_class(
        hidden_size=vision.width, intermediate_size=int(vision.width * vision.mlp_ratio),
        num_hidden_layers=vision.layers, num_attention_heads=vision.heads, num_channels=vision.channels,
        image_size=vision.image_size, patch_size=vision.patch_size,
        hidden_act={"gelu_tanh": "gelu_pytorch_tanh"}.get(config.vision_activation, config.vision_activation))
    hf_config = transformers.LlavaConfig(
        vision_config=vision_config,
        text_config=transformers.AutoConfig.for_model(**config.text_hf) if config.text_hf else hf_config_of(config.text),
        image_token_id=config.image_token_id,
        vision_feature_layer=config.vision_feature_layer,
        vision_feature_select_strategy=config.vision_feature_select_strategy, projector_hidden_act="gelu",
        image_seq_length=model.image_tokens, tie_word_embeddings=config.text.tie_word_embeddings)
    hf_model = transformers.LlavaForConditionalGeneration(hf_config)
    state = {}
    for key, value in model.state_dict().items():
        key = re.sub(r"^model\.vision_tower\.layers\.", "model.vision_tower.encoder.layers.", key)
        state[re.sub(r"\.self_attn\.o_proj\.", ".self_attn.out_proj.", key) if "vision_tower" in key else key] = value
    missing, unexpected = hf_model.load_state_dict(state, strict=False)
    untouched = [key for key in missing if not _unused_by_llava(key, config.feature_depth)]
    if unexpected or untouched:
        raise RuntimeError(f"to_hf_llava: weights do not map, missing {untouched}, unexpected {unexpected}")
    return hf_model

