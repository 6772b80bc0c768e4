"""The engines across two CPU processes over gloo (started here with torch.multiprocessing): DDP,
FSDP2 and DeepSpeed ZeRO 1/2/3 follow the single-process loss curve of the same global batch;
resume from sharded checkpoints is exact; sharded checkpoints consolidate to the trained weights.

DeepSpeed JIT-compiles two C++ ops on a fresh cache (its shared-memory all-reduce, about 60 s, and
the CPU Adam used with offload, about 75 s). TORCH_EXTENSIONS_DIR points at one cache per user,
so CI pays for them once per machine, not per run."""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from mmfast.train import load_config
from mmfast.train.checkpoint import consolidate
from tests.processes import EXTENSIONS, free_port, launch_training
from tests.runs import losses, run_config

pytest.importorskip("webdataset")
TINY = ["--data.train_samples=96", "--data.held_out_samples=40", "--data.batch_size=16",
        "--model.text.vocab_size=200", "--model.text.context_length=24", "--model.vision.width=64",
        "--model.vision.layers=2", "--model.vision.heads=2", "--model.text.width=64", "--model.text.layers=2",
        "--model.text.heads=2", "--model.embed_dim=32", "--train.steps=4", "--train.eval_every=100",
        "--train.checkpoint_every=2", "--train.log_every=1", "--optim.warmup_steps=2", "--optim.lr=1e-3"]


# bf16 autocast against fp32, four steps of the tiny model: up to 0.038 apart with GELU (the recipe's since
# 2026-11-28), 0.03 with QuickGELU
BF16 = 5e-2


def _config(root, name, *extra):
    return run_config(root, name, TINY, *extra)


def _losses(run_dir):
    return list(losses(run_dir).values())


def _launch(root, runs, world=2):
    """Runs train() for each (run name, overrides) in `world` processes, one process group for all."""
    launch_training(_config, root, runs, world)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """Single-process reference runs (the same global batch) beside the runs under test, on the CPU
    as those are."""
    root = tmp_path_factory.mktemp("engines")
    _launch(root, [("single", ["--engine.name=single"]), ("single-accumulated", ["--train.accumulation_steps=2"]),
                   ("single-siglip", ["--model.loss=siglip"])], world=1)
    return root


def _assert_follows(root, name, tolerance=2e-4, reference="single"):
    reference, losses = _losses(root / reference), _losses(root / name)
    assert len(losses) == len(reference) == 4
    assert losses == pytest.approx(reference, abs=tolerance), f"{name}: {losses} vs single {reference}"


def _assert_same_weights(root, name, tolerance=1e-4, reference="single"):
    reference = torch.load(root / reference / "model.pt", weights_only=False)["state_dict"]
    exported = torch.load(root / name / "model.pt", weights_only=False)["state_dict"]
    assert exported.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(exported[key], reference[key], atol=tolerance, rtol=0, msg=key)


