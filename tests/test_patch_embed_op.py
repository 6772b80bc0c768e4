"""mmfast.ops.patch_embed against a float64 reference (Conv2d/Conv3d on normalized pixels), every
gradient, both backends, odd geometries; bad inputs."""
import pytest
import torch

import mmfast
from mmfast.ops.patch_embed import PatchGeometry, patch_grid, reference
from tests.conftest import DEVICE
from tests.tolerance import assert_within_reference_error

BACKENDS = ["triton", "reference"]
CLIP_MEAN, CLIP_STD = (0.481, 0.458, 0.408), (0.269, 0.261, 0.276)


def _generator(seed):
    return torch.Generator().manual_seed(seed)


def make_case(shape, patch, channels, embed, *, video=False, uint8=True, dtype=torch.float32, seed=0,
              prefix=0, pos="patches", stride=None, dynamic_pad=False, normalize=True):
    """Pixels, parameters and keyword arguments for one op call; leaves are the float tensors."""
    g = _generator(seed)
    pixel_shape = (shape[0], channels, *shape[1:])
    leaf = lambda t: t.to(DEVICE, dtype).requires_grad_()  # noqa: E731  (drawn on the CPU: same values anywhere)
    if uint8:
        pixels = torch.randint(0, 256, pixel_shape, generator=g, dtype=torch.uint8).to(DEVICE)
    else:
        pixels = torch.randn(pixel_shape, generator=g).to(DEVICE).requires_grad_()
    kernel = patch if isinstance(patch, tuple) else ((2, patch, patch) if video else (patch, patch))
    weight = leaf(torch.randn(embed, channels, *kernel, generator=g) / (channels * patch * patch) ** 0.5)
    bias = leaf(torch.randn(embed, generator=g))
    kwargs = {"stride": stride, "dynamic_pad": dynamic_pad}
    if normalize and channels == 3:
        kwargs.update(mean=CLIP_MEAN, std=CLIP_STD)
    elif normalize:
        kwargs.update(mean=[0.5] * channels, std=[0.25] * channels)
    # geometry, to size the position table
    full_kernel = kernel if video else (1, *kernel)
    size = pixel_shape[2:] if video else (1, *pixel_shape[2:])
    strides = (stride,) * len(kernel) if isinstance(stride, int) else (stride or kernel)
    strides = strides if video else (1, *strides)
    _, grid = patch_grid(size, full_kernel, strides, dynamic_pad)
    patches = grid[0] * grid[1] * grid[2]
    if prefix:
        kwargs["cls_token"] = leaf(torch.randn(1, prefix, embed, generator=g))
    if pos:
        rows = patches + (prefix if pos == "all" else 0)
        kwargs["pos_embed"] = leaf(torch.randn(1, rows, embed, generator=g))
    return pixels, weight, bias, kwargs


def _leaves(pixels, weight, bias, kwargs):
    leaves = [pixels] if pixels.is_floating_point() else []
    return leaves + [weight, bias] + [kwargs[k] for k in ("pos_embed", "cls_token") if kwargs.get(k) is not None]


