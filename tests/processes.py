"""Helpers for tests that start several processes over gloo."""
import gc
import glob
import socket

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
