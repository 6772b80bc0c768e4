"""Helpers for tests that start several processes over gloo."""
import gc
import glob
import os
import socket
import sys

DISTRIBUTED_THREADS = {"gloo_tcp_loop", "pt_gloo_runloop", "pt_tcpstore_uv"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def assert_process_group_freed():
    """After destroy_process_group: no gloo or TCPStore thread is left for interpreter shutdown to tear
    down, where its destruction order is arbitrary and can abort the process ("terminate called without
    an active exception"). Something that still holds the group (torch.distributed.nn imported after
    init_process_group binds it as a default argument) keeps them alive."""
    gc.collect()
    threads = {open(f"{task}/comm").read().strip() for task in glob.glob("/proc/self/task/*")}
    assert not DISTRIBUTED_THREADS & threads, f"still running after destroy_process_group: {sorted(threads)}"


def leave_worker() -> None:
    """The end of a training worker: FSDP2's device meshes (in DTensor's internal caches) and DeepSpeed's
    communication module keep the group and its threads alive past destroy_process_group; their teardown
    at interpreter exit can abort a worker whose work is done and written: leave without it (as
    `mmfast train` does)."""
    import torch

    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


EXTENSIONS = os.path.join(os.path.expanduser("~"), ".cache", "mmfast", "torch_extensions")


def _training_worker(rank, world, port, make_config, root, runs):
    # CPU processes over gloo even on a GPU machine (set before CUDA is first touched)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), TORCH_EXTENSIONS_DIR=EXTENSIONS, CUDA_VISIBLE_DEVICES="")
    from mmfast.train import train

    for name, overrides in runs:
        train(make_config(root, name, *overrides), progress=False)
    leave_worker()


def launch_training(make_config, root, runs, world=2) -> None:
    """Runs train(make_config(root, name, *overrides)) for each (name, overrides) in `world` processes, one
    process group for all (make_config: a module-level function, so spawned processes can import it)."""
    import torch

    torch.multiprocessing.start_processes(_training_worker, args=(world, free_port(), make_config, root, runs),
                                          nprocs=world, start_method="spawn")


def assert_ddp_follows_one_process(make_config, root, steps: int = 4) -> None:
    """make_config's run in one process (root/single) and in two under DDP (root/ddp): the same loss at
    every one of `steps` steps."""
    import pytest

    from tests.runs import losses

    launch_training(make_config, root, [("single", [])], world=1)
    launch_training(make_config, root, [("ddp", ["--engine.name=ddp"])], world=2)
    single, ddp = losses(root / "single"), losses(root / "ddp")
    assert single.keys() == ddp.keys() == set(range(1, steps + 1))
    for step in single:
        assert ddp[step] == pytest.approx(single[step], rel=1e-4, abs=1e-5)
