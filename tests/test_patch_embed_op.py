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
                             mean, 1 / std, in_scale, geometry, dtype=dtype)


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
