"""Ahead-of-time compilation of every Triton kernel for real GPU targets, on a machine without a GPU.

Triton's interpreter, which runs the kernels in the CPU tests, executes them as Python and accepts
what a real compile refuses (a plain module global read inside a kernel, a tile shape the tensor
cores do not take). This module calls the public ops on small CPU tensors while the launchers plan
for a GPU (`mmfast.ops._backend.plans_for_gpu`), records each kernel launch instead of running it,
and compiles every distinct (kernel, argument types, constexprs, options) with `triton.compile`
for sm_80 and sm_90.

    python -m mmfast.bench.compile [--targets 80,90] [--jobs 2] [--json report.json]
    mmfast bench compile ...

Run it without TRITON_INTERPRET: the interpreter replaces kernels with Python functions that
cannot be compiled.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import importlib
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import torch

DEFAULT_TARGETS = (80, 90)
DTYPES = (torch.float16, torch.bfloat16)
CONTRASTIVE_WIDTHS = (40, 64, 128, 256, 512, 768, 1024)  # fused backward up to 256, chunked above
HEAD_DIMS = (16, 32, 40, 64, 80, 96, 128, 256)  # what the README lists for mixed_attention
POINTER_TYPES = {
    torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.float64: "*fp64",
    torch.int8: "*i8", torch.uint8: "*u8", torch.int16: "*i16", torch.int32: "*i32", torch.int64: "*i64",
    torch.bool: "*i1",
}
OPTION_NAMES = ("num_warps", "num_stages", "num_ctas", "maxnreg")
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}  # bytes per block (opt-in maximum), CUDA guide
PTXAS_FIELDS = {"registers": r"Used (\d+) registers", "stack_bytes": r"(\d+) bytes stack frame",
                "spill_stores": r"(\d+) bytes spill stores", "spill_loads": r"(\d+) bytes spill loads"}


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """One compile: a kernel, its argument types, constexpr values and launch options."""

    module: str
    name: str
    signature: tuple[tuple[str, str], ...]
    constexprs: tuple[tuple[str, object], ...]
    options: tuple[tuple[str, int], ...]

    def describe(self) -> str:
        types = sorted({t for _, t in self.signature if t.startswith("*") and t not in ("*fp32", "*i32")})
        values = ", ".join(f"{k}={v}" for k, v in self.constexprs)
        options = ", ".join(f"{k}={v}" for k, v in self.options)
        return f"{self.name}[{'/'.join(types) or 'fp32'}] {values}; {options}"


@dataclasses.dataclass
class _Launch:
    kernel: object
    args: tuple
    kwargs: dict


def _argument_type(value, name: str) -> str:
    if isinstance(value, torch.Tensor):
        if value.dtype not in POINTER_TYPES:
            raise TypeError(f"compile: argument {name} has dtype {value.dtype}, which has no Triton pointer type here")
        return POINTER_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"compile: argument {name} is a {type(value).__name__}; expected a tensor, int, float or bool")


def spec_of(kernel, args, kwargs) -> KernelSpec:
    """The compile a launch `kernel[grid](*args, **kwargs)` would trigger on a GPU."""
    kwargs = dict(kwargs)
    options = tuple((name, kwargs.pop(name)) for name in OPTION_NAMES if name in kwargs)
    bound = {param.name: value for param, value in zip(kernel.params, args)}
    bound.update(kwargs)
    signature, constexprs = [], []
    for param in kernel.params:
        if param.name not in bound:
            if not param.has_default:
                raise TypeError(f"compile: launch of {kernel.fn.__name__} passes no value for {param.name}")
            bound[param.name] = param.default
        value = bound[param.name]
        if param.is_constexpr:
            signature.append((param.name, "constexpr"))
            constexprs.append((param.name, value))
        else:
            signature.append((param.name, _argument_type(value, param.name)))
    return KernelSpec(kernel.fn.__module__, kernel.fn.__name__, tuple(signature), tuple(constexprs), options)


@contextlib.contextmanager
def recorded_launches(sm_count: int = 132):
    """While inside, launchers plan for a GPU with `sm_count` SMs, and every `kernel[grid](...)` is
    recorded (not run) into the yielded list. Outputs of the kernels are left unwritten."""
    from triton.runtime.jit import JITFunction, KernelInterface

    from mmfast.ops import _backend

    if _backend.triton_interpreting():
        raise RuntimeError("compile: TRITON_INTERPRET=1 turns kernels into Python functions that cannot be "
                           "compiled; run without it")
    launches: list[_Launch] = []
    original = KernelInterface.__getitem__

    def record(kernel, grid):
        if not isinstance(kernel, JITFunction):
            return original(kernel, grid)
        return lambda *args, **kwargs: launches.append(_Launch(kernel, args, kwargs))

    KernelInterface.__getitem__ = record
    _backend._planning_for_sm_count = sm_count
    try:
        yield launches
    finally:
        KernelInterface.__getitem__ = original
        _backend._planning_for_sm_count = None


def _backward(output, *inputs):
    grads = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    torch.autograd.grad(output.float().sum(), grads, allow_unused=True)


def _contrastive_cases():
    from mmfast.ops import clip_loss, siglip_loss, similarity_logsumexp

    for dtype in DTYPES:
        for width in CONTRASTIVE_WIDTHS:
            def features(rows):
                return torch.randn(rows, width, dtype=dtype).requires_grad_()

            def run():
                image, text, scale = features(33), features(33), torch.tensor(10.0, requires_grad=True)
                _backward(clip_loss(image, text, scale, backend="triton"), image, text, scale)
                rows, _ = similarity_logsumexp(image, text, scale, columns=False, backend="triton")
                _backward(rows, image, text, scale)
                bias = torch.tensor(-5.0, requires_grad=True)
                for offset in (0, None):
                    loss = siglip_loss(image, features(21), scale, bias, positive_offset=offset, backend="triton")
                    _backward(loss, image, scale, bias)

            yield f"contrastive {dtype} D={width}", run


def _attention_cases():
    from mmfast.ops import mixed_attention

    cu_seqlens = torch.tensor([0, 40, 103], dtype=torch.int32)
    span_ids = torch.full((103,), -1, dtype=torch.int32)
    span_ids[5:20] = 0
    for dtype in DTYPES:
        for head_dim in HEAD_DIMS:
            for causal, kv_heads in ((True, 4), (True, 2), (False, 4)):
                def run():
                    q, k, v = (torch.randn(103, heads, head_dim, dtype=dtype).requires_grad_()
                               for heads in (4, kv_heads, kv_heads))
                    out = mixed_attention(q, k, v, cu_seqlens=cu_seqlens, max_seqlen=63, causal=causal,
                                          span_ids=span_ids if causal else None, backend="triton")
                    _backward(out, q, k, v)

                yield f"mixed_attention {dtype} D={head_dim} causal={causal} kv_heads={kv_heads}", run


def _decode_cases():
    from mmfast.ops.mixed_attention import mixed_attention_decode

    for dtype in DTYPES:
        for head_dim in HEAD_DIMS:
            for kv_heads, new in ((8, 1), (2, 1), (2, 16)):  # MHA, GQA 4:1 one token, GQA with 16 new tokens
                def run():
                    q = torch.randn(2, new, 8, head_dim, dtype=dtype)
                    k, v = (torch.randn(2, 300, kv_heads, head_dim, dtype=dtype) for _ in range(2))
                    spans = torch.full((2, 300), -1, dtype=torch.int32)
                    for span_ids in (None, spans):
                        mixed_attention_decode(q, k, v, span_ids=span_ids, backend="triton", validate=False)
                    mixed_attention_decode(q, k, v, causal=False, backend="triton", validate=False)

                yield f"mixed_attention_decode {dtype} D={head_dim} kv_heads={kv_heads} new={new}", run


def _patch_embed_cases():
    from mmfast.ops import patch_embed

    shapes = {  # pixels, weight, stride
        "image p16": ((2, 3, 32, 32), (768, 3, 16, 16), None),
        "image p14": ((2, 3, 28, 28), (1024, 3, 14, 14), None),
        "video 2x16x16": ((2, 3, 4, 32, 32), (768, 3, 2, 16, 16), None),
        "audio AST 16x16 stride 10": ((2, 1, 36, 46), (768, 1, 16, 16), 10),
    }
    for dtype in DTYPES:
        for label, (pixel_shape, weight_shape, stride) in shapes.items():
            for pixel_dtype in (torch.uint8, dtype):
                def run():
                    embed_dim = weight_shape[0]
                    pixels = torch.randint(0, 255, pixel_shape, dtype=torch.uint8).to(pixel_dtype)
                    weight = torch.randn(weight_shape, dtype=dtype).requires_grad_()
                    bias = torch.randn(embed_dim, dtype=dtype).requires_grad_()
                    prefix = torch.randn(1, embed_dim, dtype=dtype).requires_grad_()
                    full = patch_embed(pixels, weight, bias, cls_token=prefix, stride=stride, backend="triton")
                    positions = torch.randn(full.shape[1], embed_dim, dtype=dtype).requires_grad_()
                    out = patch_embed(pixels, weight, bias, pos_embed=positions, cls_token=prefix, stride=stride,
                                      backend="triton")
                    _backward(out, weight, bias, prefix, positions)
                    _backward(patch_embed(pixels, weight, stride=stride, backend="triton"), weight)
                    patches = full.shape[1] - 1  # a masked autoencoder's quarter of them
                    keep = torch.randperm(patches)[:max(1, patches // 4)].expand(pixel_shape[0], -1)
                    _backward(patch_embed(pixels, weight, bias, pos_embed=positions, cls_token=prefix, stride=stride,
                                          keep=keep, backend="triton"), weight, positions)

                yield f"patch_embed {dtype} {label} pixels {pixel_dtype}", run


def _linear_cross_entropy_cases():
    from mmfast.ops import linear_cross_entropy

    # The tile sizes depend on the dtype only (the D loop runs in fixed BD steps): one width is enough.
    for dtype in DTYPES + (torch.float32,):
        for options in (dict(), dict(label_smoothing=0.1, logit_softcap=30.0)):
            def run():
                hidden = torch.randn(70, 4096, dtype=dtype).requires_grad_()
                weight = torch.randn(1000, 4096, dtype=dtype).requires_grad_()
                bias = torch.randn(1000, dtype=dtype).requires_grad_()
                labels = torch.randint(0, 1000, (70,))
                _backward(linear_cross_entropy(hidden, weight, labels, backend="triton", **options), hidden, weight)
                _backward(linear_cross_entropy(hidden, weight, labels, bias=bias, backend="triton", **options),
                          hidden, weight, bias)

            yield f"linear_cross_entropy {dtype} {options}", run


def _log_mel_cases():
    from mmfast.ops import log_mel_spectrogram

    settings = {
        "whisper 80": dict(n_mels=80, normalize="whisper"),
        "whisper 128": dict(n_mels=128, normalize="whisper"),
        "torchaudio power 2": dict(n_mels=128, log=None, pad_mode="constant"),
        "power 1 ln": dict(n_mels=64, power=1, log="ln", clamp_min=None),
    }
    for label, kwargs in settings.items():
        def run():
            log_mel_spectrogram(torch.randn(2, 4000), backend="triton", **kwargs)

        yield f"log_mel {label}", run


def planned_specs(sm_count: int = 132) -> dict[KernelSpec, list[str]]:
    """Every distinct compile the launchers would ask for on a GPU, with the cases that lead to it."""
    specs: dict[KernelSpec, list[str]] = {}
    for cases in (_contrastive_cases, _attention_cases, _decode_cases, _patch_embed_cases,
                  _linear_cross_entropy_cases, _log_mel_cases):
        for label, run in cases():
            with recorded_launches(sm_count) as launches:
                run()
            if not launches:
                raise RuntimeError(f"compile: case {label!r} launched no kernel")
            for launch in launches:
                specs.setdefault(spec_of(launch.kernel, launch.args, launch.kwargs), []).append(label)
    return specs


def compile_spec(spec: KernelSpec, arch: int) -> dict:
    """Compiles one spec for sm_<arch>; returns a report row (error text instead of raising)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = getattr(importlib.import_module(spec.module), spec.name)
    row = {"kernel": f"{spec.module}.{spec.name}", "target": f"sm_{arch}", "config": spec.describe()}
    start = time.perf_counter()
    try:
        source = ASTSource(fn=kernel, signature=dict(spec.signature), constexprs=dict(spec.constexprs))
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=dict(spec.options))
    except Exception as error:  # the report names every failure, not just the first
        row.update(ok=False, error=f"{type(error).__name__}: {error}")
    else:
        shared, limit = compiled.metadata.shared, SHARED_LIMIT.get(arch)
        report = ptxas_report(compiled.asm["ptx"], arch)
        unread = report.pop("ptxas_error", None)
        row.update(ok=(limit is None or shared <= limit) and unread is None, shared_bytes=shared, shared_limit=limit,
                   **report)
        if unread is not None:
            row["error"] = f"ptxas could not report registers and spills: {unread}"
        elif not row["ok"]:
            row["error"] = f"needs {shared} bytes of shared memory per block; sm_{arch} allows {limit}"
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def ptxas_report(ptx: str, arch: int) -> dict:
    """Registers per thread and local-memory spill bytes of a kernel's PTX as ptxas -v reports them
    (the ptxas Triton runs for sm_<arch>, with -v and the target only: triton 3.9 adds
    --regAllocOptLevel=2 of its own); {} where no ptxas is found, {"ptxas_error"} where it fails."""
    ptxas = _ptxas(arch)
    if ptxas is None:
        return {}
    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, "kernel.ptx")
        with open(source, "w") as handle:
            handle.write(ptx)
        gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"  # Triton compiles sm_90 as sm_90a
        done = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", source, "-o", os.path.join(folder, "kernel.o")],
                              capture_output=True, text=True)
    if done.returncode:  # no figures is not "no spills": the row says why
        return {"ptxas_error": f"{os.path.basename(ptxas)}: {done.stderr.strip().splitlines()[0]}"}
    numbers = {key: re.search(pattern, done.stderr) for key, pattern in PTXAS_FIELDS.items()}
    return {key: int(match.group(1)) for key, match in numbers.items() if match}