def _with(leaves, inputs, dtype):
    """The same call with every leaf replaced by a copy in `dtype` (pixels keep uint8)."""
    pixels, weight, bias, kwargs = inputs
    copies = {id(leaf): leaf.detach().to(dtype).requires_grad_() for leaf in leaves}
    swap = lambda t: copies.get(id(t), t)  # noqa: E731
    new_kwargs = {k: swap(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    new = (swap(pixels), swap(weight), swap(bias), new_kwargs)
    return new, [copies[id(leaf)] for leaf in leaves]


def reference_call(inputs, dtype):
    """The op's math in `dtype` through reference.forward (plain Conv2d/Conv3d)."""
    pixels, weight, bias, kwargs = inputs
    channels_last = kwargs.get("channels_last", False)
    view = pixels.movedim(-1, 1) if channels_last else pixels
    video = view.dim() == 5
    view = view if video else view.unsqueeze(2)
    kernel = tuple(weight.shape[2:]) if video else (1, *weight.shape[2:])
    stride = kwargs.get("stride") or (kernel if video else kernel[1:])
    stride = (stride,) * (3 if video else 2) if isinstance(stride, int) else tuple(stride)
    stride = stride if video else (1, *stride)
    padding, grid = patch_grid(view.shape[2:], kernel, stride, kwargs.get("dynamic_pad", False))
    geometry = PatchGeometry(video, kernel, stride, padding, grid, view.shape[1])
    channels = view.shape[1]
    mean = torch.tensor(kwargs.get("mean") or [0.0] * channels, dtype=torch.float64, device=pixels.device)
    std = torch.tensor(kwargs.get("std") or [1.0] * channels, dtype=torch.float64, device=pixels.device)
    rows = lambda t: None if t is None else t.reshape(-1, t.shape[-1])  # noqa: E731
    in_scale = 1 / 255 if pixels.dtype == torch.uint8 else 1.0
    return reference.forward(view, weight, bias, rows(kwargs.get("pos_embed")), rows(kwargs.get("cls_token")),
                             mean, 1 / std, in_scale, geometry, dtype=dtype, keep=kwargs.get("keep"))


def check_against_reference(inputs, backend, dtype, label):
    pixels, weight, bias, kwargs = inputs
    leaves = _leaves(*inputs)
    out = mmfast.ops.patch_embed(pixels, weight, bias, backend=backend, **kwargs)
    assert out.dtype == weight.dtype
    upstream = torch.randn(out.shape, generator=_generator(99)).to(out.device)
    grads = torch.autograd.grad(out, leaves, upstream.to(out.dtype))
    exact_inputs, exact_leaves = _with(leaves, inputs, torch.float64)
    exact = reference_call(exact_inputs, torch.float64)
    exact_grads = torch.autograd.grad(exact, exact_leaves, upstream.double())
    low_inputs, low_leaves = _with(leaves, inputs, dtype)
    low = reference_call(low_inputs, dtype)
    low_grads = torch.autograd.grad(low, low_leaves, upstream.to(dtype))
    assert_within_reference_error(f"{label} output", out, exact, low, dtype)
    names = (["d_pixels"] if pixels.is_floating_point() else []) + ["d_weight", "d_bias", "d_pos", "d_cls"]
    for name, grad, exact_grad, low_grad, leaf in zip(names, grads, exact_grads, low_grads, leaves):
        assert grad.shape == leaf.shape, f"{label} {name}: {tuple(grad.shape)} != {tuple(leaf.shape)}"
        assert_within_reference_error(f"{label} {name}", grad, exact_grad, low_grad, dtype)


IMAGE_CASES = [
    pytest.param(dict(shape=(2, 56, 42), patch=14, channels=3, embed=40, prefix=1, pos="all"), id="p14-C3-56x42-cls"),
    pytest.param(dict(shape=(1, 32, 48), patch=16, channels=1, embed=24), id="p16-C1-B1-32x48"),
    pytest.param(dict(shape=(3, 64, 96), patch=32, channels=4, embed=33, prefix=1, pos="patches"),
                 id="p32-C4-64x96-cls-nopos"),
    pytest.param(dict(shape=(2, 30, 44), patch=14, channels=3, embed=40, dynamic_pad=True, uint8=False),
                 id="p14-float-dynamicpad"),
    pytest.param(dict(shape=(2, 40, 60), patch=16, channels=1, embed=24, stride=10, prefix=2, pos="all",
                      uint8=False), id="ast-stride10-2tokens"),
    pytest.param(dict(shape=(2, 4, 32, 48), patch=16, channels=3, embed=40, video=True), id="video-2x16x16"),
    pytest.param(dict(shape=(1, 5, 32, 32), patch=16, channels=3, embed=24, video=True, uint8=False,
                      dynamic_pad=True), id="video-float-padded"),
]


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", IMAGE_CASES)
def test_matches_reference(case, backend, dtype):
    check_against_reference(make_case(**case, dtype=dtype), backend, dtype, f"{backend}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("uint8", [True, False], ids=["uint8", "float"])
def test_channels_last_equals_channels_first(backend, uint8):
    pixels, weight, bias, kwargs = make_case((2, 28, 42), 14, 3, 40, uint8=uint8, prefix=1, pos="all")
    first = mmfast.ops.patch_embed(pixels, weight, bias, backend=backend, **kwargs)
    nhwc = pixels.detach().permute(0, 2, 3, 1).contiguous()
    last = mmfast.ops.patch_embed(nhwc, weight, bias, channels_last=True, backend=backend, **kwargs)
    torch.testing.assert_close(last, first, rtol=1e-5, atol=1e-5)
    check_against_reference((nhwc.requires_grad_() if not uint8 else nhwc, weight, bias,
                             dict(kwargs, channels_last=True)), backend, torch.float32, "nhwc")


def test_bf16_through_interpreter():
    check_against_reference(make_case((2, 28, 28), 14, 3, 40, dtype=torch.bfloat16, prefix=1, pos="all"),
                            "triton", torch.bfloat16, "bf16")


@pytest.mark.cuda
@pytest.mark.parametrize("case", IMAGE_CASES)
def test_bf16_on_gpu(case):
    check_against_reference(make_case(**case, dtype=torch.bfloat16), "triton", torch.bfloat16, "gpu bf16")


# --- kept patches (masked autoencoders) --------------------------------------------------------------

KEEP_CASES = [
    pytest.param(dict(shape=(3, 56, 42), patch=14, channels=3, embed=40, prefix=1, pos="all"), 3, id="image-cls"),
    pytest.param(dict(shape=(2, 40, 60), patch=16, channels=1, embed=24, stride=10, prefix=2, pos="all",
                      uint8=False), 5, id="ast-overlap-float"),
    pytest.param(dict(shape=(2, 4, 32, 48), patch=16, channels=3, embed=40, video=True), 2, id="video-tubelets"),
]


def _random_keep(batch: int, patches: int, kept: int, seed: int = 3) -> torch.Tensor:
    """MAE's draw: each sample's own random subset, in random order."""
    noise = torch.rand(batch, patches, generator=_generator(seed))
    return noise.argsort(dim=1)[:, :kept].to(DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case, kept", KEEP_CASES)
def test_kept_patches_match_reference_forward_and_backward(case, kept, backend):
    pixels, weight, bias, kwargs = make_case(**case)
    full = mmfast.ops.patch_embed(pixels, weight, bias, backend="reference", **kwargs)
    prefix = 0 if kwargs.get("cls_token") is None else kwargs["cls_token"].shape[1]
    kwargs["keep"] = _random_keep(pixels.shape[0], full.shape[1] - prefix, kept)
    check_against_reference((pixels, weight, bias, kwargs), backend, torch.float32, f"{backend} keep")
    # the kept rows are the full embedding's rows at those places, in keep's order
    out = mmfast.ops.patch_embed(pixels, weight, bias, backend=backend, **kwargs)
    assert out.shape == (pixels.shape[0], prefix + kept, weight.shape[0])
    index = (kwargs["keep"] + prefix)[..., None].expand(-1, -1, full.shape[2])
    torch.testing.assert_close(out[:, prefix:], full.gather(1, index), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[:, :prefix], full[:, :prefix])


@pytest.mark.cuda
@pytest.mark.parametrize("case, kept", KEEP_CASES)
def test_kept_patches_bf16_on_gpu(case, kept):
    pixels, weight, bias, kwargs = make_case(**case, dtype=torch.bfloat16)
    prefix = 0 if kwargs.get("cls_token") is None else kwargs["cls_token"].shape[1]
    patches = mmfast.ops.patch_embed(pixels, weight, bias, backend="reference", **kwargs).shape[1] - prefix
    kwargs["keep"] = _random_keep(pixels.shape[0], patches, kept)
    check_against_reference((pixels, weight, bias, kwargs), "triton", torch.bfloat16, "gpu bf16 keep")


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_patches_are_never_read(backend):
    """NaN in every masked patch: nothing of it reaches the output or any gradient."""
    pixels, weight, bias, kwargs = make_case((2, 42, 56), 14, 3, 24, uint8=False, prefix=1, pos="all")
    keep = _random_keep(2, 12, 4)
    poisoned = pixels.detach().clone()
    for sample in range(2):
        for patch in set(range(12)) - set(keep[sample].tolist()):
            row, column = divmod(patch, 4)
            poisoned[sample, :, row * 14:(row + 1) * 14, column * 14:(column + 1) * 14] = float("nan")
    poisoned.requires_grad_()
    out = mmfast.ops.patch_embed(poisoned, weight, bias, keep=keep, backend=backend, **kwargs)
    clean = mmfast.ops.patch_embed(pixels.detach(), weight, bias, keep=keep, backend=backend, **kwargs)
    torch.testing.assert_close(out, clean)
    grads = torch.autograd.grad(out.square().sum(), [poisoned, weight, kwargs["pos_embed"]])
    assert all(bool(grad.isfinite().all()) for grad in grads)
    assert float(grads[2][0, 1:][keep[0].cpu()].abs().sum()) > 0  # kept places get their positions' gradient


def test_bad_keep_raises_clear_errors():
    pixels = torch.randint(0, 256, (2, 3, 28, 28), dtype=torch.uint8)
    weight = torch.randn(8, 3, 14, 14)
    call = mmfast.ops.patch_embed
    with pytest.raises(TypeError, match="keep must be an int32 or int64 tensor of patch indices, got torch.float32"):
        call(pixels, weight, keep=torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"keep must be \[B=2, K\] with 1 <= K <= 4 .* got shape \(3, 2\)"):
        call(pixels, weight, keep=torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"keep must be \[B=2, K\] .* got shape \(2, 5\)"):
        call(pixels, weight, keep=torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"keep indices must lie in \[0, 4\), got values from 0 to 4"):
        call(pixels, weight, keep=torch.tensor([[0, 1], [2, 4]]))


# --- bad inputs --------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    pixels = torch.randint(0, 256, (2, 3, 28, 28), dtype=torch.uint8)
    weight = torch.randn(8, 3, 14, 14)
    call = mmfast.ops.patch_embed
    with pytest.raises(ValueError, match="pixels have 4 channels but weight expects 3"):
        call(torch.zeros(2, 4, 28, 28), weight)
    with pytest.raises(ValueError, match=r"mean must have one value per channel \(3\), got 2"):
        call(pixels, weight, mean=(0.5, 0.5))
    with pytest.raises(ValueError, match=r"std must have one value per channel \(3\), got 4"):
        call(pixels, weight, std=[0.2] * 4)
    with pytest.raises(ValueError, match=r"weight must be the Conv2d layout .* got shape \(8, 3, 14\)"):
        call(pixels, torch.randn(8, 3, 14))
    with pytest.raises(ValueError, match="weight must be the Conv3d layout"):
        call(torch.zeros(1, 3, 2, 28, 28), weight)
    with pytest.raises(TypeError, match="pixels must be uint8 or float"):
        call(pixels.int(), weight)
    with pytest.raises(ValueError, match="pixels must be 4-D images or 5-D video"):
        call(torch.zeros(3, 28, 28), weight)
    with pytest.raises(ValueError, match="smaller than the patch"):
        call(torch.zeros(1, 3, 10, 28), weight)
    with pytest.raises(ValueError, match=r"pos_embed must have 4 or 5 rows .* got 7"):
        call(pixels, weight, pos_embed=torch.zeros(1, 7, 8), cls_token=torch.zeros(8))
    with pytest.raises(ValueError, match=r"bias must be \[8\]"):
        call(pixels, weight, torch.zeros(9))
    with pytest.raises(ValueError, match="stride must be a positive int"):
        call(pixels, weight, stride=0)
    with pytest.raises(RuntimeError, match="only Tensors of floating point"):
        pixels.requires_grad_()  # torch itself refuses a gradient on uint8 pixels
