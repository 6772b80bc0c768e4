"""mmfast.ops.linear_cross_entropy against a float64 F.cross_entropy(hidden @ weight.T) and the
low-precision reference's own error, options (bias, smoothing, softcap, reductions, ignored
labels), PyTorch's behavior where every label is ignored, a frozen head, bad inputs; GPU memory
at a large vocabulary."""
import pytest
import torch
import torch.nn.functional as F

import mmfast
from mmfast.ops.linear_cross_entropy import reference
from tests.conftest import DEVICE, HAS_CUDA
from tests.tolerance import assert_within_reference_error

BACKENDS = ["triton", "reference"]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]
SHAPES = [(t, v, d) for t, v in ((1, 1), (1, 32000), (7, 129), (7, 32000), (1000, 1), (1000, 129)) for d in (40, 64)]
# Triton's interpreter pays per tile: two of its large-vocabulary cases (about 15 s each) are enough
CASES = [pytest.param(t, v, d, backend, id=f"T{t}-V{v}-D{d}-{backend}") for t, v, d in SHAPES for backend in BACKENDS
         if backend == "reference" or v < 32000 or (t, d) in ((7, 40), (1, 64))]
LARGE = [pytest.param(1000, 32000, 64, id="T1000-V32000-D64")]


def inputs(t, v, d, dtype, seed=0, bias=False, ignore_every=3):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(t, d, generator=generator, dtype=torch.float64)
    weight = torch.randn(v, d, generator=generator, dtype=torch.float64) * 2 / d ** 0.5  # logits of a few units
    labels = torch.randint(0, v, (t,), generator=generator)
    labels[1::ignore_every] = -100
    tensors = [hidden, weight] + ([torch.randn(v, generator=generator, dtype=torch.float64)] if bias else [])
    return [x.to(DEVICE, dtype).requires_grad_() for x in tensors], labels.to(DEVICE)