@pytest.mark.distributed
def test_ddp_and_fsdp2_follow_the_single_process_run(root):
    _launch(root, [("ddp", ["--engine.name=ddp"]),
                   ("fsdp2", ["--engine.name=fsdp2"]),
                   ("fsdp2-resumed", ["--engine.name=fsdp2", "--train.stop_after=2"]),
                   ("fsdp2-resumed", ["--engine.name=fsdp2"]),
                   ("ddp-accumulated", ["--engine.name=ddp", "--train.accumulation_steps=2"]),
                   ("fsdp2-bf16", ["--engine.name=fsdp2", "--engine.precision=bf16",
                                   "--engine.activation_checkpointing=true"]),
                   ("fsdp2-offload", ["--engine.name=fsdp2", "--engine.offload_optimizer=true"]),
                   ("ddp-cached", ["--engine.name=ddp", "--train.micro_batch=3"]),
                   ("fsdp2-siglip", ["--engine.name=fsdp2", "--model.loss=siglip"]),
                   ("ddp-streamed", ["--engine.name=ddp", "--data.source=shards", "--data.streaming=true",
                                     f"--data.train={root}/synth/train-*.tar", "--data.workers=1",
                                     f"--data.held_out={root}/synth/held_out-*.tar", "--data.shuffle_buffer=16"])])
    for name in ("ddp", "fsdp2", "fsdp2-offload", "ddp-cached"):  # gradient caching: the same gradients
        _assert_follows(root, name)
        _assert_same_weights(root, name)
    assert _losses(root / "fsdp2-resumed") == _losses(root / "fsdp2")  # resumed from sharded checkpoints
    assert os.path.isdir(root / "fsdp2" / "checkpoints" / "step-0000002" / "sharded")
    _assert_follows(root, "ddp-accumulated", reference="single-accumulated")
    _assert_follows(root, "fsdp2-siglip", reference="single-siglip")  # SigLIP's pairwise loss across ranks
    streamed = _losses(root / "ddp-streamed")  # another data order: it runs and gives finite losses
    assert len(streamed) == 4 and all(0 < loss < 10 for loss in streamed)
    assert _losses(root / "fsdp2-bf16") == pytest.approx(_losses(root / "single"), abs=BF16)


@pytest.mark.distributed
@pytest.mark.skipif(not __import__("importlib").util.find_spec("deepspeed"), reason="needs deepspeed")
def test_deepspeed_zero_stages_follow_the_single_process_run(root):
    _launch(root, [("zero2", ["--engine.name=deepspeed", "--engine.zero_stage=2"]),
                   ("zero3", ["--engine.name=deepspeed", "--engine.zero_stage=3"]),
                   ("zero3-resumed", ["--engine.name=deepspeed", "--engine.zero_stage=3", "--train.stop_after=2"]),
                   ("zero3-resumed", ["--engine.name=deepspeed", "--engine.zero_stage=3"]),
                   ("zero1-offload-bf16", ["--engine.name=deepspeed", "--engine.zero_stage=1",
                                           "--engine.offload_optimizer=true", "--engine.precision=bf16"]),
                   ("zero3-offload", ["--engine.name=deepspeed", "--engine.zero_stage=3",
                                      "--engine.offload_optimizer=true", "--engine.offload_parameters=true"]),
                   ("zero2-adamw8bit", ["--engine.name=deepspeed", "--engine.zero_stage=2",
                                        "--optim.name=adamw8bit"])])
    rows = [json.loads(line) for line in open(root / "zero3" / "metrics.jsonl")]
    scales = [row["logit_scale"] for row in rows if "loss" in row]  # gathered from ZeRO-3's partitions
    start = math.exp(load_config("clip-tiny", []).model.init_logit_scale)  # the recipe's; nowhere near 1 (a shard)
    assert len(scales) == 4 and all(abs(scale - start) < 1.5 for scale in scales), (start, scales)
    for name in ("zero2", "zero3"):
        _assert_follows(root, name)
        _assert_same_weights(root, name)  # model.pt: consolidated from the ZeRO shards
    assert _losses(root / "zero3-resumed") == _losses(root / "zero3")
    folder = root / "zero3" / "checkpoints" / "step-0000004"
    assert any("optim_states" in name for name in os.listdir(folder))  # sharded optimizer state
    full = consolidate(str(folder))
    assert full.keys() == torch.load(root / "single" / "model.pt", weights_only=False)["state_dict"].keys()
    assert _losses(root / "zero1-offload-bf16") == pytest.approx(_losses(root / "single"), abs=BF16)
    _assert_follows(root, "zero3-offload", tolerance=1e-3)  # DeepSpeed's CPU Adam: its own rounding
    assert _losses(root / "zero2-adamw8bit") == pytest.approx(_losses(root / "single"), abs=5e-2)


