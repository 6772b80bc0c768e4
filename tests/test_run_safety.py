"""Run directories are untrusted input and runs get killed: loading never executes code from a file,
checkpoint pointers stay inside the run, a kill at any moment resumes exactly, a resume never
silently changes the run, and the metrics hold each step once."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

import mmfast
from mmfast.train import checkpoint, load_config, train
from mmfast.train.trainer import _run_name
from tests.runs import losses, run_config
from tests.test_train import TINY as RECIPE_TINY

# QuickGELU, ClipConfig's default: a run written before model.activation existed had it
TINY = [*RECIPE_TINY, "--model.activation=quick_gelu"]

pytest.importorskip("webdataset")


class _RunsCode:
    """Unpickling this runs `touch <path>`: what a crafted run file would do."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def _config(root, name, *extra):
    return run_config(root, name, TINY, *extra)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """One uninterrupted 6-step run (checkpoints at 3 and 6) the other runs are compared with."""
    root = tmp_path_factory.mktemp("safety")
    train(_config(root, "straight"), progress=False)
    return root


def _copy_run(root, name, step=None, target=None):
    """A copy of the straight run (as root/name, or `target`), optionally cut back to the checkpoint
    of `step`."""
    target = target or root / name
    shutil.copytree(root / "straight", target)
    if step is not None:
        for folder in (target / "checkpoints").iterdir():
            if folder.is_dir() and folder.name > checkpoint.folder_name(step):
                shutil.rmtree(folder)
        (target / "checkpoints" / "latest").write_text(checkpoint.folder_name(step))
    return target


def test_loading_a_crafted_model_file_runs_nothing(root, tmp_path):
    run = _copy_run(root, "crafted-model")
    proof = tmp_path / "code-ran"
    saved = torch.load(run / "model.pt", weights_only=True)
    saved["clip_config"]["note"] = _RunsCode(proof)
    torch.save(saved, run / "model.pt")
    with pytest.raises(ValueError, match="model.pt: refused to load: it holds Python objects"):
        mmfast.load_clip(str(run))
    assert not proof.exists()


@pytest.mark.parametrize("file", ["state.pt", "trainer-rank0.pt"])
def test_resuming_from_a_crafted_checkpoint_runs_nothing(root, tmp_path, file):
    run = _copy_run(root, f"crafted-{file}", step=3)
    proof = tmp_path / "code-ran"
    path = run / "checkpoints" / "step-0000003" / file
    state = torch.load(path, weights_only=True)
    state["extra"] = _RunsCode(proof)
    torch.save(state, path)
    with pytest.raises(ValueError, match=f"{file}: refused to load"):
        train(_config(root, run.name), progress=False)
    assert not proof.exists()


@pytest.mark.parametrize("pointer", ["../../elsewhere/step-0000003", "/tmp/step-0000003", "", "step-00\x00"])
def test_latest_never_leaves_the_run_directory(root, tmp_path, pointer):
    outside = tmp_path / "elsewhere" / "step-0000003"
    os.makedirs(outside)
    run = _copy_run(root, None, target=tmp_path / "a" / "b" / "run")
    (run / "checkpoints" / "latest").write_text(pointer)
    assert checkpoint.latest(str(run / "checkpoints")) == str(run / "checkpoints" / "step-0000006")


def test_an_empty_latest_after_a_kill_falls_back_to_the_newest_complete_checkpoint(root):
    run = _copy_run(root, "empty-latest", step=3)
    (run / "checkpoints" / "latest").write_text("")
    os.makedirs(run / "checkpoints" / "step-0000005")  # a checkpoint killed while being written
    train(_config(root, run.name), progress=False)
    assert losses(run) == losses(root / "straight")


def test_recipe_names_cannot_place_runs_elsewhere():
    with pytest.raises(ValueError, match="a recipe is a name in mmfast/configs/"):
        load_config("../../x")
    assert _run_name("../../x") == "x" and _run_name("/etc/passwd.yaml") == "passwd"
    assert _run_name("..") == "run" and _run_name("a b/../c") == "c"


