"""mmfast.ops.clip_loss / siglip_loss / similarity_logsumexp against a float64 dense reference,
open_clip, and the low-precision reference's own error; bad inputs; memory of the CPU path."""
import json
import math
import subprocess
import sys

import pytest
import torch

import mmfast
from mmfast.ops.contrastive import reference
from tests.conftest import DEVICE
from tests.tolerance import assert_within_reference_error

SHAPES = [pytest.param(n, d, id=f"N{n}-D{d}") for n in (1, 7, 300) for d in (40, 64, 768)]
BACKENDS = ["triton", "reference"]
CPU_DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]


def features(n, d, dtype, seed=0, rows=None, normalize=True):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows or n, d, generator=generator, dtype=torch.float64)
    if normalize:  # as CLIP models do; keeps the logits in the range training sees
        x = x / x.norm(dim=1, keepdim=True)
    return x.to(DEVICE, dtype).requires_grad_()


def gradients(loss, inputs):
    return torch.autograd.grad(loss, inputs)


def run_case(loss_fn, reference_fn, inputs, dtype, label):
    """Kernel vs float64 reference, with the reference in `dtype` setting the tolerance."""
    loss = loss_fn(*inputs)
    grads = gradients(loss, inputs)
    exact_inputs = [x.detach().double().requires_grad_() for x in inputs]
    exact = reference_fn(*exact_inputs, dtype=torch.float64)
    exact_grads = gradients(exact, exact_inputs)
    low_inputs = [x.detach().clone().requires_grad_() for x in inputs]
    low = reference_fn(*low_inputs, dtype=dtype)
    low_grads = gradients(low, low_inputs)
    assert_within_reference_error(f"{label} loss", loss, exact, low, dtype)
    names = ["d_image", "d_text", "d_scale", "d_bias"]
    for name, grad, exact_grad, low_grad in zip(names, grads, exact_grads, low_grads):
        assert grad.dtype == inputs[names.index(name)].dtype
        assert_within_reference_error(f"{label} {name}", grad, exact_grad, low_grad, dtype)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,d", SHAPES)
def test_clip_loss_matches_reference(n, d, backend, dtype):
    image, text = features(n, d, dtype, seed=1), features(n, d, dtype, seed=2)
    scale = torch.tensor(14.3, device=DEVICE, requires_grad=True)
    run_case(lambda i, t, s: mmfast.ops.clip_loss(i, t, s, backend=backend),
             reference.clip_loss, [image, text, scale], dtype, f"clip {backend}")


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,d", SHAPES)
def test_siglip_loss_matches_reference(n, d, backend, dtype):
    image, text = features(n, d, dtype, seed=3), features(n, d, dtype, seed=4)
    scale = torch.tensor(10.0, device=DEVICE, requires_grad=True)
    bias = torch.tensor(-10.0, device=DEVICE, requires_grad=True)
    run_case(lambda i, t, s, b: mmfast.ops.siglip_loss(i, t, s, b, backend=backend),
             reference.siglip_loss, [image, text, scale, bias], dtype, f"siglip {backend}")


@pytest.mark.parametrize("offset", [None, 0, 5, -3], ids=lambda o: f"offset{o}")
@pytest.mark.parametrize("backend", BACKENDS)
def test_siglip_positive_offset_rectangular(backend, offset):
    image, text = features(13, 40, torch.float32, seed=5), features(13, 40, torch.float32, seed=6, rows=45)
    scale = torch.tensor(7.0, device=DEVICE, requires_grad=True)
    bias = torch.tensor(-4.0, device=DEVICE, requires_grad=True)
    run_case(lambda i, t, s, b: mmfast.ops.siglip_loss(i, t, s, b, positive_offset=offset, backend=backend),
             lambda i, t, s, b, dtype: reference.siglip_loss(i, t, s, b, positive_offset=offset, dtype=dtype),
             [image, text, scale, bias], torch.float32, f"siglip offset {offset}")