def _ptxas(arch: int) -> str | None:
    """The ptxas Triton itself runs for sm_<arch> (triton 3.9 takes its newer `ptxas-blackwell` from
    sm_90 on, 3.6-3.8 from sm_100), else the one it ships, else one on PATH."""
    import triton

    try:
        from triton.backends.nvidia.compiler import get_ptxas

        path = get_ptxas(arch).path
    except Exception:  # older or newer triton without it, or a tool it cannot find
        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    return path if path and os.path.exists(path) else shutil.which("ptxas")


def _compile_job(job):
    return compile_spec(*job)


def compile_all(targets=DEFAULT_TARGETS, jobs: int = 2, progress: bool = True) -> list[dict]:
    """Compiles every planned spec for every target; one report row per (spec, target)."""
    from tqdm.auto import tqdm

    work = [(spec, arch) for spec in planned_specs() for arch in targets]
    context = multiprocessing.get_context("spawn")  # workers import only what one compile needs
    with concurrent.futures.ProcessPoolExecutor(max_workers=max(1, jobs), mp_context=context) as pool:
        rows = list(tqdm(pool.map(_compile_job, work), total=len(work), desc="compiling kernels",
                         disable=not progress))
    return rows


def table(rows: list[dict]) -> str:
    """The report as a Markdown table: one line per compile, spilling ones first."""
    lines = ["| kernel | target | registers | spill stores / loads (bytes) | shared memory / limit (KiB) | configuration |",
             "| --- | --- | --- | --- | --- | --- |"]
    def spills(row):
        return row.get("spill_stores", 0) + row.get("spill_loads", 0)

    def name(row):  # "mixed_attention._bwd_dkdv_kernel" from "mmfast.ops.mixed_attention.triton._bwd_dkdv_kernel"
        parts = row["kernel"].split(".")
        return f"{parts[-3] if len(parts) >= 3 else parts[0]}.{parts[-1]}"
    for row in sorted(rows, key=lambda row: (-spills(row), row["kernel"], row["target"], row["config"])):
        if not row["ok"] and "shared_bytes" not in row:
            lines.append(f"| {name(row)} | {row['target']} | FAILED | | | {row['config']} |")
            continue
        limit = "-" if row.get("shared_limit") is None else f"{row['shared_limit'] / 1024:.0f}"
        lines.append(f"| {name(row)} | {row['target']} "
                     f"| {row.get('registers', '?')} | {row.get('spill_stores', '?')} / {row.get('spill_loads', '?')} "
                     f"| {row['shared_bytes'] / 1024:.1f} / {limit} | {row['config']} |")
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    """One Markdown line per kernel and target: configurations, registers, worst spill, most shared memory."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        parts = row["kernel"].split(".")
        groups.setdefault((f"{parts[-3] if len(parts) >= 3 else parts[0]}.{parts[-1]}", row["target"]), []).append(row)
    lines = ["| kernel | target | configurations | registers | worst spill stores / loads (bytes) "
             "| most shared memory / limit (KiB) |", "| --- | --- | --- | --- | --- | --- |"]
    for (name, target), members in sorted(groups.items()):
        compiled = [row for row in members if "shared_bytes" in row]
        registers = [row["registers"] for row in compiled if "registers" in row]
        stores = max((row.get("spill_stores", 0) for row in compiled), default=0)
        loads = max((row.get("spill_loads", 0) for row in compiled), default=0)
        shared = max((row["shared_bytes"] for row in compiled), default=0)
        limit = next((row["shared_limit"] for row in compiled if row.get("shared_limit")), None)
        failed = len(members) - sum(row["ok"] for row in members)
        lines.append(f"| {name} | {target} | {len(members)}{f' ({failed} FAILED)' if failed else ''} "
                     f"| {min(registers, default=0)}-{max(registers, default=0)} | {stores} / {loads} "
                     f"| {shared / 1024:.1f} / {'-' if limit is None else f'{limit / 1024:.0f}'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mmfast bench compile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default=",".join(map(str, DEFAULT_TARGETS)),
                        help="compute capabilities, comma-separated (default: 80,90)")
    parser.add_argument("--jobs", type=int, default=2, help="compiles in parallel (default: 2)")
    parser.add_argument("--json", help="write the report rows to this file")
    args = parser.parse_args(argv)
    try:
        targets = tuple(int(t.removeprefix("sm_")) for t in args.targets.split(","))
    except ValueError:
        parser.error(f"--targets takes compute capabilities like 80,90; got {args.targets!r}")
    rows = compile_all(targets, args.jobs)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)
    failures = [row for row in rows if not row["ok"]]
    kernels = sorted({row["kernel"] for row in rows})
    print(table(rows))
    print()
    print(summary(rows))
    print(f"mmfast bench compile: {len(rows) - len(failures)} of {len(rows)} compiles passed "
          f"({len(kernels)} kernels, targets {', '.join(f'sm_{t}' for t in targets)})")
    for row in failures:
        print(f"FAILED {row['kernel']} {row['target']} {row['config']}\n    {row['error'][:2000]}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