# The README's launch lines, as written there but with 2 CPU processes (or 2 one-process "nodes") and
# the tiny model. DeepSpeed's launcher runs `python -m mmfast --local_rank=N train ...`.
NEEDS_DEEPSPEED = pytest.mark.skipif(not __import__("importlib").util.find_spec("deepspeed"), reason="needs deepspeed")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def _deepspeed_launcher():
    beside_python = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    return [shutil.which("deepspeed") or beside_python]


def _cli_run(root, name, launcher, *engine, environment=None, processes=None):
    """Starts `launcher ... mmfast train` (several commands at once for several nodes) and returns the
    run directory once every one exited 0."""
    run = root / name
    arguments = ["train", "--recipe", "clip-tiny", *engine, "--run-dir", str(run), *TINY,
                 f"--data.synth_dir={root / 'synth'}"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TORCH_EXTENSIONS_DIR": EXTENSIONS, "DS_ACCELERATOR": "cpu",
           **(environment or {})}
    commands = [prefix + arguments for prefix in (processes or [launcher])]
    started = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                cwd=root) for command in commands]
    outputs = [process.communicate(timeout=600)[0] for process in started]
    for process, output in zip(started, outputs):
        assert process.returncode == 0, output[-4000:]
    assert f"run directory: {run}" in outputs[0]
    return run


