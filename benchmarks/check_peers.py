"""Runs a peer library's own tests twice, as installed and with mmfast's drop-in swapped in, and
prints a table of the outcomes side by side (see the README's "Drop-ins against the peers' tests").

    python benchmarks/check_peers.py --peer timm --repo ~/src/pytorch-image-models --out timm.md
    python benchmarks/check_peers.py --peer open_clip            # clones the tag of the installed version
    python benchmarks/check_peers.py --peer whisper --repo ~/src/whisper

The tests come from the peer's repository at the tag of the installed version (`--repo`: a local git
checkout, else a shallow clone, which needs the network); where that tag is missing from a local
checkout its HEAD is used and the table says so. Not part of the default test run.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ElementTree

HERE = os.path.dirname(os.path.abspath(__file__))
PEERS = {
    "open_clip": dict(distribution="open_clip_torch", url="https://github.com/mlfoundations/open_clip",
                      tests=["tests/test_training_simple.py::test_training"],
                      swapped="open_clip.loss.ClipLoss / SigLipLoss -> mmfast.nn.ClipLoss / SigLipLoss"),
    "timm": dict(distribution="timm", url="https://github.com/huggingface/pytorch-image-models",
                 # eight small ViTs; loading pretrained weights needs the model hub
                 tests=["tests/test_models.py", "-k", "(" + " or ".join(
                     ("vit_tiny_patch16_224", "vit_small_patch16_224", "deit_tiny_patch16_224",
                      "deit_small_patch16_224", "deit_tiny_distilled_patch16_224", "vit_tiny_patch16_384",
                      "vit_small_patch32_224", "vit_base_patch32_224")) + ") and not pretrained"],
                 swapped="every PatchEmbed in models from timm.create_model -> mmfast.nn.PatchEmbed"),
    # test_transcribe loads a checkpoint from the network: only the audio test runs offline
    "whisper": dict(distribution="openai-whisper", url="https://github.com/openai/whisper",
                    tests=["tests/test_audio.py"],
                    swapped="whisper.log_mel_spectrogram (audio, transcribe) -> mmfast.audio.whisper_log_mel"),
}


def _tests(peer: dict, repo: str | None, work: str) -> tuple[str, str]:
    """(folder holding the peer's tests/, the revision they come from)."""
    version = importlib.metadata.version(peer["distribution"])
    tag = f"v{version}"
    if repo is None:
        subprocess.run(["git", "clone", "--quiet", "--depth", "1", "--branch", tag, peer["url"], work], check=True)
        return work, tag
    known = subprocess.run(["git", "-C", repo, "rev-parse", "--verify", "--quiet", tag], capture_output=True)
    revision = tag if known.returncode == 0 else "HEAD"
    archive = subprocess.run(["git", "-C", repo, "archive", revision, "tests"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", work], input=archive.stdout, check=True)
    if revision == "HEAD":
        head = subprocess.run(["git", "-C", repo, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        revision = f"HEAD {head.stdout.strip()} (no tag {tag} in {repo})"
    return work, revision


def _run(folder: str, arguments: list[str], swap: str | None) -> dict[str, str]:
    """{test id: passed / failed / skipped / error}, from pytest's JUnit XML."""
    report = os.path.join(folder, f"report-{swap or 'plain'}.xml")
    # offline: a test that needs the model hub fails at once instead of retrying
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]),
                       HF_HUB_OFFLINE="1")
    if swap:
        environment["MMFAST_SWAP"] = swap
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "peer_swap", "-p", "no:cacheprovider",
                    f"--junitxml={report}", *arguments], cwd=folder, env=environment)
    outcomes = {}
    for case in ElementTree.parse(report).getroot().iter("testcase"):
        kinds = {child.tag for child in case}
        outcome = next((kind for kind in ("failure", "error", "skipped") if kind in kinds), "passed")
        outcomes[f"{case.get('classname')}::{case.get('name')}"] = {"failure": "failed"}.get(outcome, outcome)
    return outcomes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer", required=True, choices=sorted(PEERS))
    parser.add_argument("--repo", help="a local git checkout of the peer (default: clone the installed version's tag)")
    parser.add_argument("--out", help="also write the table (markdown) here")
    args = parser.parse_args(argv)
    peer = PEERS[args.peer]
    with tempfile.TemporaryDirectory() as work:
        folder, revision = _tests(peer, args.repo, work)
        plain, swapped = _run(folder, peer["tests"], None), _run(folder, peer["tests"], args.peer)
    version = importlib.metadata.version(peer["distribution"])
    lines = [f"{args.peer} {version}, tests at {revision}; swapped: {peer['swapped']}", "",
             "| test | as installed | with mmfast |", "| --- | --- | --- |"]
    lines += [f"| {name} | {plain.get(name, '-')} | {swapped.get(name, '-')} |" for name in sorted(set(plain) | set(swapped))]
    count = lambda outcomes, kind: sum(value == kind for value in outcomes.values())  # noqa: E731
    lines += ["", f"passed {count(plain, 'passed')} / {len(plain)} as installed, "
                  f"{count(swapped, 'passed')} / {len(swapped)} with mmfast"]
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
