"""The compile gate: every Triton kernel compiles for real GPU targets (sm_80, sm_90) with the tile sizes
its launcher picks on a GPU. Triton's interpreter, which runs the other kernel tests, accepts code that a
real compile refuses (a module global read inside a kernel), so this runs `mmfast bench compile` in a
process without TRITON_INTERPRET."""
import ast
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")
OPS = pathlib.Path(__file__).resolve().parents[1] / "mmfast" / "ops"


def _compiling_env():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    return env


def _launched_kernels() -> set[str]:
    """`module.name` of every @triton.jit function in mmfast/ops that no other jit function calls."""
    jitted, called = {}, set()
    for path in OPS.glob("*/triton*.py"):
        module = "mmfast.ops." + ".".join(path.relative_to(OPS).with_suffix("").parts)
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and any("jit" in ast.unparse(d) for d in node.decorator_list):
                jitted[f"{module}.{node.name}"] = node
                called.update(f"{module}.{c.func.id}" for c in ast.walk(node)
                              if isinstance(c, ast.Call) and isinstance(c.func, ast.Name))
    return set(jitted) - called


def test_every_kernel_compiles_for_sm80_and_sm90(tmp_path):
    report = tmp_path / "compile.json"
    result = subprocess.run([sys.executable, "-m", "mmfast.bench.compile", "--json", str(report)],
                            env=_compiling_env(), capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-20000:] + result.stderr[-5000:]
    rows = json.loads(report.read_text())
    assert all(row["ok"] for row in rows)
    # Every launcher picks tile sizes that ptxas compiles without spilling to local memory; a kernel
    # or config change that spills fails here (the report names registers and spills per config).
    spilling = [f"{row['kernel']} {row['target']} {row['config']}: {row['spill_stores']} bytes"
                for row in rows if row.get("spill_stores") or row.get("spill_loads")]
    assert not spilling, "\n".join(spilling)
    assert all("registers" in row for row in rows), "ptxas gave no register counts"
    kernels = _launched_kernels()
    assert len(kernels) >= 14
    for target in ("sm_80", "sm_90"):
        compiled = {row["kernel"] for row in rows if row["target"] == target}
        assert compiled == kernels, f"{target}: never compiled {kernels - compiled}, unknown {compiled - kernels}"


def test_gate_fails_on_a_module_global_read_inside_a_kernel(tmp_path):
    """The bug class of the InfoNCE forward: the interpreter runs it, a real compile refuses it."""
    module = tmp_path / "global_kernel.py"
    module.write_text(textwrap.dedent('''
        import triton
        import triton.language as tl

        LOW = -1.0e30
        SAFE_LOW = tl.constexpr(-1.0e30)

        @triton.jit
        def plain_global_kernel(out_ptr, BLOCK: tl.constexpr):
            tl.store(out_ptr + tl.arange(0, BLOCK), tl.full((BLOCK,), LOW, tl.float32))

        @triton.jit
        def constexpr_global_kernel(out_ptr, BLOCK: tl.constexpr):
            tl.store(out_ptr + tl.arange(0, BLOCK), tl.full((BLOCK,), SAFE_LOW, tl.float32))
    '''))
    script = textwrap.dedent('''
        import json, sys
        from mmfast.bench.compile import KernelSpec, compile_spec
        rows = [compile_spec(KernelSpec("global_kernel", name, (("out_ptr", "*fp32"), ("BLOCK", "constexpr")),
                                        (("BLOCK", 64),), (("num_warps", 4),)), 90)
                for name in ("plain_global_kernel", "constexpr_global_kernel")]
        print(json.dumps(rows))
    ''')
    env = _compiling_env()
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    plain, constexpr = json.loads(result.stdout.strip().splitlines()[-1])
    assert not plain["ok"] and "Cannot access global variable LOW" in plain["error"]
    assert constexpr["ok"], constexpr.get("error")


def test_a_ptx_that_ptxas_cannot_read_is_an_error_not_zero_spills():
    """triton 3.9 writes sm_90 PTX that only its newer ptxas reads; a report that asked the other one
    got no figures, which the gate took for no spills. Now the row says what ptxas said."""
    from mmfast.bench.compile import _ptxas, ptxas_report

    if _ptxas(90) is None:
        pytest.skip("no ptxas")
    unreadable = ".version 99.9\n.target sm_90a\n.address_size 64\n"
    report = ptxas_report(unreadable, 90)
    assert "ptxas_error" in report and "spill_stores" not in report
    assert "99.9" in report["ptxas_error"] or "version" in report["ptxas_error"].lower()