@pytest.mark.distributed
def test_torchrun_launches_the_cli(root):
    """README: `torchrun --nproc_per_node N -m mmfast train ...` (fp32 here, and bf16 as in the README)."""
    for name, precision in (("torchrun", "fp32"), ("torchrun-bf16", "bf16")):
        launcher = [*TORCHRUN, "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "mmfast"]
        run = _cli_run(root, name, launcher, "--engine.name=fsdp2", f"--engine.precision={precision}")
        _assert_follows(root, run.name, tolerance=2e-4 if precision == "fp32" else BF16)


@pytest.mark.distributed
def test_torchrun_two_nodes_launch_the_cli(root):
    """README: one torchrun per node with --nnodes/--node_rank/--master_addr (two one-process nodes here)."""
    port = str(free_port())
    nodes = [[*TORCHRUN, "--nnodes", "2", "--node_rank", str(node), "--nproc_per_node", "1", "--master_addr",
              "127.0.0.1", "--master_port", port, "-m", "mmfast"] for node in (0, 1)]
    run = _cli_run(root, "torchrun-nodes", None, "--engine.name=deepspeed", "--engine.zero_stage=2", processes=nodes)
    _assert_follows(root, run.name)


@pytest.mark.distributed
@NEEDS_DEEPSPEED
def test_deepspeed_launcher_runs_the_cli(root):
    """README: `deepspeed --num_gpus N --module mmfast train ...` and `deepspeed --hostfile hostfile --module
    mmfast train ...`; the launcher puts --local_rank before the subcommand."""
    launcher = [*_deepspeed_launcher(), "--num_gpus", "2", "--master_port", str(free_port()), "--module", "mmfast"]
    run = _cli_run(root, "deepspeed-launcher", launcher, "--engine.name=deepspeed", "--engine.zero_stage=3")
    _assert_follows(root, run.name)
    # Several nodes from a hostfile, one command per node (DeepSpeed's --no_ssh; two one-process nodes here)
    (root / "hostfile").write_text("node0 slots=1\nnode1 slots=1\n")
    port = str(free_port())
    nodes = [[*_deepspeed_launcher(), "--hostfile", str(root / "hostfile"), "--no_ssh", "--node_rank", str(node),
              "--master_addr", "127.0.0.1", "--master_port", port, "--module", "mmfast"] for node in (0, 1)]
    run = _cli_run(root, "deepspeed-nodes", None, "--engine.name=deepspeed", "--engine.zero_stage=3", processes=nodes)
    _assert_follows(root, run.name)


def test_local_rank_is_taken_before_or_after_the_subcommand(monkeypatch):
    from mmfast.cli import _take_local_rank

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert _take_local_rank(["--local_rank=1", "train", "--recipe", "clip-tiny"]) == ["train", "--recipe", "clip-tiny"]
    assert os.environ["LOCAL_RANK"] == "1"
    assert _take_local_rank(["train", "--local-rank", "1", "--optim.lr=1e-3"]) == ["train", "--optim.lr=1e-3"]
    with pytest.raises(SystemExit, match="--local_rank takes a non-negative integer, got 'x'"):
        _take_local_rank(["--local_rank=x", "train"])


def _sections(config):
    """An engine's arguments before the placement: the run's engine and optim sections, its geometry."""
    from mmfast.train.engines import Geometry

    return config.engine, config.optim, Geometry.of_run(config)


def test_engine_choices_are_checked_before_any_process_group():
    from mmfast.train.distributed import Placement
    from mmfast.train.engines import build_engine
    from mmfast.train.engines.fsdp2 import FSDP2Engine
    from mmfast.train.engines.deepspeed_engine import DeepSpeedEngine

    one, two = (Placement(rank=0, world_size=n, local_rank=0, device=torch.device("cpu")) for n in (1, 2))
    with pytest.raises(ValueError, match="engine.name must be one of"):
        build_engine(load_config("clip-tiny", ["--engine.name=horovod"]), one)
    with pytest.raises(ValueError, match="engine.name=fsdp2 shards over processes"):
        build_engine(load_config("clip-tiny", ["--engine.name=fsdp2"]), one)
    with pytest.raises(ValueError, match="engine.name=single runs one process"):
        build_engine(load_config("clip-tiny", ["--engine.name=single"]), two)
    with pytest.raises(ValueError, match="does not take FSDP2's DTensor parameters"):
        FSDP2Engine(*_sections(load_config("clip-tiny", ["--engine.name=fsdp2", "--optim.name=adamw8bit"])), two)
    with pytest.raises(ValueError, match="engine.precision must be one of"):
        FSDP2Engine(*_sections(load_config("clip-tiny", ["--engine.name=fsdp2", "--engine.precision=fp16"])), two)
    with pytest.raises(ValueError, match="offload_parameters needs engine.zero_stage=3"):
        DeepSpeedEngine(*_sections(load_config("clip-tiny", ["--engine.offload_parameters=true"])), two)
    with pytest.raises(ValueError, match=r"engine.zero_stage must be one of \[1, 2, 3\]"):
        DeepSpeedEngine(*_sections(load_config("clip-tiny", ["--engine.zero_stage=4"])), two)
    with pytest.raises(ValueError, match=r"data.batch_size \(100\) must be a multiple of ranks x"):
        from mmfast.train.trainer import _check

        _check(load_config("clip-tiny", ["--data.batch_size=100", "--train.accumulation_steps=3"]), 1)
    with pytest.raises(ValueError, match="train.micro_batch .gradient caching. runs with engine.name single or ddp"):
        from mmfast.train.tasks import build_task

        build_task(load_config("clip-tiny", ["--train.micro_batch=8", "--engine.name=fsdp2"])).check(2)


def _on_every_engine(name, settings):
    """(run name, overrides) for DDP, FSDP2 and, where installed, DeepSpeed ZeRO-2 and ZeRO-3."""
    runs = [(f"{name}-ddp", ["--engine.name=ddp", *settings]), (f"{name}-fsdp2", ["--engine.name=fsdp2", *settings])]
    if __import__("importlib").util.find_spec("deepspeed"):
        runs += [(f"{name}-zero{stage}", ["--engine.name=deepspeed", f"--engine.zero_stage={stage}", *settings])
                 for stage in (2, 3)]
    return runs


@pytest.mark.distributed
def test_a_task_written_against_the_interface_trains_on_every_engine(root):
    """caption_lm (mmfast.train.tasks.caption_lm) knows only the Task interface: on two processes
    under DDP, FSDP2 and DeepSpeed ZeRO-2/3 it follows its single-process run."""
    task = ["--task=caption_lm"]
    _launch(root, [("lm-single", task)], world=1)
    runs = _on_every_engine("lm", task)
    _launch(root, runs)
    for name, _ in runs:
        _assert_follows(root, name, reference="lm-single")
        _assert_same_weights(root, name, reference="lm-single")
    rows = [json.loads(line) for line in open(root / "lm-single" / "metrics.jsonl")]
    assert any("next_token_accuracy" in row for row in rows)


def _assert_frozen_tower_whole(root, single):
    """FSDP2's checkpoint holds the frozen text tower's tensors in one piece (the rest in a piece per
    rank); ZeRO-3's partitions hold none of it, its whole weights lie beside them in towers.pt."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(root / "frozen-fsdp2" / "checkpoints" / "step-0000004" / "sharded")).read_metadata()
    pieces = {key[len("model."):]: len(entry.chunks) for key, entry in metadata.state_dict_metadata.items()
              if key.startswith("model.") and hasattr(entry, "chunks")}
    assert {pieces[key] for key in pieces if key.startswith("text_model.")} == {1}
    assert pieces["vision_model.layers.0.mlp.fc1.weight"] == 2
    folder = root / "frozen-zero3" / "checkpoints" / "step-0000004"
    if folder.exists():
        towers = torch.load(folder / "towers.pt", weights_only=True)
        assert towers.keys() == {key for key in single if key.startswith("text_model.")}
        for key, value in towers.items():
            torch.testing.assert_close(value, single[key], atol=0, rtol=0, msg=key)
        partitioned = torch.load(next(folder.glob("*model_states.pt")), weights_only=False)["param_shapes"]
        names = {name for group in partitioned for name in group}
        assert names and not any(name.startswith("text_model.") for name in names)


@pytest.mark.distributed
def test_frozen_modules_and_prefix_learning_rates_on_every_engine(root):
    """train.frozen and optim.lr_groups give the single process's run under DDP, FSDP2 and ZeRO-2/3; the
    frozen tower stays whole on every rank under FSDP2 and ZeRO-3, also across a resume."""
    settings = ["--train.frozen=[text_model]", "--optim.lr_groups={visual_projection: 3.0e-3}"]
    _launch(root, [("frozen-single", settings)], world=1)
    runs = _on_every_engine("frozen", settings)
    resumed = []
    if any(name == "frozen-zero3" for name, _ in runs):
        zero3 = ["--engine.name=deepspeed", "--engine.zero_stage=3", *settings]
        resumed = [("frozen-zero3-resumed", [*zero3, "--train.stop_after=2"]), ("frozen-zero3-resumed", zero3)]
    _launch(root, runs + resumed)
    single = torch.load(root / "frozen-single" / "model.pt", weights_only=False)["state_dict"]
    initial = torch.load(root / "single" / "model.pt", weights_only=False)["state_dict"]  # same seed, nothing frozen
    assert not any(torch.equal(single[name], initial[name]) for name in single if name.startswith("vision_model."))
    for name, _ in runs:
        _assert_follows(root, name, reference="frozen-single")
        _assert_same_weights(root, name, reference="frozen-single")
    _assert_frozen_tower_whole(root, single)
    if resumed:
        assert _losses(root / "frozen-zero3-resumed") == _losses(root / "frozen-zero3")
    if (root / "frozen-zero2").exists():  # the frozen tower never reaches ZeRO-2's optimizer partitions
        trainable = sum(value.numel() for key, value in single.items() if not key.startswith("text_model."))
        held = 0
        for path in sorted((root / "frozen-zero2" / "checkpoints" / "step-0000004").glob("*optim_states.pt")):
            state = torch.load(path, weights_only=False)["optimizer_state_dict"]
            held += sum(part.numel() for part in state["single_partition_of_fp32_groups"])  # saved unpadded
        assert held == trainable < sum(value.numel() for value in single.values())