@pytest.mark.parametrize("columns", [True, False], ids=["rows+columns", "rows"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_similarity_logsumexp_rectangular(backend, columns):
    a = features(37, 64, torch.float32, seed=7, normalize=False)
    b = features(37, 64, torch.float32, seed=8, rows=90, normalize=False)
    scale = torch.tensor(3.0, device=DEVICE, requires_grad=True)
    row, col = mmfast.ops.similarity_logsumexp(a, b, scale, columns=columns, backend=backend)
    weights_row = torch.linspace(-1, 1, 37, device=DEVICE)
    weights_col = torch.linspace(2, -1, 90, device=DEVICE)
    objective = (row * weights_row).sum() + ((col * weights_col).sum() if columns else 0)
    grads = gradients(objective, [a, b, scale])

    exact_inputs = [x.detach().double().requires_grad_() for x in (a, b, scale)]
    exact_row, exact_col = reference.similarity_logsumexp(*exact_inputs, dtype=torch.float64)
    exact_objective = (exact_row * weights_row.double()).sum()
    if columns:
        exact_objective = exact_objective + (exact_col * weights_col.double()).sum()
        torch.testing.assert_close(col.double(), exact_col.detach(), rtol=1e-5, atol=1e-5)
    else:
        assert col.numel() == 0
    torch.testing.assert_close(row.double(), exact_row.detach(), rtol=1e-5, atol=1e-5)
    for grad, exact_grad in zip(grads, gradients(exact_objective, exact_inputs)):
        torch.testing.assert_close(grad.double(), exact_grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("path", ["fused", "chunks"])
def test_both_triton_backward_paths(monkeypatch, path):
    """D <= 256 takes the fused backward, wider D the dLogits-chunks one; force each on one shape,
    with chunks small enough that rows and columns each take several."""
    from mmfast.ops.contrastive import triton as kernels

    monkeypatch.setattr(kernels, "FUSED_BACKWARD_MAX_D", 1024 if path == "fused" else 0)
    monkeypatch.setattr(kernels, "DS_CHUNK_ELEMENTS", 64 * 100)
    image, text = features(300, 40, torch.float16, seed=19), features(300, 40, torch.float16, seed=20)
    scale = torch.tensor(14.3, device=DEVICE, requires_grad=True)
    bias = torch.tensor(-10.0, device=DEVICE, requires_grad=True)
    run_case(lambda i, t, s: mmfast.ops.clip_loss(i, t, s, backend="triton"),
             reference.clip_loss, [image, text, scale], torch.float16, f"clip {path}")
    run_case(lambda i, t, s, b: mmfast.ops.siglip_loss(i, t, s, b, backend="triton"),
             reference.siglip_loss, [image, text, scale, bias], torch.float16, f"siglip {path}")


def test_fp16_gradients_do_not_underflow_at_large_n():
    """dLoss/dLogits ~ 1 / N^2 is below fp16's range at N = 1,500; the kernels scale it first."""
    image, text = features(1500, 16, torch.float16, seed=21), features(1500, 16, torch.float16, seed=22)
    scale = torch.tensor(5.0, device=DEVICE, requires_grad=True)
    run_case(lambda i, t, s: mmfast.ops.clip_loss(i, t, s, backend="triton"),
             reference.clip_loss, [image, text, scale], torch.float16, "clip fp16 N=1500")


def test_large_unnormalized_logits_stay_finite():
    """Logits near 1e3 would overflow a naive exp; both paths must keep the shift."""
    image = features(50, 40, torch.float32, seed=9) * 30
    text = features(50, 40, torch.float32, seed=10) * 30
    for backend in BACKENDS:
        loss = mmfast.ops.clip_loss(image, text, 1.0, backend=backend)
        expected = reference.clip_loss(image.double(), text.double(), torch.tensor(1.0, dtype=torch.float64),
                                       dtype=torch.float64)
        assert torch.isfinite(loss)
        torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-4)


def test_triton_backward_is_deterministic():
    image, text = features(70, 64, torch.float32, seed=11), features(70, 64, torch.float32, seed=12)
    scale = torch.tensor(5.0, device=DEVICE, requires_grad=True)
    first = gradients(mmfast.ops.clip_loss(image, text, scale, backend="triton"), [image, text, scale])
    second = gradients(mmfast.ops.clip_loss(image, text, scale, backend="triton"), [image, text, scale])
    for x, y in zip(first, second):
        assert torch.equal(x, y)


def test_bf16_through_interpreter_matches_reference():
    """bf16 is upcast right after loading in the interpreter; the GPU path is checked under `cuda`."""
    image, text = features(33, 40, torch.bfloat16, seed=13), features(33, 40, torch.bfloat16, seed=14)
    scale = torch.tensor(14.3, device=DEVICE, requires_grad=True)
    run_case(lambda i, t, s: mmfast.ops.clip_loss(i, t, s, backend="triton"),
             reference.clip_loss, [image, text, scale], torch.bfloat16, "clip bf16")


@pytest.mark.cuda
@pytest.mark.parametrize("n,d", [(1, 40), (300, 768), (4097, 512)], ids=["N1-D40", "N300-D768", "N4097-D512"])
def test_bf16_on_gpu(n, d):
    image, text = features(n, d, torch.bfloat16, seed=15), features(n, d, torch.bfloat16, seed=16)
    scale = torch.tensor(14.3, device="cuda", requires_grad=True)
    bias = torch.tensor(-10.0, device="cuda", requires_grad=True)
    run_case(lambda i, t, s: mmfast.ops.clip_loss(i, t, s, backend="triton"),
             reference.clip_loss, [image, text, scale], torch.bfloat16, "clip bf16 gpu")
    run_case(lambda i, t, s, b: mmfast.ops.siglip_loss(i, t, s, b, backend="triton"),
             reference.siglip_loss, [image, text, scale, bias], torch.bfloat16, "siglip bf16 gpu")


@pytest.mark.cuda
def test_large_batch_memory_on_gpu():
    """N = 65,536 at D = 768: the materialized logits alone would take 16 GiB."""
    n, d = 65536, 768
    image = torch.nn.functional.normalize(torch.randn(n, d, device="cuda"), dim=1).bfloat16().requires_grad_()
    text = torch.nn.functional.normalize(torch.randn(n, d, device="cuda"), dim=1).bfloat16().requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    mmfast.ops.clip_loss(image, text, 100.0, backend="triton").backward()
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before < 2**30


# --- parity with open_clip -------------------------------------------------------------------


@pytest.mark.parametrize("n,d", [(7, 40), (300, 64)], ids=["N7-D40", "N300-D64"])
def test_parity_with_open_clip(n, d):
    open_clip_loss = pytest.importorskip("open_clip.loss")
    image, text = features(n, d, torch.float32, seed=17), features(n, d, torch.float32, seed=18)
    scale = torch.tensor(20.0, device=DEVICE, requires_grad=True)
    bias = torch.tensor(-8.0, device=DEVICE, requires_grad=True)
    pairs = [
        (mmfast.nn.ClipLoss(), open_clip_loss.ClipLoss(), (image, text, scale)),
        (mmfast.nn.SigLipLoss(), open_clip_loss.SigLipLoss(), (image, text, scale, bias)),
    ]
    for ours, theirs, inputs in pairs:
        our_loss = ours(*inputs, output_dict=True)["contrastive_loss"]
        their_loss = theirs(*inputs, output_dict=True)["contrastive_loss"]
        torch.testing.assert_close(our_loss, their_loss, rtol=1e-5, atol=1e-6)
        for ours_grad, theirs_grad in zip(gradients(our_loss, inputs), gradients(their_loss, inputs)):
            torch.testing.assert_close(ours_grad, theirs_grad, rtol=1e-4, atol=1e-6)


# --- bad inputs --------------------------------------------------------------------------------


def _bad_input_cases():
    good = torch.randn(4, 8)
    return [
        ("mismatched N", (good, torch.randn(5, 8)), ValueError, "same number of rows"),
        ("mismatched D", (good, torch.randn(4, 9)), ValueError, "same feature size D"),
        ("1-D features", (torch.randn(8), good), ValueError, "image_features must be 2-D"),
        ("3-D features", (good, torch.randn(4, 8, 1)), ValueError, "text_features must be 2-D"),
        ("integer dtype", (good.long(), good), TypeError, "image_features must be float32"),
        ("dtype mismatch", (good, good.half()), TypeError, "one dtype"),
        ("not a tensor", (good.tolist(), good), TypeError, "image_features must be a torch.Tensor"),
        ("empty", (torch.randn(0, 8), torch.randn(0, 8)), ValueError, "at least one row"),
        ("device mismatch", (good, good.to("meta")), ValueError, "one device"),
    ]


@pytest.mark.parametrize("case", _bad_input_cases(), ids=lambda c: c[0])
def test_bad_features_raise_clear_errors(case):
    _, (image, text), error, message = case
    with pytest.raises(error, match=message):
        mmfast.ops.clip_loss(image, text, 1.0)


def test_bad_scale_and_bias_raise_clear_errors():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="logit_scale must have one element"):
        mmfast.ops.clip_loss(x, x, torch.ones(2))
    with pytest.raises(TypeError, match="logit_scale must be a float tensor"):
        mmfast.ops.clip_loss(x, x, torch.ones((), dtype=torch.long))
    with pytest.raises(ValueError, match="logit_bias must have one element"):
        mmfast.ops.siglip_loss(x, x, 1.0, torch.zeros(3))
    with pytest.raises(ValueError, match="logit_scale must be on cpu"):
        mmfast.ops.siglip_loss(x, x, torch.ones((), device="meta"), 0.0)
    with pytest.raises(TypeError, match="positive_offset must be an int or None"):
        mmfast.ops.siglip_loss(x, x, 1.0, 0.0, positive_offset=1.5)


# --- memory of the CPU path ----------------------------------------------------------------------

_MEMORY_PROBE = """
import json, sys, torch, mmfast
from mmfast.ops.contrastive import chunked

def status_kib(field):  # VmRSS: resident now; VmHWM: peak of this process (ru_maxrss counts the parent's)
    return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1])

def run(n, d=8):
    image = torch.nn.functional.normalize(torch.randn(n, d), dim=1).requires_grad_()
    text = torch.nn.functional.normalize(torch.randn(n, d), dim=1).requires_grad_()
    extra = [10.0, -10.0] if sys.argv[1] == "siglip_loss" else [10.0]
    getattr(mmfast.ops, sys.argv[1])(image, text, *extra, backend="reference").backward()

chunked.CHUNK_ELEMENTS = 1 << 20
run(2048)  # one-time runtime buffers (thread pools, allocator) are not the op's memory
with open("/proc/self/clear_refs", "w") as handle:
    handle.write("5")  # resets VmHWM
before = status_kib("VmRSS")
run(16384)
print(json.dumps({"grown_kib": status_kib("VmHWM") - before, "logits_kib": 16384 * 16384 * 4 // 1024}))
"""


@pytest.mark.parametrize("op", ["clip_loss", "siglip_loss"])
def test_cpu_path_memory_stays_far_below_n_squared(op):
    """N = 16,384: the logits alone would be 1 GiB; with 4 MiB chunks the path must stay far below."""
    result = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, op], capture_output=True, text=True, check=True)
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["grown_kib"] < measured["logits_kib"] / 8, measured