def test_kill_9_during_training_then_rerun_gives_the_uninterrupted_losses(root):
    """The process is killed right after its first checkpoint, mid-step; the rerun resumes there."""
    run = root / "killed"
    command = [sys.executable, "-m", "mmfast", "train", "--recipe", "clip-tiny", "--run-dir", str(run), *TINY,
               f"--data.synth_dir={root / 'synth'}"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (run / "checkpoints" / "step-0000003" / checkpoint.COMPLETE).exists():
        assert process.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    train(_config(root, "killed"), progress=False)
    assert losses(run) == losses(root / "straight")
    steps = [json.loads(line)["step"] for line in open(run / "metrics.jsonl") if "loss" in json.loads(line)]
    assert steps == [1, 2, 3, 4, 5, 6]  # the steps replayed after the kill are logged once


def test_rerunning_a_finished_run_adds_no_rows(root):
    run = _copy_run(root, "finished")
    before = (run / "metrics.jsonl").read_text()
    result = train(_config(root, run.name), progress=False)
    assert result["step"] == 6 and (run / "metrics.jsonl").read_text() == before


def test_a_resume_that_changes_the_run_is_refused_unless_allowed(root):
    run = _copy_run(root, "changed", step=3)
    saved = (run / "config.yaml").read_text()
    recipe_lr = load_config("clip-tiny", []).optim.lr
    with pytest.raises(ValueError, match=rf"optim.lr: {recipe_lr} -> 0.01.*--resume.allow_changes=optim.lr"):
        train(_config(root, run.name, "--optim.lr=0.01"), progress=False)
    with pytest.raises(ValueError, match=r"model.embed_dim: 32 -> 48\); start a new run directory"):
        train(_config(root, run.name, "--model.embed_dim=48", "--resume.allow_changes=model"), progress=False)
    assert (run / "config.yaml").read_text() == saved  # nothing rewritten before a load succeeded
    assert mmfast.load_clip(str(run))[0].config.embed_dim == 32  # export still matches the checkpoint
    (run / "model.pt").unlink()

    train(_config(root, run.name, "--optim.lr=0.01", "--resume.allow_changes=optim.lr"), progress=False)
    assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["lr"] == 0.01
    rows = {r["step"]: r for r in map(json.loads, open(run / "metrics.jsonl")) if "lr" in r}
    straight = {r["step"]: r for r in map(json.loads, open(root / "straight" / "metrics.jsonl")) if "lr" in r}
    assert rows[3]["lr"] == straight[3]["lr"]  # before the resume: the saved run's schedule
    assert rows[4]["lr"] == pytest.approx(straight[4]["lr"] * 0.01 / recipe_lr)  # after: the new peak
    # free keys (when to log, evaluate, checkpoint or stop) change nothing the run computes
    train(_config(root, run.name, "--train.log_every=2", "--optim.lr=0.01"), progress=False)


def test_a_run_written_before_model_fields_were_added_resumes_and_loads(root):
    run = _copy_run(root, "older", step=3)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    del saved["model"]["activation"], saved["model"]["vision"]["mean"], saved["model"]["vision"]["std"]
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    exported = torch.load(run / "model.pt", weights_only=True)  # the older file: normalization beside the config
    vision = exported["clip_config"]["vision"]
    exported["mean"], exported["std"] = vision.pop("mean"), vision.pop("std")
    torch.save(exported, run / "model.pt")
    assert mmfast.load_clip(str(run))[0].vision_model.embeddings.std == tuple(exported["std"])
    (run / "model.pt").unlink()
    train(_config(root, run.name), progress=False)
    assert losses(run) == losses(root / "straight")


def test_every_config_value_is_checked_with_its_key():
    cases = {"--optim.schedule=cosinee": r"optim.schedule must be one of \['cosine', 'linear', 'constant'\], got 'cosinee'",
             "--train.steps=0": "train.steps must be >= 1, got 0",
             "--train.stop_after=-1": "train.stop_after must be >= 1, got -1",
             "--data.batch_size=-8": "data.batch_size must be >= 1, got -8",
             "--train.eval_every=0": "train.eval_every must be >= 1",
             "--train.checkpoint_every=0": "train.checkpoint_every must be >= 1",
             "--train.log_every=0": "train.log_every must be >= 1",
             "--optim.lr=0": "optim.lr must be > 0.0",
             "--optim.beta2=1.0": "optim.beta2 must be < 1.0",
             "--engine.zero_stage=4": r"engine.zero_stage must be one of \[1, 2, 3\]",
             "--model.vision.heads=0": "model.vision.heads must be >= 1"}
    for override, message in cases.items():
        with pytest.raises(ValueError, match=message):
            load_config("clip-tiny", [override])
