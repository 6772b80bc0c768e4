"""Run configuration: nested keyword-only dataclasses; recipes are YAML files in mmfast/configs/;
dotted overrides (`--optim.lr=3e-4`) on top. Unknown keys and wrong types raise errors that name
the key. The `model:` section is the task's own model config (Task.model_section), so every field
of the model is a key."""
from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field

import yaml

from mmfast.train.profiling import step_range
from mmfast.train.tasks import TASKS

RECIPES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


@dataclass(kw_only=True)
class DataConfig:
    source: str = "synth"  # the bundled data, "shards" (webdataset tars) or "files" (CSV/TSV/JSONL)
    train: str = ""  # shards: a glob of .tar files (img2dataset layout); files: the CSV/TSV/JSONL path
    held_out: str = ""  # the same for the held-out split (retrieval is evaluated on it)
    image_key: str = "filepath"  # files: the image path column (open_clip's --csv-img-key default)
    caption_key: str = "title"  # files: the caption column
    streaming: bool = False  # shards: stream the training split instead of holding it in memory
    workers: int = 2  # streaming: DataLoader worker processes per rank
    shuffle_buffer: int = 1000  # streaming: samples mixed across shards
    # several training sets mixed (in memory; replaces data.train): name -> shards, a CSV/TSV/JSONL file
    # or "synth"; each source's share of every batch by weight, by size^(1/T), or by size (the default);
    # a source capped at max_epochs gives its share to the others once it has given that many
    sources: dict[str, str] = field(default_factory=dict)
    mixture: dict[str, float] = field(default_factory=dict)
    mixture_temperature: float = 0.0
    max_epochs: dict[str, float] = field(default_factory=dict)
    # where a sample has its own caption and a synthetic one (mmfast data caption), the probability that
    # a step trains on the synthetic one (drawn per sample and step; Recap-DataComp's mix)
    synthetic_captions: float = 0.0
    synth_dir: str = "data/synth"  # the bundled data; written there on first use
    train_samples: int = 20000
    held_out_samples: int = 2000
    image_size: int = 32
    digit_fraction: float = 0.1
    synth_geometry: str = "anchored"  # "anchored" or "continuous" shapes (mmfast.data.synth.shape_sample)
    seed: int = 0
    batch_size: int = 256  # the global batch (shared out over ranks)
    tokenizer: str = ""  # an HF tokenizers file on disk (with <pad>, <sot>, <eot>); empty: train a BPE
    # task llava: LLaVA's JSON / JSONL and its image folder (empty with source synth: the bundled
    # conversations, train_samples and held_out_samples of them), how conversations are rendered, and
    # whether images are used (false: the language model learns the conversations' text alone)
    conversations: str = ""
    held_out_conversations: str = ""
    image_folder: str = ""
    template: str = "vicuna_v1"
    use_images: bool = True
    # task llava, bundled conversations: train on the set whose every conversation opens with the existence
    # question (train-existence.json; see mmfast.data.synth_conversations.write_conversations)
    existence_first: bool = False


@dataclass(kw_only=True)
class OptimConfig:
    name: str = "adamw"  # or "adamw8bit" (bitsandbytes; single, ddp and deepspeed engines)
    lr: float = 2e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    warmup_steps: int = 100
    schedule: str = "cosine"  # or "linear", "constant"
    grad_clip: float = 1.0
    lr_groups: dict[str, float] = field(default_factory=dict)  # parameter-name prefix -> its peak lr


@dataclass(kw_only=True)
class TrainConfig:
    steps: int = 1500
    eval_every: int = 500
    log_every: int = 20
    checkpoint_every: int = 500
    seed: int = 0
    micro_batch: int | None = None  # gradient caching when smaller than each rank's batch (single, ddp)
    accumulation_steps: int = 1  # plain accumulation: each step's batch in this many contrastive batches
    stop_after: int | None = None  # end the run early at this step, schedule unchanged (resume later)
    init_from: str = ""  # a model.pt (or a run directory holding one) whose weights start this run
    profile_steps: str = ""  # e.g. "10-12": a torch.profiler trace of those steps in <run_dir>/profile
    frozen: list[str] = field(default_factory=list)  # parameter-name prefixes left untrained
    trainable: list[str] = field(default_factory=list)  # if any: only these prefixes are trained