@pytest.mark.parametrize("device", [pytest.param("cpu", id="cpu"),
                                    pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)])
def test_losses_stay_float32_under_autocast(device):
    """open_clip trains under bf16 autocast: the losses must not run their matmuls in bf16 again."""
    generator = torch.Generator().manual_seed(21)
    same = torch.nn.functional.normalize(torch.randn(1, 512, generator=generator), dim=1).expand(4, 512).to(device)
    image = torch.nn.functional.normalize(torch.randn(9, 40, generator=generator), dim=1).to(device)
    text = torch.nn.functional.normalize(torch.randn(9, 40, generator=generator), dim=1).to(device)
    for module, extra in ((mmfast.nn.ClipLoss(), []), (mmfast.nn.SigLipLoss(), [-10.0])):
        for a, b in ((same, same.clone()), (image, text)):
            results = []
            for enabled in (False, True):
                leaves = [a.clone().requires_grad_(), b.clone().requires_grad_(),
                          torch.tensor(14.3, device=device, requires_grad=True),
                          *[torch.tensor(value, device=device, requires_grad=True) for value in extra]]
                with torch.autocast(device, dtype=torch.bfloat16, enabled=enabled):
                    loss = module(*leaves)
                loss.backward()
                results.append([loss.detach()] + [leaf.grad for leaf in leaves])
            for plain, autocast in zip(*results):
                torch.testing.assert_close(autocast, plain, rtol=1e-6, atol=1e-7)
    # identical features: every logit equal, the CLIP loss is ln N and the scale has no gradient
    scale = torch.tensor(14.3, device=device, requires_grad=True)
    with torch.autocast(device, dtype=torch.bfloat16):
        loss = mmfast.nn.ClipLoss()(same, same.clone(), scale)
    loss.backward()
    # (float32 rounding of the dot products: about 1e-5; bf16 matmuls gave 7e-3 and a gradient of -7e-3)
    assert loss.item() == pytest.approx(math.log(4), abs=2e-5) and abs(scale.grad.item()) < 1e-4


