"""The benchmark harness end to end on the CPU profile: files, rows, ratios, plot, both fronts."""
import json
import os
import subprocess
import sys

import pytest
import torch

from mmfast.bench import report
from mmfast.bench.timing import measure
from mmfast.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_mmfast_bench_writes_every_file(tmp_path, capsys):
    assert main(["bench", "contrastive", "--out", str(tmp_path), "--modes", "forward,full"]) == 0
    names = sorted(os.listdir(tmp_path))
    assert names == ["contrastive.png", "results.csv", "results.json", "results.md"]
    assert (tmp_path / "contrastive.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = json.loads((tmp_path / "results.json").read_text())
    assert {r["mode"] for r in rows} == {"forward", "full"}
    for row in rows:
        assert row["status"] == "ok"
        assert row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
        assert row["tflops"] > 0
        for key in ("torch", "triton", "git_commit", "timestamp", "device", "N", "D", "dtype"):
            assert key in row
    groups = {(r["group"], r["mode"]): {x["provider"] for x in rows if (x["group"], x["mode"]) == (r["group"], r["mode"])}
              for r in rows}
    assert all(providers == {"mmfast", "eager"} for providers in groups.values())
    table = (tmp_path / "results.md").read_text()
    assert "## contrastive, full" in table and "x |" in table
    assert "mmfast bench: suites ['contrastive'], profile cpu" in capsys.readouterr().out


def test_bench_trace_writes_a_profile_per_case_naming_mmfast_ops(tmp_path):
    assert main(["bench", "contrastive", "--out", str(tmp_path / "out"), "--modes", "full",
                 "--trace", str(tmp_path / "trace")]) == 0
    traces = sorted(os.listdir(tmp_path / "trace"))
    assert traces and all(name.endswith(".pt.trace.json") for name in traces)
    ours = [name for name in traces if "mmfast" in name]
    assert ours, traces
    names = {event.get("name") for event in json.loads((tmp_path / "trace" / ours[0]).read_text())["traceEvents"]}
    assert any(name and name.startswith("mmfast.") for name in names)


def test_speedup_is_baseline_over_mmfast():
    common = dict(suite="s", group="g", mode="full", status="ok")
    rows = [dict(common, provider="mmfast", is_mmfast=True, median_ms=2.0),
            dict(common, provider="peer", is_mmfast=False, median_ms=5.0),
            dict(common, provider="oom-peer", is_mmfast=False, status="out of memory")]
    assert report.speedups(rows) == {("s", "g", "full", "peer"): 2.5}
    assert "| g | oom-peer | out of memory |" in report.markdown(rows)


def test_measure_orders_percentiles_and_clears_gradients():
    leaf = torch.randn(64, requires_grad=True)
    timing = measure(lambda: (leaf * 2).sum(), [leaf], "full", torch.device("cpu"), warmup=1, repeats=7)
    assert timing.repeats == 7 and timing.p20_ms <= timing.median_ms <= timing.p80_ms
    assert leaf.grad is None


def test_unknown_suite_is_an_error(capsys):
    assert main(["bench", "nope"]) == 2
    assert "unknown suite(s) ['nope']" in capsys.readouterr().err


def test_pytest_benchmark_front(tmp_path):
    pytest.importorskip("pytest_benchmark")
    output = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks/test_contrastive.py", "--benchmark-only", "-q", "-p", "no:cacheprovider",
         "-k", "256", f"--benchmark-json={output}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        # under pytest -n, xdist's worker variables would make pytest-benchmark disable itself in the child
        env={key: value for key, value in os.environ.items() if not key.startswith("PYTEST_XDIST")})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    benchmarks = json.loads(output.read_text())["benchmarks"]
    assert len(benchmarks) == 6  # clip N=256: two providers x three modes
    assert all(b["extra_info"]["tflops_at_median"] > 0 for b in benchmarks)


