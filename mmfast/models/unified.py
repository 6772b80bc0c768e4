"""The unified any-to-any model (paradigm 3), shaped as Transfusion: one decoder (mmfast's Llama blocks on
MixedAttention) over packed sequences in which text is causal and every image, audio clip and video
clip is a bidirectional span; text leaves through the LM head, images and spectrograms through a
flow-matching head on their patches.

Sequences (token ids; SPECIAL_TOKENS follow the caption tokenizer's vocabulary, P is the modality's
patch placeholder, whose embedding is its patch's):
- X -> text: `<image> P ... P </image> <sot> caption <eot>`: clean patches (time 0); next-token loss on
  the caption and <eot>.
- text -> X: `<to_image> <sot> caption <eot> <image> P ... P </image>`: the patches noised to time t
  (rectified flow: x_t = (1 - t) x_0 + t noise); the model predicts the velocity noise - x_0 at each
  patch (MSE). Without the caption (`<to_image> <image> ...`) the same span is the unconditional
  branch of classifier-free guidance.
Images are pixels in [-1, 1] in patches (the fused patch_embed on float input); audio is the fused
log-mel spectrogram, log10 power floored 8 decades below each clip's peak and scaled to [-1, 1], in
patches of every mel band over a few frames; video is uint8 tubelets (TubeletEmbed), input only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from mmfast.audio import griffin_lim, mel_to_linear
from mmfast.models.decoding import check_decoding, decode
from mmfast.models.image_autoencoder import image_codec
from mmfast.models.llama import LlamaConfig, LlamaModel
from mmfast.nn.kv_cache import KVCache
from mmfast.nn.linear_cross_entropy import LinearCrossEntropy
from mmfast.nn.patch_embed import TubeletEmbed
from mmfast.ops.log_mel import log_mel_spectrogram, mel_filters
from mmfast.ops.mixed_attention import span_ids_from_token_ids
from mmfast.ops.patch_embed import patch_embed
from mmfast.ops.patch_embed.reference import unfolded_patches

SPECIAL_TOKENS = ("<image>", "</image>", "<audio>", "</audio>", "<video>", "</video>", "<image_patch>",
                  "<audio_patch>", "<video_patch>", "<to_image>", "<to_audio>")
MODALITIES = ("image", "audio", "video")
GENERATED = ("image", "audio")  # the modalities with a diffusion head
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
INPUT_KEYS = {"image": ("images", "image_times"), "audio": ("audio", "audio_times")}  # forward's keywords
AUDIO_DECADES = 8.0  # the spectrogram's floor below each clip's peak (log10 power), as whisper's


@dataclass(kw_only=True)
class UnifiedConfig:
    """text: the decoder (its vocab_size = text_vocab_size + len(SPECIAL_TOKENS)); text_vocab_size, sot and
    eot: the caption tokenizer's. Images image_size^2 in image_patch^2 patches (of pixels, or of the latents
    of image_autoencoder, a diffusers AutoencoderKL's directory: image_channels of them, image_size /
    image_downsample a side, both the autoencoder's); audio audio_seconds at
    sample_rate as n_mels x audio_frames log-mel, patches of all bands over audio_patch_frames frames;
    video video_frames of video_size^2 in tubelet_size x video_patch^2 tubelets."""

    text: LlamaConfig = field(default_factory=lambda: LlamaConfig(
        vocab_size=1000 + len(SPECIAL_TOKENS), hidden_size=192, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=4))
    text_vocab_size: int = 1000
    sot_token_id: int = 1
    eot_token_id: int = 2
    image_size: int = 32
    image_patch: int = 4
    image_autoencoder: str = ""  # "": pixels
    image_channels: int = 3
    image_downsample: int = 1
    sample_rate: int = 16000
    audio_seconds: float = 1.0
    n_fft: int = 400
    hop_length: int = 160
    n_mels: int = 40
    audio_frames: int = 100
    audio_patch_frames: int = 4
    video_frames: int = 8
    video_size: int = 32
    video_patch: int = 8
    tubelet_size: int = 2
    video_stride: int | None = None  # None: video_patch; smaller: overlapping tubelets (input only)
    # one frame of the clip also enters as an image (image_in's patches and positions, before the
    # tubelets): the shapes the image directions teach are then seen in video too, and the tubelets need
    # carry only the motion (SlowFast's two pathways: detail from one frame, motion from coarse tubelets)
    video_keyframe: bool = False
    # which frame (None: the middle one). The first tells the motion's sign too: the shape's trail in the
    # tubelets then lies on one side of it, where around the middle frame it lies on both (with the middle
    # frame the models named the axis but confused left with right and up with down)
    keyframe_index: int | None = None
    head_width: int = 256  # the diffusion heads' hidden width
    # audio generated left to right (diffusion forcing's per-token times): 0: every patch of a clip shares
    # one diffusion time (Transfusion's); k > 0: each patch has its own, 0 (clean) up to a front and rising
    # to 1 (noise) over the k patches after it; sampling sweeps the front across the clip, so each part is
    # drawn seeing the finished parts before it (one shared time gave beeps broken into pieces)
    audio_ramp: int = 0
    time_frequencies: int = 64

    def __post_init__(self):
        if self.text.vocab_size != self.text_vocab_size + len(SPECIAL_TOKENS):
            raise ValueError(f"UnifiedConfig: text.vocab_size must be text_vocab_size + {len(SPECIAL_TOKENS)} "
                             f"special tokens = {self.text_vocab_size + len(SPECIAL_TOKENS)}, got {self.text.vocab_size}")
        if not self.image_autoencoder and (self.image_channels, self.image_downsample) != (3, 1):
            raise ValueError(f"UnifiedConfig: image_channels and image_downsample are an image_autoencoder's (pixels: "
                             f"3 and 1), got {self.image_channels} and {self.image_downsample} without one")
        for name, whole, part in (("image_size", self.image_size, self.image_patch * self.image_downsample),
                                  ("audio_frames", self.audio_frames, self.audio_patch_frames),
                                  ("video_size", self.video_size, self.video_patch),
                                  ("video_frames", self.video_frames, self.tubelet_size)):
            if part <= 0 or whole % part:
                raise ValueError(f"UnifiedConfig: {name} ({whole}) must be a positive multiple of its patch ({part})")
        if self.video_stride is not None and not 0 < self.video_stride <= self.video_patch:
            raise ValueError(f"UnifiedConfig: video_stride must be in [1, video_patch = {self.video_patch}], got "
                             f"{self.video_stride}")
        if self.keyframe_index is not None and not -self.video_frames <= self.keyframe_index < self.video_frames:
            raise ValueError(f"UnifiedConfig: keyframe_index must index the {self.video_frames} frames (or be None: "
                             f"the middle one), got {self.keyframe_index}")
        if self.video_keyframe and self.video_size != self.image_size:
            raise ValueError(f"UnifiedConfig: video_keyframe enters a frame as an image: video_size must be "
                             f"image_size ({self.image_size}), got {self.video_size}")
        if self.audio_ramp < 0:
            raise ValueError(f"UnifiedConfig: audio_ramp must be >= 0 patches, got {self.audio_ramp}")
        if self.audio_frames > 1 + int(self.audio_seconds * self.sample_rate) // self.hop_length:
            raise ValueError(f"UnifiedConfig: audio_frames ({self.audio_frames}) exceeds the frames of "
                             f"{self.audio_seconds} s at hop {self.hop_length}")

    def token_id(self, name: str) -> int:
        return self.text_vocab_size + SPECIAL_TOKENS.index(name)

    def span_tokens(self, modality: str) -> int:
        """Patches of one item of `modality`."""
        if modality == "image":
            return (self.image_size // self.image_downsample // self.image_patch) ** 2
        if modality == "audio":
            return self.audio_frames // self.audio_patch_frames
        return self.tubelets() + (self.span_tokens("image") if self.video_keyframe else 0)

    def tubelets(self) -> int:
        """Tubelets of one video clip."""
        places = (self.video_size - self.video_patch) // (self.video_stride or self.video_patch) + 1
        return (self.video_frames // self.tubelet_size) * places ** 2

    def patch_shape(self, modality: str) -> tuple[int, tuple[int, int], tuple[int, int]]:
        """(channels, patch (h, w), grid (h, w)) of a generated modality's [N, C, H, W] values."""
        if modality == "image":
            side = self.image_size // self.image_downsample // self.image_patch
            return self.image_channels, (self.image_patch, self.image_patch), (side, side)
        return 1, (self.n_mels, self.audio_patch_frames), (1, self.audio_frames // self.audio_patch_frames)

    def values_shape(self, modality: str) -> tuple[int, int, int]:
        """[C, H, W] of one generated item's values (pixels, latents or a spectrogram)."""
        channels, patch, grid = self.patch_shape(modality)
        return channels, patch[0] * grid[0], patch[1] * grid[1]


def span_sequence(config: UnifiedConfig, modality: str) -> list[int]:
    """The token ids of one item's span: `<modality> P ... P </modality>`."""
    return ([config.token_id(f"<{modality}>")] + [config.token_id(f"<{modality}_patch>")] * config.span_tokens(modality)
            + [config.token_id(f"</{modality}>")])


def fold_patches(patches: torch.Tensor, channels: int, patch: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """`[N, gh * gw, C * ph * pw]` rows (unfolded_patches' order) back to `[N, C, gh * ph, gw * pw]`."""
    (ph, pw), (gh, gw) = patch, grid
    x = patches.reshape(patches.shape[0], gh, gw, channels, ph, pw)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(patches.shape[0], channels, gh * ph, gw * pw)


def patch_rows(values: torch.Tensor, patch: tuple[int, int]) -> torch.Tensor:
    """`[N, C, H, W]` -> `[N, patches, C * ph * pw]` in the patch embedding's order."""
    kernel = (1, *patch)
    return unfolded_patches(values.unsqueeze(2), kernel, kernel)


def timestep_features(times: torch.Tensor, frequencies: int) -> torch.Tensor:
    """Sinusoidal features [N, 2 * frequencies] of diffusion times in [0, 1] (scaled by 1000, as DDPM's)."""
    scales = torch.exp(-math.log(10000.0) * torch.arange(frequencies, device=times.device) / frequencies)
    angles = times.float()[:, None] * 1000.0 * scales[None]
    return torch.cat([angles.cos(), angles.sin()], dim=1)


def ramp_times(fronts: torch.Tensor, patches: int, width: int) -> torch.Tensor:
    """`[N, patches]` diffusion times of a left-to-right sweep (UnifiedConfig.audio_ramp): 0 up to each
    row's front, rising to 1 over the `width` patches after it."""
    places = torch.arange(patches, device=fronts.device, dtype=torch.float32)
    return ((places[None] - fronts.float()[:, None]) / width).clamp(0.0, 1.0)


def value_times(config: UnifiedConfig, times: torch.Tensor) -> torch.Tensor:
    """Diffusion times, `[N]` (one per item) or `[N, patches]` (audio, one per patch), shaped to multiply the
    values `[N, C, H, W]` they belong to."""
    if times.dim() == 1:
        return times[:, None, None, None]
    return times.repeat_interleave(config.audio_patch_frames, dim=1)[:, None, None, :]


def audio_values(config: UnifiedConfig, waveforms: torch.Tensor) -> torch.Tensor:
    """float `[N, samples]` -> `[N, 1, n_mels, audio_frames]` in [-1, 1]: the fused log-mel (log10 power),
    floored AUDIO_DECADES below each clip's peak, the peak at 1."""
    mel = log_mel_spectrogram(waveforms.float(), sample_rate=config.sample_rate, n_fft=config.n_fft,
                              hop_length=config.hop_length, n_mels=config.n_mels, backend=config.text.backend)
    mel = mel[..., :config.audio_frames]
    peak = mel.amax(dim=(1, 2), keepdim=True)
    return ((torch.maximum(mel, peak - AUDIO_DECADES) - peak) / (AUDIO_DECADES / 2) + 1.0).unsqueeze(1)


class UnifiedModel(nn.Module):
    """`forward(input_ids, cu_seqlens, images=..., image_times=..., audio=..., audio_times=..., video=...,
    labels=...)` on packed token ids: a dict with "text" (logits, or with labels the per-token losses) and,
    for each generated modality, its predicted velocity per patch `[N, patches, patch values]` (N = 0 when
    the batch has none)."""

    def __init__(self, config: UnifiedConfig):
        super().__init__()
        self.config = config
        width = config.text.hidden_size
        self.language_model = LlamaModel(config.text)
        self.lm_head = LinearCrossEntropy(width, config.text.vocab_size, bias=False, reduction="none",
                                          backend=config.text.backend)
        self.image_in = nn.Conv2d(config.image_channels, width, config.image_patch, config.image_patch)
        self.audio_in = nn.Conv2d(1, width, (config.n_mels, config.audio_patch_frames),
                                  (config.n_mels, config.audio_patch_frames))
        self.video_in = TubeletEmbed(config.video_size, config.video_patch, 3, width, config.video_frames,
                                     config.tubelet_size, stride=config.video_stride, mean=CLIP_MEAN, std=CLIP_STD,
                                     backend=config.text.backend)
        rows = {modality: config.tubelets() if modality == "video" else config.span_tokens(modality)
                for modality in MODALITIES}  # a keyframe takes the image's positions
        self.positions = nn.ParameterDict({modality: nn.Parameter(torch.zeros(rows[modality], width))
                                           for modality in MODALITIES})
        self.time_embedding = nn.Sequential(nn.Linear(2 * config.time_frequencies, width), nn.SiLU(),
                                            nn.Linear(width, width))
        self.heads = nn.ModuleDict({modality: nn.Sequential(
            nn.Linear(width, config.head_width), nn.SiLU(),
            nn.Linear(config.head_width, math.prod(self._patch_values(modality))))
            for modality in GENERATED})
        # a 3 x 3 convolution over each generated picture / spectrogram, so a patch's prediction sees its
        # neighbours' (per-patch heads alone gave beeps broken at patch edges; with it they still break, see
        # the README); zero at start: the heads alone
        self.refine = nn.ModuleDict({modality: nn.Conv2d(self._patch_values(modality)[0], self._patch_values(modality)[0],
                                                         3, padding=1) for modality in GENERATED})
        self.apply(self._init_weights)
        for refine in self.refine.values():
            nn.init.zeros_(refine.weight)
        for table in self.positions.values():
            nn.init.normal_(table, std=config.text.initializer_range)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding, nn.Conv2d, nn.Conv3d)):
            nn.init.normal_(module.weight, std=self.config.text.initializer_range)
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.Conv3d)) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def _patch_values(self, modality: str) -> tuple[int, ...]:
        channels, patch, _ = self.config.patch_shape(modality)
        return channels, *patch

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.language_model.grad_checkpointing = enable

    def blocks(self) -> list[nn.Module]:
        """The units an engine shards, compiles or checkpoints."""
        return list(self.language_model.layers)

    def external_parameters(self) -> list[nn.Parameter]:
        """The parameters the forward reads outside a call of the module holding them (the fused patch
        embedding takes image_in's and audio_in's weights and the position tables as tensors): an engine
        that gathers parameters per module call (ZeRO-3) gathers these with the whole model's call."""
        return [*self.image_in.parameters(), *self.audio_in.parameters(), *self.positions.parameters()]

    # inputs: what each modality's span is made of

    def span_embeddings(self, modality: str, values: torch.Tensor, times: torch.Tensor | None = None) -> torch.Tensor:
        """`[N, span_tokens, hidden]`: the patches of `values` (image_values / audio_values, maybe noised;
        uint8 frames `[N, T, H, W, 3]` for video) projected with their positions and diffusion time
        (0: a clean input) in one fused pass."""
        if modality == "video":
            tokens = self.video_in(values, self.positions["video"], channels_last=True)
            if self.config.video_keyframe:  # one frame, as an image input
                index = values.shape[1] // 2 if self.config.keyframe_index is None else self.config.keyframe_index
                frame = self._image_inputs(values[:, index].permute(0, 3, 1, 2))
                tokens = torch.cat([self._patches("image", frame), tokens], dim=1)
        else:
            tokens = self._patches(modality, values)
        if times is None:
            times = torch.zeros(values.shape[0], device=values.device)
        features = timestep_features(times.reshape(-1), self.config.time_frequencies)  # float32
        embedded = self.time_embedding(features.to(self.time_embedding[0].weight.dtype)).to(tokens.dtype)  # bf16 weights too
        return tokens + (embedded[:, None] if times.dim() == 1 else embedded.view(*times.shape, -1))

    def _image_inputs(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 `[N, 3, H, W]` as an image input is given: pixel values, or the autoencoder's latents."""
        return image_codec(self.config, images.device).encode(images)

    def _patches(self, modality: str, values: torch.Tensor) -> torch.Tensor:
        """An image's or a spectrogram's patches, projected, with their positions (the fused patch embedding)."""
        projection = self.image_in if modality == "image" else self.audio_in
        return patch_embed(values, projection.weight, projection.bias, pos_embed=self.positions[modality],
                           backend=self.config.text.backend)

    def _placeholders(self) -> dict[str, int]:
        return {modality: self.config.token_id(f"<{modality}_patch>") for modality in MODALITIES}

    def embeddings(self, input_ids: torch.Tensor, spans: dict[str, torch.Tensor]) -> torch.Tensor:
        """Token embeddings with each modality's span embeddings (`spans[modality]`, `[N, span_tokens,
        hidden]`, the items in order) in its placeholders' places."""
        embeds = self.language_model.embed_tokens(input_ids)
        for modality, token in self._placeholders().items():
            places = input_ids == token
            given = spans.get(modality)
            found, expected = int(places.sum()), 0 if given is None else given.shape[0] * given.shape[1]
            if found != expected:
                raise ValueError(f"UnifiedModel: input_ids hold {found} {modality} patch tokens, expected "
                                 f"{self.config.span_tokens(modality)} for each of the "
                                 f"{0 if given is None else given.shape[0]} {modality} items, {expected} in all")
            if found:
                embeds = embeds.masked_scatter(places[:, None], given.reshape(-1, embeds.shape[-1]).to(embeds.dtype))
        return embeds

    def forward(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int | None = None, *,
                images: torch.Tensor | None = None, image_times: torch.Tensor | None = None,
                audio: torch.Tensor | None = None, audio_times: torch.Tensor | None = None,
                video: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                ignore_index: int = -100) -> dict[str, torch.Tensor]:
        """Packed `[total]` input_ids with cu_seqlens; images / audio: image_values / audio_values (noised
        to their times, 0 for inputs), video: uint8 frames; labels: already shifted (labels[t] is the
        target of position t)."""
        inputs = {"image": (images, image_times), "audio": (audio, audio_times), "video": (video, None)}
        # Every forward runs every embedding and head in one order, a blank item standing in for a missing
        # input (its result times 0): DDP and ZeRO wait for every gradient, and ZeRO-3 gathers each
        # parameter when first touched, which must happen in the same order on every rank.
        spans, blank = {}, 0.0
        for modality, (values, times) in inputs.items():
            if values is None:
                blank = blank + self.span_embeddings(modality, self._blank(modality)).sum() * 0.0
            else:
                spans[modality] = self.span_embeddings(modality, values, times)
        embeds = self.embeddings(input_ids, spans)
        placeholders = self._placeholders()
        hidden = self.language_model(inputs_embeds=embeds, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                                     span_ids=span_ids_from_token_ids(input_ids, list(placeholders.values())))
        # every generated modality's velocity, with no rows where the batch has none: the same outputs on every
        # rank (ZeRO-3 counts the gradients arriving at them), and the heads join the graph either way
        out = {modality: self._velocity(modality, hidden[input_ids == placeholders[modality]]) for modality in GENERATED}
        text = self.lm_head(hidden) if labels is None else self.lm_head(hidden, labels, ignore_index=ignore_index)
        out["text"] = text + blank
        return out

    def _blank(self, modality: str) -> torch.Tensor:
        """One all-zero input item of `modality`."""
        config, device = self.config, self.positions[modality].device
        if modality == "video":
            return torch.zeros(1, config.video_frames, config.video_size, config.video_size, 3, dtype=torch.uint8,
                               device=device)
        channels, patch, grid = config.patch_shape(modality)
        return torch.zeros(1, channels, patch[0] * grid[0], patch[1] * grid[1], device=device)

    def _velocity(self, modality: str, hidden: torch.Tensor) -> torch.Tensor:
        """The predicted velocity rows `[N, span_tokens, patch values]` of the span tokens' hidden states
        (`[N * span_tokens, hidden]`): the per-patch head, then the convolution over the whole picture."""
        channels, patch, grid = self.config.patch_shape(modality)
        rows = self.heads[modality](hidden).float().reshape(-1, self.config.span_tokens(modality),
                                                            channels * patch[0] * patch[1])
        folded = fold_patches(rows, channels, patch, grid)
        refine = self.refine[modality]
        return patch_rows(folded + refine(folded.to(refine.weight.dtype)).float(), patch)

    # generation

    def _packed(self, sequences: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        lengths = torch.tensor([0] + [len(sequence) for sequence in sequences])
        return torch.cat(sequences), lengths.cumsum(0).to(torch.int32).to(sequences[0].device)

    def span(self, modality: str) -> list[int]:
        return span_sequence(self.config, modality)

    @torch.no_grad()
    def generate_text(self, modality: str, values: torch.Tensor, prompts: list[torch.Tensor] | None = None, *,
                      max_new_tokens: int = 24, temperature: float = 0.0, top_p: float = 1.0,
                      generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """The caption tokens (ending with <eot> where the model ends) of each item of `values` (one
        modality's inputs as forward takes them); prompts: token ids that start each caption (after <sot>)."""
        check_decoding("UnifiedModel.generate_text", max_new_tokens, temperature, top_p)
        if modality not in MODALITIES:
            raise ValueError(f"UnifiedModel.generate_text: modality must be one of {MODALITIES}, got {modality!r}")
        device = self.positions[modality].device
        count = values.shape[0]
        prompts = prompts if prompts is not None else [torch.zeros(0, dtype=torch.long)] * count
        if len(prompts) != count:
            raise ValueError(f"UnifiedModel.generate_text: {len(prompts)} prompts for {count} items")
        head = torch.tensor(self.span(modality) + [self.config.sot_token_id], device=device)
        prompts = [torch.cat([head, prompt.to(device)]) for prompt in prompts]
        spans = self.span_embeddings(modality, values.to(device))
        cache = KVCache(count, max(len(prompt) for prompt in prompts) + max_new_tokens)

        def run(rows: list[int], sequences: list[torch.Tensor], whole: bool) -> torch.Tensor:
            ids, cu_seqlens = self._packed(sequences)
            embeds = self.embeddings(ids, {modality: spans[rows]} if whole else {})
            hidden = self.language_model(inputs_embeds=embeds, cu_seqlens=cu_seqlens, cache=cache,
                                         cache_rows=torch.tensor(rows, device=device),
                                         span_ids=span_ids_from_token_ids(ids, self._placeholders()[modality]))
            # captions are text: the special tokens (span markers, placeholders) are never generated
            return self.lm_head(hidden[cu_seqlens[1:].long() - 1]).float()[:, :self.config.text_vocab_size]

        return decode(run, prompts, max_new_tokens=max_new_tokens, eos_token_id=self.config.eot_token_id,
                      temperature=temperature, top_p=top_p, generator=generator, cached=True)

    @torch.no_grad()
    def generate_values(self, modality: str, captions: list[torch.Tensor], *, steps: int = 25, guidance: float = 3.0,
                        generator: torch.Generator | None = None) -> torch.Tensor:
        """Images (or their latents) or spectrograms `[N, C, H, W]` (image_values / audio_values' space) for caption token
        ids (`<sot> ... <eot>`): Euler steps of the learned velocity from noise (t = 1) to t = 0, with
        classifier-free guidance (guidance 1: the conditional velocity alone). With audio_ramp, each patch
        of a spectrogram takes `steps` steps as the front sweeps the clip (more forward passes in all)."""
        if modality not in GENERATED:
            raise ValueError(f"UnifiedModel.generate_values: modality must be one of {GENERATED}, got {modality!r}")
        if steps < 1 or not 1.0 <= guidance <= 20.0:
            raise ValueError(f"UnifiedModel.generate_values: expected steps >= 1 and 1 <= guidance <= 20, got "
                             f"{steps} and {guidance}")
        device = self.positions[modality].device
        start = [self.config.token_id(f"<to_{modality}>")]
        sequences = [torch.tensor(start + caption.tolist() + self.span(modality), device=device) for caption in captions]
        if guidance != 1.0:
            sequences += [torch.tensor(start + self.span(modality), device=device)] * len(captions)
        ids, cu_seqlens = self._packed(sequences)
        channels, patch, grid = self.config.patch_shape(modality)
        x = torch.randn((len(captions), *self.config.values_shape(modality)), generator=generator).to(device)
        ramp, count = (self.config.audio_ramp if modality == "audio" else 0), len(captions)
        if ramp:
            patches = self.config.span_tokens("audio")
            fronts = torch.linspace(-ramp, patches - 1, math.ceil((patches - 1 + ramp) * steps / ramp) + 1)
            schedule = [ramp_times(front.expand(count), patches, ramp) for front in fronts]
        else:
            schedule = [torch.full((count,), float(time)) for time in torch.linspace(1.0, 0.0, steps + 1)]
        values_key, times_key = INPUT_KEYS[modality]
        for now, then in zip(schedule[:-1], schedule[1:]):
            values, times = (x, now) if guidance == 1.0 else (torch.cat([x, x]), torch.cat([now, now]))
            out = self(ids, cu_seqlens, **{values_key: values, times_key: times.to(device)})
            velocity = fold_patches(out[modality], channels, patch, grid)
            if guidance != 1.0:
                conditional, unconditional = velocity.chunk(2)
                velocity = unconditional + guidance * (conditional - unconditional)
            x = x + value_times(self.config, (then - now).to(device)) * velocity
        latents = modality == "image" and self.config.image_autoencoder
        return x if latents else x.clamp(-1.0, 1.0)  # pixels and spectrograms live in [-1, 1], latents do not


def waveforms_of(config: UnifiedConfig, values: torch.Tensor, iterations: int = 32,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """The vocoder: spectrograms `[N, 1, n_mels, frames]` (audio_values' space) -> waveforms `[N, samples]`
    peaking at 0.9: mel power back to linear (least squares), then Griffin-Lim. The level is relative
    (audio_values keeps none)."""
    power = 10.0 ** ((values.squeeze(1).double() - 1.0) * (AUDIO_DECADES / 2))
    filters = mel_filters(config.sample_rate, config.n_fft, config.n_mels).to(values.device)
    magnitude = mel_to_linear(power, filters).sqrt().float()
    waveform = griffin_lim(magnitude, n_fft=config.n_fft, hop_length=config.hop_length, iterations=iterations,
                           generator=generator)  # (frames - 1) x hop samples: silence pads it to the clip's length
    waveform = torch.nn.functional.pad(waveform, (0, int(config.audio_seconds * config.sample_rate) - waveform.shape[1]))
    return 0.9 * waveform / waveform.abs().amax(dim=1, keepdim=True).clamp(min=1e-8)