def test_open_clip_methods_and_arguments():
    """get_logits, get_ground_truth, SigLipLoss(chunk_size=...) and SigLipLoss._loss(negative_only=...),
    which open_clip's users, subclasses and tests call, give open_clip's values."""
    open_clip_loss = pytest.importorskip("open_clip.loss")
    generator = torch.Generator().manual_seed(23)
    image = torch.nn.functional.normalize(torch.randn(7, 24, generator=generator), dim=1)
    text = torch.nn.functional.normalize(torch.randn(7, 24, generator=generator), dim=1)
    scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
    ours, theirs = mmfast.nn.ClipLoss(), open_clip_loss.ClipLoss()
    for mine, expected in zip(ours.get_logits(image, text, scale), theirs.get_logits(image, text, scale)):
        torch.testing.assert_close(mine, expected)
    assert torch.equal(ours.get_ground_truth("cpu", 7), theirs.get_ground_truth("cpu", 7))
    theirs_siglip = open_clip_loss.SigLipLoss()
    for chunk_size in (0, 1, 3, 64):
        ours_siglip = mmfast.nn.SigLipLoss(chunk_size=chunk_size)
        torch.testing.assert_close(ours_siglip.get_logits(image, text, scale, bias),
                                   theirs_siglip.get_logits(image, text, scale, bias))
        for negative_only in (False, True):
            assert torch.equal(ours_siglip.get_ground_truth("cpu", torch.float32, 7, negative_only),
                               theirs_siglip.get_ground_truth("cpu", torch.float32, 7, negative_only))
            torch.testing.assert_close(ours_siglip._loss(image, text, scale, bias, negative_only=negative_only),
                                       theirs_siglip._loss(image, text, scale, bias, negative_only=negative_only),
                                       rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="chunk_size must be >= 0, got -1"):
        mmfast.nn.SigLipLoss(chunk_size=-1)