def test_mmfast_info_json(capsys):
    assert main(["info", "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["torch"] == torch.__version__
    assert "reference" in facts["backends"] and "open_clip_torch" in facts["optional_packages"]


def test_patch_embed_suite_reports_bandwidth(tmp_path):
    assert main(["bench", "patch_embed", "--out", str(tmp_path), "--modes", "forward"]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())
    assert {r["provider"] for r in rows} == {"mmfast", "eager", "embed+gather"}
    assert all(r["status"] == "ok" and r["gbps"] > 0 and r["tflops"] > 0 for r in rows)
    masked = {r["provider"] for r in rows if "masked" in r["group"]}
    assert masked == {"mmfast", "embed+gather"}  # the kept-patch embedding against embedding all, then a gather


def test_mixed_attention_suite_counts_only_unmasked_pairs(tmp_path):
    from mmfast.bench.suites.mixed_attention import cases

    baseline = [c for c in cases("quick", torch.device("cpu")) if c.group.startswith("mixed S=8192")][0]
    assert abs(baseline.params["mask_density"] - 0.135) < 0.001  # BASELINES.md: 13.5 %
    assert main(["bench", "mixed_attention", "--out", str(tmp_path), "--modes", "forward"]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())
    assert {r["provider"] for r in rows} == {"mmfast", "sdpa dense mask"} and all(r["status"] == "ok" for r in rows)


def test_a_failing_provider_is_reported_and_the_run_goes_on():
    from mmfast.bench.registry import Case
    from mmfast.bench.runner import run_case

    def broken():
        raise RuntimeError("no compiler here\nmore detail")

    case = Case(suite="s", group="g", provider="broken", params={}, make=broken, modes=("forward",))
    rows = run_case(case, torch.device("cpu"), ("forward",), {})
    assert rows[0]["status"] == "failed: RuntimeError: no compiler here"


def test_clip_train_suite_compares_the_same_model(tmp_path):
    """Both providers start from the same weights: their first losses agree, and each step reports
    samples/s."""
    from mmfast.bench.suites.clip_train import cases

    pytest.importorskip("transformers")
    losses = [case.make()[0]().item() for case in cases("cpu", torch.device("cpu"))]
    assert losses[0] == pytest.approx(losses[1], abs=1e-4)
    assert main(["bench", "clip_train", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())
    assert {r["provider"] for r in rows} == {"mmfast", "hf sdpa + open_clip loss"}
    assert all(r["status"] == "ok" and r["mode"] == "full" and r["samples_per_s"] > 0 for r in rows)


def test_llava_train_suite_compares_the_same_model(tmp_path):
    """Packed mmfast and padded HF start from the same weights and conversations: their first losses
    agree; each step reports real tokens/s."""
    from mmfast.bench.suites.llava_train import cases

    pytest.importorskip("transformers")
    losses = [case.make()[0]().item() for case in cases("cpu", torch.device("cpu"))]
    assert 0 < losses[0] < 10 and losses[0] == pytest.approx(losses[1], abs=1e-4)
    assert main(["bench", "llava_train", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())
    assert {r["provider"] for r in rows} == {"mmfast", "hf sdpa padded"}
    assert all(r["status"] == "ok" and r["mode"] == "full" and r["tokens_per_s"] > 0 for r in rows)


def test_griffin_lim_suite_runs_mmfast_and_librosa(tmp_path):
    pytest.importorskip("librosa")
    assert main(["bench", "griffin_lim", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())
    assert {r["provider"] for r in rows} == {"mmfast", "librosa"}
    assert all(r["status"] == "ok" and r["audio_seconds_per_s"] > 0 for r in rows)


def test_grad_cache_benchmark_script_runs_a_step():
    import runpy

    script = runpy.run_path(os.path.join(os.path.dirname(__file__), "..", "benchmarks", "clip_grad_cache.py"))
    result = script["main"](["--size", "tiny", "--batch", "48", "--micro-batch", "16", "--steps", "1",
                             "--dtype", "fp32"])
    assert result["finite"] and result["batch"] == 48 and result["seconds_per_step"] > 0


def test_targets_table_from_recorded_results():
    """mmfast.bench.targets reads the H200 session's results: the memory targets met, the speed ones
    not, and the targets of suites that did not run then say so."""
    from mmfast.bench import targets

    table = targets.table(targets.load([os.path.join(ROOT, "benchmarks", "results", "h200-20261127")]))
    assert "| clip N=32768 D=768 memory above inputs (MB) | <= 1024 MB | 457 MB | yes |" in table
    assert "| CLIP ViT-B/16 training step, batch 256, vs HF | >= 1.3x | 0.96x | no |" in table
    assert "| decode B=8 S=32768 vs SDPA with a mask | >= 2.0x | not measured | - |" in table
    # a bound relative to the baseline's memory (LLaVA: at most 0.8x HF's)
    group = "LLaVA ViT-L/14-336 + 1.1B batch 8"
    rows = [dict(suite="llava_train", group=group, mode="full", provider=provider, status="ok", median_ms=ms,
                 peak_memory_mb=mb) for provider, ms, mb in (("mmfast", 100.0, 70.0), ("hf sdpa padded", 160.0, 100.0))]
    table = targets.table(rows)
    assert "vs HF padded | >= 1.5x | 1.60x | yes |" in table
    assert "(mmfast / HF <= 0.8) | <= 80 MB | 70 MB | yes |" in table


def test_data_score_suite_scores_the_same_pairs(tmp_path):
    """mmfast (uint8 pixels, normalized in its patch embedding) and the peer (float pixels normalized by
    its transform) hold the same weights: the same pictures give the same features; each provider's
    step scores its batch."""
    from mmfast.bench.suites.clip_train import MEAN, STD
    from mmfast.bench.suites.data_score import _pair, cases, peer_name

    pytest.importorskip("transformers")
    pytest.importorskip("torchvision")
    ours, peer = _pair("tiny", torch.device("cpu"))
    pixels = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    tokens = torch.randint(1, 999, (3, 16))
    tokens[:, -1] = 999
    normalized = (pixels.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        image, words = peer(normalized, tokens)
        torch.testing.assert_close(ours.encode_image(pixels), image, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours.encode_text(tokens), words, rtol=1e-4, atol=1e-4)
    scores = [case.make()[0]() for case in cases("cpu", torch.device("cpu"))]
    assert all(score.shape == (8,) and score.abs().max() <= 1 for score in scores)
    assert main(["bench", "data_score", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())
    assert {r["provider"] for r in rows} == {"mmfast", peer_name()}
    assert all(r["status"] == "ok" and r["pairs_per_s"] > 0 for r in rows)


def test_unified_train_suite_compares_the_same_step(tmp_path):
    """mmfast's mixed attention and SDPA with the dense mask built from the same packing give the same
    first loss on the same weights and packed batch (images and clips as spans)."""
    from mmfast.bench.suites.unified_train import cases

    losses = [case.make()[0]().item() for case in cases("cpu", torch.device("cpu"))]
    assert 0 < losses[0] < 30 and losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert main(["bench", "unified_train", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())
    assert {r["provider"] for r in rows} == {"mmfast", "sdpa dense mask"}
    assert all(r["status"] == "ok" and r["tokens_per_s"] > 0 for r in rows)


def test_audio_frontend_suite_runs_mmfast_and_the_hf_front_end(tmp_path):
    pytest.importorskip("transformers")
    assert main(["bench", "audio_frontend", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [row["provider"] for row in rows][:2] == ["mmfast", "mmfast kaldi_fbank (AST's own features)"]
    assert len(rows) == 3 and "ASTFeatureExtractor" in rows[2]["provider"]
    assert all(r["status"] == "ok" and r["audio_hours_per_s"] > 0 for r in rows)