def run_case(tensors, labels, dtype, backend, label, **options):
    """Kernel vs float64 reference, the reference in `dtype` setting the tolerance; loss and every gradient."""
    def ours(hidden, weight, bias=None):
        return mmfast.ops.linear_cross_entropy(hidden, weight, labels, bias=bias, backend=backend, **options)

    def theirs(dtype_of):
        def function(hidden, weight, bias=None):
            return reference.linear_cross_entropy(hidden, weight, labels, bias, dtype=dtype_of, **options)
        return function

    loss = ours(*tensors)
    upstream = torch.randn(loss.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64).to(DEVICE)
    grads = torch.autograd.grad(loss, tensors, upstream.to(loss.dtype))
    results = []
    for dtype_of, cast in ((torch.float64, torch.float64), (dtype, None)):
        copies = [x.detach().to(cast or x.dtype).requires_grad_() for x in tensors]
        value = theirs(dtype_of)(*copies)
        results.append((value, torch.autograd.grad(value, copies, upstream.to(value.dtype))))
    (exact, exact_grads), (low, low_grads) = results
    assert loss.dtype == torch.float32
    assert_within_reference_error(f"{label} loss", loss, exact, low, dtype)
    for name, grad, exact_grad, low_grad, tensor in zip(("d_hidden", "d_weight", "d_bias"), grads, exact_grads,
                                                        low_grads, tensors):
        assert grad.dtype == tensor.dtype, name
        assert_within_reference_error(f"{label} {name}", grad, exact_grad, low_grad, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,v,d,backend", CASES)
def test_matches_reference(t, v, d, backend, dtype):
    tensors, labels = inputs(t, v, d, dtype)
    run_case(tensors, labels, dtype, backend, f"{backend} T{t} V{v} D{d}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,v,d", LARGE)
def test_matches_reference_large_vocabulary(t, v, d, dtype):
    tensors, labels = inputs(t, v, d, dtype, seed=1)
    run_case(tensors, labels, dtype, "reference", f"T{t} V{v} D{d}")


OPTIONS = [
    pytest.param(dict(label_smoothing=0.1), False, id="smoothing"),
    pytest.param(dict(logit_softcap=2.0), False, id="softcap"),
    pytest.param(dict(label_smoothing=0.2, logit_softcap=3.0, reduction="sum"), True, id="all-sum-bias"),
    pytest.param(dict(reduction="none"), True, id="none-bias"),
    pytest.param(dict(reduction="none", ignore_index=5), False, id="none-ignore5"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options,bias", OPTIONS)
def test_options_match_reference(options, bias, backend, dtype):
    tensors, labels = inputs(37, 131, 40, dtype, seed=2, bias=bias)
    if options.get("ignore_index") == 5:
        labels[labels == -100] = 5
    run_case(tensors, labels, dtype, backend, f"{backend} {options}", **options)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_label_ignored_behaves_as_pytorch(backend):
    (hidden, weight), labels = inputs(5, 33, 40, torch.float32)
    labels = torch.full_like(labels, -100)
    mean = mmfast.ops.linear_cross_entropy(hidden, weight, labels, backend=backend)
    assert torch.isnan(mean) and torch.isnan(F.cross_entropy(hidden @ weight.T, labels))
    total = mmfast.ops.linear_cross_entropy(hidden, weight, labels, reduction="sum", backend=backend)
    d_hidden, d_weight = torch.autograd.grad(total, [hidden, weight])
    assert total.item() == 0.0 and not d_hidden.any() and not d_weight.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dimensions_int32_labels_and_frozen_head(backend):
    """[B, T, D] hidden states as a language model gives them, int32 labels, and a frozen output head
    (LLaVA's stage 1): the hidden states still get their gradient, the head none."""
    (hidden, weight), labels = inputs(24, 50, 40, torch.float32, seed=3)
    weight.requires_grad_(False)
    hidden3 = hidden.detach().view(2, 12, 40).requires_grad_()
    losses = mmfast.ops.linear_cross_entropy(hidden3, weight, labels.view(2, 12).int(), reduction="none",
                                             backend=backend)
    assert losses.shape == (2, 12)
    expected = F.cross_entropy(hidden.detach() @ weight.T, labels, reduction="none")
    torch.testing.assert_close(losses.flatten(), expected, rtol=1e-5, atol=1e-5)
    losses.sum().backward()
    plain = hidden.detach().requires_grad_()
    F.cross_entropy(plain @ weight.T, labels, reduction="sum").backward()
    torch.testing.assert_close(hidden3.grad.view(24, 40), plain.grad, rtol=1e-5, atol=1e-5)
    assert weight.grad is None


def test_module_matches_functional():
    (hidden, weight), labels = inputs(9, 17, 40, torch.float32, seed=4)
    head = mmfast.nn.LinearCrossEntropy(40, 17, bias=True, label_smoothing=0.1)
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.uniform_(-1, 1)
    expected = F.cross_entropy(hidden @ weight.T + head.bias, labels, label_smoothing=0.1)
    torch.testing.assert_close(head(hidden, labels), expected, rtol=1e-5, atol=1e-6)
    assert head(hidden, None).shape == (9, 17)  # no labels: the logits, for generation


def test_module_under_autocast_computes_in_its_dtype_as_nn_linear():
    """Inside bf16 autocast the head takes hidden states of any dtype (bf16 from a Linear, float32 from a
    norm) and computes in bf16, as nn.Linear then does: the same loss as F.cross_entropy of its logits."""
    (hidden, weight), labels = inputs(9, 17, 40, torch.float32, seed=5)
    head = mmfast.nn.LinearCrossEntropy(40, 17, bias=True, reduction="none").to(DEVICE)
    with torch.no_grad():
        head.weight.copy_(weight)
    with torch.autocast(hidden.device.type, dtype=torch.bfloat16):
        logits = head(hidden, None)
        assert logits.dtype == torch.bfloat16
        expected = F.cross_entropy(logits.float(), labels, reduction="none")
        for given in (hidden, hidden.bfloat16()):
            losses = head(given, labels)
            losses.sum().backward()
            torch.testing.assert_close(losses.float(), expected, rtol=0.02, atol=0.02)
    assert head.weight.grad is not None and head.weight.grad.dtype == torch.float32


BAD = [
    pytest.param(lambda h, w, y: dict(hidden=h[:, :-1]), ValueError, "weight must be \\[V, D\\]", id="D"),
    pytest.param(lambda h, w, y: dict(weight=w.double()), TypeError, "weight must have hidden's dtype", id="dtype"),
    pytest.param(lambda h, w, y: dict(labels=y[:-1]), ValueError, "labels must be", id="labels-shape"),
    pytest.param(lambda h, w, y: dict(labels=y.float()), ValueError, "int64 or int32", id="labels-dtype"),
    pytest.param(lambda h, w, y: dict(labels=torch.full_like(y, 33)), ValueError, "got 33", id="label-range"),
    pytest.param(lambda h, w, y: dict(reduction="avg"), ValueError, "reduction must be one of", id="reduction"),
    pytest.param(lambda h, w, y: dict(label_smoothing=1.5), ValueError, "label_smoothing", id="smoothing"),
    pytest.param(lambda h, w, y: dict(logit_softcap=0.0), ValueError, "logit_softcap", id="softcap"),
    pytest.param(lambda h, w, y: dict(bias=torch.zeros(5)), ValueError, "bias must be a \\[33\\]", id="bias"),
    pytest.param(lambda h, w, y: dict(hidden=h.long()), TypeError, "hidden must be", id="hidden-int"),
]


@pytest.mark.parametrize("change,error,message", BAD)
def test_bad_input_is_named(change, error, message):
    (hidden, weight), labels = inputs(5, 33, 40, torch.float32)
    arguments = dict(hidden=hidden, weight=weight, labels=labels)
    arguments.update(change(hidden, weight, labels))
    with pytest.raises(error, match=message):
        mmfast.ops.linear_cross_entropy(arguments.pop("hidden"), arguments.pop("weight"), arguments.pop("labels"),
                                        **arguments)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_large_vocabulary_memory_on_gpu():
    """T = 8,192, V = 128,256, D = 2,048 in bf16: the logits alone would take 2 GiB (4 in fp32)."""
    t, v, d = 8192, 128256, 2048
    hidden = torch.randn(t, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(v, d, device="cuda") / d ** 0.5).bfloat16().requires_grad_()
    labels = torch.randint(0, v, (t,), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    mmfast.ops.linear_cross_entropy(hidden, weight, labels, backend="triton").backward()
    torch.cuda.synchronize()
    gradients = (t + v) * d * 2
    assert torch.cuda.max_memory_allocated() - before < gradients + t * d * 4 + 2**28


def test_caption_lm_loss_through_the_head_equals_the_logits_loss():
    """mmfast's caption language model trains through the fused head: its per-token losses and
    gradients equal F.cross_entropy of the logits its forward returns."""
    from mmfast.models import CaptionLM, CaptionLMConfig
    from mmfast.models.clip import TextConfig

    torch.manual_seed(0)
    model = CaptionLM(CaptionLMConfig(text=TextConfig(vocab_size=97, context_length=12, width=32, layers=1, heads=2)))
    tokens = torch.randint(1, 97, (3, 12))
    tokens[0, 8:] = 0  # padding, ignored
    losses = model(tokens[:, :-1], labels=tokens[:, 1:], ignore_index=0)
    (fused,) = torch.autograd.grad(losses.sum(), [model.head.weight])
    logits = model(tokens[:, :-1])
    expected = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), ignore_index=0, reduction="none")
    (plain,) = torch.autograd.grad(expected.sum(), [model.head.weight])
    torch.testing.assert_close(losses.flatten(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    assert losses[0, 7:].eq(0).all()


# --- parity with the peers a user switches from -----------------------------------------------


def test_parity_with_liger_kernel():
    """Liger-Kernel's fused linear cross-entropy (its Triton kernels, in the interpreter on a CPU):
    same loss and gradients, with ignored labels and label smoothing."""
    functional = pytest.importorskip("liger_kernel.transformers.functional")
    (hidden, weight), labels = inputs(37, 131, 64, torch.float32, seed=5)
    theirs = functional.liger_fused_linear_cross_entropy(hidden, weight, labels, label_smoothing=0.1)
    ours = mmfast.ops.linear_cross_entropy(hidden, weight, labels, label_smoothing=0.1, backend="triton")
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-5, atol=1e-5)
    for mine, other in zip(torch.autograd.grad(ours, [hidden, weight]), torch.autograd.grad(theirs, [hidden, weight])):
        torch.testing.assert_close(mine, other, rtol=1e-4, atol=1e-6)


def test_parity_with_cut_cross_entropy():
    """Apple's Cut Cross-Entropy (its torch.compile path: its Triton kernel does not run in the
    interpreter): same loss and gradients."""
    cut_cross_entropy = pytest.importorskip("cut_cross_entropy")
    (hidden, weight), labels = inputs(37, 131, 64, torch.float32, seed=6)
    theirs = cut_cross_entropy.linear_cross_entropy(hidden, weight, labels, impl="torch_compile")
    ours = mmfast.ops.linear_cross_entropy(hidden, weight, labels)
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-5, atol=1e-5)
    for mine, other in zip(torch.autograd.grad(ours, [hidden, weight]), torch.autograd.grad(theirs, [hidden, weight])):
        torch.testing.assert_close(mine, other, rtol=1e-4, atol=1e-6)