@dataclass(kw_only=True)
class EngineConfig:
    """How the model is placed and sharded. "auto" is "single" in one process and "ddp" under a launcher."""

    name: str = "auto"  # single, ddp, fsdp2, deepspeed
    zero_stage: int = 2  # deepspeed: 1, 2 or 3
    offload_optimizer: bool = False  # deepspeed: optimizer state and step on the CPU; fsdp2: CPUOffloadPolicy
    offload_parameters: bool = False  # deepspeed ZeRO-3: parameters on the CPU
    precision: str = "fp32"  # bf16, or fp16 (CUDA; single, ddp and deepspeed)
    activation_checkpointing: bool = False  # recompute each transformer block in the backward pass
    compile: bool = False  # torch.compile each transformer block


@dataclass(kw_only=True)
class ResumeConfig:
    """What a resumed run may change. A run directory with a checkpoint resumes; its config.yaml is
    compared with the new configuration first."""

    allow_changes: str = ""  # comma-separated keys or sections (optim.lr,data) that may differ on resume


@dataclass(kw_only=True)
class RunConfig:
    recipe: str = ""
    task: str = "contrastive"  # what is trained: a name in mmfast.train.tasks.TASKS
    run_dir: str = ""
    resume: ResumeConfig = field(default_factory=ResumeConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: typing.Any = None  # the task's model config (its Task.model_section), made from `task`
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # stages run one after the other, each a dict of sections overriding the rest (and a name), each in
    # <run_dir>/<name>, each starting from the previous one's model.pt (see mmfast.train.stages)
    stages: list[dict] = field(default_factory=list)

    def __post_init__(self):
        if self.model is None:
            self.model = model_section(self.task)


def model_section(task: str):
    """The default `model:` section of `task`."""
    if task not in TASKS:
        raise ValueError(f"config: task must be one of {sorted(TASKS)}, got {task!r}")
    return TASKS[task].model_section()


def _known(section, values: dict) -> dict:
    """The part of nested `values` that `section` (a dataclass) has fields for."""
    names = {item.name: getattr(section, item.name) for item in dataclasses.fields(section)}
    return {name: _known(names[name], value) if dataclasses.is_dataclass(names[name]) and isinstance(value, dict)
            else value for name, value in values.items() if name in names}


def _merge(into: dict, values: dict) -> None:
    for name, value in values.items():
        if isinstance(value, dict) and isinstance(into.get(name), dict):
            _merge(into[name], value)
        else:
            into[name] = value


def _set_task(config: RunConfig, task: str) -> None:
    """A new task brings its own model section; the model values given so far are applied to it where
    it has the same fields (a recipe's CLIP text tower sizes a caption LM's), the rest are dropped."""
    if task == config.task:
        return
    config.task, config.model = task, model_section(task)
    apply_values(config.model, _known(config.model, config.__dict__.get("_model_values", {})), "model.")


def _coerce(key: str, value, kind):
    """value (from YAML or the command line) as `kind`, or a ValueError naming the key."""
    origin = typing.get_origin(kind)
    if origin in (list, dict, tuple):
        return _coerce_collection(key, value, origin, typing.get_args(kind))
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        options = [k for k in typing.get_args(kind) if k is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(key, value, options[0])
    if isinstance(value, str) and kind in (int, float):
        try:  # YAML reads "3e-4" as a string; Python's parsers do not
            value = kind(value)
        except ValueError:
            pass
    elif isinstance(value, str) and kind is not str:
        value = yaml.safe_load(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"config: {key} must be {kind.__name__}, got {value!r} ({type(value).__name__})")
    return value


def _coerce_collection(key: str, value, origin, arguments):
    """A list or tuple (YAML list, or "a,b" on the command line) or a mapping, items coerced one by one."""
    if isinstance(value, str):
        value = yaml.safe_load(value) if value.strip()[:1] in "[{" else [part for part in value.split(",") if part]
    if value is None:
        value = origin()
    if origin is tuple and isinstance(value, list):
        value = tuple(value)
    if not isinstance(value, origin):
        raise ValueError(f"config: {key} must be a {origin.__name__}, got {value!r} ({type(value).__name__})")
    if not arguments:
        return value
    if origin in (list, tuple):
        items = [_coerce(f"{key}[{index}]", item, arguments[0]) for index, item in enumerate(value)]
        return origin(items)
    return {_coerce(f"{key} (a name)", name, arguments[0]): _coerce(f"{key}.{name}", item, arguments[1])
            for name, item in value.items()}


def apply_values(config, values: dict, prefix: str = "") -> None:
    """Sets nested `values` ({section: {key: value}}) on `config`, coerced to each key's type; errors
    name the key (after `prefix`)."""
    if isinstance(config, RunConfig):
        values = dict(values)
        if "task" in values:  # first: it decides what the model section is
            _set_task(config, _coerce(f"{prefix}task", values.pop("task"), str))
        if isinstance(values.get("model"), dict):  # kept beside the fields: a later task switch re-applies them
            _merge(config.__dict__.setdefault("_model_values", {}), values["model"])
    hints = typing.get_type_hints(type(config))
    names = {f.name for f in dataclasses.fields(config)}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in names:
            raise ValueError(f"config: unknown key {key!r}; {prefix.rstrip('.') or 'the top level'} has {sorted(names)}")
        current = getattr(config, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ValueError(f"config: {key} is a section, got {value!r}")
            apply_values(current, value, f"{key}.")
        else:
            setattr(config, name, _coerce(key, value, hints[name]))


# Every value is checked for its choices and its range, with the key named (checked after overrides).
CHOICES = {
    "data.source": ("synth", "shards", "files"),
    "data.synth_geometry": ("anchored", "continuous"),
    "data.template": ("plain", "vicuna_v1", "chat"),
    "model.loss": ("clip", "siglip"),
    "model.tower": ("tubelets", "frames"),
    "model.activation": ("quick_gelu", "gelu"),
    "model.text.pooling": ("eot", "mean"),
    "optim.name": ("adamw", "adamw8bit"),
    "optim.schedule": ("cosine", "linear", "constant"),
    "engine.name": ("auto", "single", "ddp", "fsdp2", "deepspeed"),
    "engine.precision": ("fp32", "bf16", "fp16"),
    "engine.zero_stage": (1, 2, 3),
}
AT_LEAST = {  # key: smallest allowed value (None values are allowed where the type is optional)
    "data.batch_size": 1, "data.train_samples": 1, "data.held_out_samples": 1, "data.image_size": 1,
    "data.workers": 0, "data.shuffle_buffer": 1, "data.digit_fraction": 0.0, "data.synthetic_captions": 0.0,
    "model.embed_dim": 1, **{f"model.{tower}.{name}": 1 for tower in ("vision", "text")
                             for name in ("width", "layers", "heads")},
    "model.vision.patch_size": 1, "model.text.vocab_size": 1, "model.text.context_length": 1,
    "optim.weight_decay": 0.0, "optim.beta1": 0.0, "optim.beta2": 0.0,
    "optim.warmup_steps": 0, "optim.grad_clip": 0.0,
    "train.steps": 1, "train.eval_every": 1, "train.log_every": 1, "train.checkpoint_every": 1,
    "train.accumulation_steps": 1, "train.micro_batch": 1, "train.stop_after": 1,
}
ABOVE = {"optim.lr": 0.0, "optim.eps": 0.0}  # strictly greater
AT_MOST = {"data.digit_fraction": 1.0, "data.synthetic_captions": 1.0}
BELOW = {"optim.beta1": 1.0, "optim.beta2": 1.0}  # strictly smaller


def value_at(config, key: str, default=None):
    """The value at dotted `key`, or `default` where the config has no such key (another task's model)."""
    for part in key.split("."):
        if not hasattr(config, part):
            return default
        config = getattr(config, part)
    return config


def check_config(config: RunConfig) -> None:
    """Raises a ValueError naming the key, its allowed values or range, and what it got."""
    step_range(config.train.profile_steps)
    for key, choices in CHOICES.items():
        if value_at(config, key, choices[0]) not in choices:
            raise ValueError(f"config: {key} must be one of {list(choices)}, got {value_at(config, key)!r}")
    bounds = [(AT_LEAST, ">=", lambda v, b: v >= b), (ABOVE, ">", lambda v, b: v > b),
              (AT_MOST, "<=", lambda v, b: v <= b), (BELOW, "<", lambda v, b: v < b)]
    for table, sign, holds in bounds:
        for key, bound in table.items():
            value = value_at(config, key)
            if value is not None and not holds(value, bound):
                raise ValueError(f"config: {key} must be {sign} {bound}, got {value!r}")
    _check_sources(config.data, config.task)


MIXING_TASKS = ("contrastive", "caption_lm")  # the tasks that read image-caption training sets


def _check_sources(data: DataConfig, task: str) -> None:
    """data.sources excludes data.train and streaming; the mixture keys need sources and valid weights."""
    from mmfast.data.mixture import mixture_probabilities

    if not data.sources:
        given = [key for key in ("mixture", "mixture_temperature", "max_epochs") if getattr(data, key)]
        if given:
            raise ValueError(f"config: data.{given[0]} needs data.sources (several training sets), got none")
        return
    if task not in MIXING_TASKS:
        raise ValueError(f"config: data.sources mixes image-caption sets for tasks {list(MIXING_TASKS)}, "
                         f"got task {task!r}")
    if data.train:
        raise ValueError(f"config: data.sources replaces data.train; give one of them, got both "
                         f"(data.train {data.train!r})")
    if data.streaming:
        raise ValueError("config: data.sources are mixed in memory; data.streaming must be false, got true")
    mixture_probabilities(dict.fromkeys(data.sources, 1), data.mixture, data.mixture_temperature)


def recipes() -> list[str]:
    return sorted(name[:-5] for name in os.listdir(RECIPES) if name.endswith(".yaml"))


def load_config(recipe: str | None = None, overrides=(), path: str | None = None) -> RunConfig:
    """A recipe (name in mmfast/configs/ or a YAML path), then `section.key=value` overrides."""
    config = RunConfig()
    if recipe and not recipe.endswith(".yaml") and (os.sep in recipe or "/" in recipe or recipe.startswith(".")):
        raise ValueError(f"config: a recipe is a name in mmfast/configs/ ({recipes()}) or a path ending in .yaml, "
                         f"got {recipe!r}")
    source = path or (os.path.join(RECIPES, f"{recipe}.yaml") if recipe and not recipe.endswith(".yaml") else recipe)
    if source:
        if not os.path.exists(source):
            raise ValueError(f"config: no recipe {recipe or path!r}; recipes: {recipes()}")
        with open(source) as handle:
            apply_values(config, yaml.safe_load(handle) or {})
        config.recipe = config.recipe or (recipe or os.path.basename(source))
    for override in overrides:
        key, separator, value = override.removeprefix("--").partition("=")
        if not separator:
            raise ValueError(f"config: overrides look like --section.key=value, got {override!r}")
        nested: dict = {}
        cursor = nested
        parts = key.split(".")
        for part in parts[:-1]:
            cursor = cursor.setdefault(part, {})
        cursor[parts[-1]] = value
        apply_values(config, nested)
    check_config(config)
    return config


def save_config(config: RunConfig, path: str) -> None:
    with open(path, "w") as handle:
        # through JSON: tuples (a vision config's mean and std) become YAML lists
        yaml.safe_dump(json.loads(json.dumps(dataclasses.asdict(config))), handle, sort_keys=False)
