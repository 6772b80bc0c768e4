"""mmfast.nn patch embeddings against timm and HF transformers modules built from configs (random
weights copied into ours): outputs and gradients; the swap helper on whole models."""
import pytest
import torch

import mmfast
from mmfast.integrations.patch_embed import swap_patch_embedding
from tests.conftest import DEVICE

timm_layers = pytest.importorskip("timm.layers")
transformers = pytest.importorskip("transformers")
BACKENDS = ["triton", "reference"]


def _on_device(inputs):
    return [x.detach().to(DEVICE).requires_grad_(x.requires_grad) if torch.is_tensor(x) else x for x in inputs]


def assert_same_module_math(ours, theirs, inputs, *, rtol=1e-4, atol=1e-5, theirs_inputs=None):
    """Same state_dict, same outputs, same gradients of every parameter (and float inputs), on DEVICE."""
    ours.load_state_dict(theirs.state_dict())
    ours, theirs = ours.to(DEVICE), theirs.to(DEVICE)
    inputs = _on_device(inputs)
    theirs_inputs = theirs_inputs and _on_device(theirs_inputs)
    ours_out = ours(*inputs)
    theirs_out = theirs(*(theirs_inputs or inputs))
    torch.testing.assert_close(ours_out, theirs_out, rtol=rtol, atol=atol)
    upstream = torch.randn(theirs_out.shape, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    leaves_ours = [p for p in ours.parameters()] + [x for x in inputs if torch.is_tensor(x) and x.requires_grad]
    leaves_theirs = [p for p in theirs.parameters()] + [x for x in (theirs_inputs or inputs)
                                                        if torch.is_tensor(x) and x.requires_grad]
    grads_ours = torch.autograd.grad(ours_out, leaves_ours, upstream, allow_unused=True)
    grads_theirs = torch.autograd.grad(theirs_out, leaves_theirs, upstream, allow_unused=True)
    for mine, expected in zip(grads_ours, grads_theirs):
        if expected is None:
            assert mine is None or not mine.abs().any()
            continue
        torch.testing.assert_close(mine, expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("settings", [
    pytest.param(dict(img_size=28, patch_size=14, in_chans=3, embed_dim=40), id="p14"),
    pytest.param(dict(img_size=(32, 64), patch_size=16, in_chans=1, embed_dim=24, bias=False), id="p16-C1-nobias"),
    pytest.param(dict(img_size=64, patch_size=32, in_chans=4, embed_dim=33, output_fmt="NHWC"), id="p32-C4-NHWC"),
    pytest.param(dict(img_size=28, patch_size=14, in_chans=3, embed_dim=40, flatten=False), id="NCHW"),
    pytest.param(dict(img_size=28, patch_size=14, in_chans=3, embed_dim=40, output_fmt="NCL"), id="NCL"),
    pytest.param(dict(img_size=32, patch_size=16, in_chans=3, embed_dim=24, strict_img_size=False,
                      dynamic_img_pad=True, norm_layer=torch.nn.LayerNorm), id="dynamic-pad-norm"),
])
def test_patch_embed_matches_timm(settings, backend):
    torch.manual_seed(0)
    theirs = timm_layers.PatchEmbed(**settings)
    ours = mmfast.nn.PatchEmbed(**settings, backend=backend)
    size = settings["img_size"] if isinstance(settings["img_size"], tuple) else (settings["img_size"],) * 2
    if settings.get("dynamic_img_pad"):
        size = (size[0] - 5, size[1] + 3)
    x = torch.randn(2, settings["in_chans"], *size, requires_grad=True)
    assert_same_module_math(ours, theirs, [x])
    assert ours.num_patches == theirs.num_patches and ours.grid_size == theirs.grid_size


@pytest.mark.parametrize("device", [pytest.param("cpu", id="cpu-reference"),
                                    pytest.param("cuda", id="cuda-triton", marks=pytest.mark.cuda)])
def test_autocast_computes_in_its_dtype_as_conv2d_does(device):
    """Under torch.autocast, nn.Conv2d runs in bf16 and returns float32 gradients to float32 weights:
    the fused embedding does the same (on the CPU through the PyTorch path; bf16 arithmetic in
    Triton's interpreter is not supported)."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    torch.manual_seed(0)
    settings = dict(img_size=32, patch_size=16, in_chans=3, embed_dim=48)
    theirs = timm_layers.PatchEmbed(**settings).to(device)
    ours = mmfast.nn.PatchEmbed(**settings, backend="reference" if device == "cpu" else "triton").to(device)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 3, 32, 32, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        ours_out, theirs_out = ours(x), theirs(x)
    assert ours_out.dtype == theirs_out.dtype == torch.bfloat16
    torch.testing.assert_close(ours_out.float(), theirs_out.float(), rtol=2e-2, atol=2e-2)
    ours_out.float().sum().backward()
    theirs_out.float().sum().backward()
    assert ours.proj.weight.grad.dtype == torch.float32
    torch.testing.assert_close(ours.proj.weight.grad, theirs.proj.weight.grad, rtol=2e-2, atol=2e-1)


def test_patch_embed_strict_size_errors():
    module = mmfast.nn.PatchEmbed(img_size=28, patch_size=14, embed_dim=8)
    with pytest.raises(ValueError, match=r"input size \(28, 42\) doesn't match"):
        module(torch.randn(1, 3, 28, 42))
    loose = mmfast.nn.PatchEmbed(img_size=28, patch_size=14, embed_dim=8, strict_img_size=False)
    with pytest.raises(ValueError, match="must be divisible by the patch size"):
        loose(torch.randn(1, 3, 28, 40))


@pytest.mark.parametrize("backend", BACKENDS)
def test_uint8_with_fused_normalization_matches_timm_on_normalized_floats(backend):
    torch.manual_seed(1)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    theirs = timm_layers.PatchEmbed(img_size=28, patch_size=14, embed_dim=40)
    ours = mmfast.nn.PatchEmbed(img_size=28, patch_size=14, embed_dim=40, mean=mean, std=std, backend=backend)
    ours.load_state_dict(theirs.state_dict())
    ours, theirs = ours.to(DEVICE), theirs.to(DEVICE)
    frames = torch.randint(0, 256, (2, 28, 28, 3), dtype=torch.uint8).to(DEVICE)  # decoder output, NHWC
    normalized = (frames.permute(0, 3, 1, 2).float() / 255 - torch.tensor(mean, device=DEVICE)[:, None, None]) / (
        torch.tensor(std, device=DEVICE)[:, None, None])
    torch.testing.assert_close(ours(frames, channels_last=True), theirs(normalized), rtol=1e-4, atol=1e-4)


def _clip_config(**overrides):
    settings = dict(hidden_size=32, image_size=28, patch_size=14, num_channels=3, num_hidden_layers=1,
                    num_attention_heads=2, intermediate_size=37)
    settings.update(overrides)
    return transformers.CLIPVisionConfig(**settings)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", [(28, 28), (42, 56)], ids=["native", "interpolated"])
def test_clip_vision_embeddings_match_hf(size, backend):
    from transformers.models.clip.modeling_clip import CLIPVisionEmbeddings as HF

    torch.manual_seed(2)
    config = _clip_config()
    theirs, ours = HF(config), mmfast.nn.CLIPVisionEmbeddings(config, backend=backend)
    x = torch.randn(2, 3, *size, requires_grad=True)
    interpolate = size != (28, 28)
    assert_same_module_math(ours, theirs, [x, interpolate])


@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_vision_embeddings_with_overlapping_patches(backend):
    """stride below the patch size (mmfast's option): a Conv2d of that stride over the normalized
    uint8 pixels, the class token, positions; the position table grows to the overlapping grid."""
    torch.manual_seed(3)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    config = _clip_config(image_size=30, patch_size=8)
    ours = mmfast.nn.CLIPVisionEmbeddings(config, mean=mean, std=std, stride=5, backend=backend).to(DEVICE)
    assert ours.num_patches == 25 and ours.position_embedding.weight.shape[0] == 26  # (30 - 8) // 5 + 1 = 5
    pixels = torch.randint(0, 256, (2, 3, 30, 30), dtype=torch.uint8).to(DEVICE)
    normalized = (pixels.float() / 255 - torch.tensor(mean, device=DEVICE)[:, None, None]) / (
        torch.tensor(std, device=DEVICE)[:, None, None])
    patches = torch.nn.functional.conv2d(normalized, ours.patch_embedding.weight, stride=5).flatten(2).transpose(1, 2)
    expected = torch.cat([ours.class_embedding.expand(2, 1, -1), patches], 1) + ours.position_embedding.weight
    torch.testing.assert_close(ours(pixels), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_siglip_vision_embeddings_match_hf(backend):
    from transformers.models.siglip.modeling_siglip import SiglipVisionEmbeddings as HF

    torch.manual_seed(3)
    config = transformers.SiglipVisionConfig(hidden_size=32, image_size=32, patch_size=16, num_channels=3,
                                             num_hidden_layers=1, num_attention_heads=2, intermediate_size=37)
    theirs, ours = HF(config), mmfast.nn.SiglipVisionEmbeddings(config, backend=backend)
    for size in ((32, 32), (48, 64)):
        x = torch.randn(1, 3, *size, requires_grad=True)
        assert_same_module_math(ours, theirs, [x, size != (32, 32)])


@pytest.mark.parametrize("backend", BACKENDS)
def test_tubelets_match_videomae(backend):
    from transformers.models.videomae.modeling_videomae import VideoMAEEmbeddings, VideoMAEPatchEmbeddings

    torch.manual_seed(4)
    config = transformers.VideoMAEConfig(image_size=32, patch_size=16, num_channels=3, hidden_size=24, num_frames=4,
                                         tubelet_size=2, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=37)
    theirs = VideoMAEPatchEmbeddings(config)
    ours = mmfast.nn.TubeletEmbed.from_config(config, backend=backend)
    video = torch.randn(2, 4, 3, 32, 32, requires_grad=True)
    assert_same_module_math(ours, theirs, [video])
    # with VideoMAE's sinusoid positions added in the same pass
    full = VideoMAEEmbeddings(config)
    full.patch_embeddings.load_state_dict(theirs.state_dict())
    full, video = full.to(DEVICE), video.to(DEVICE)
    positions = full.position_embeddings.reshape(-1, config.hidden_size).to(DEVICE)  # a plain attribute, not a buffer
    torch.testing.assert_close(ours(video, positions), full(video, None), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_overlapping_tubelets_are_a_conv3d_of_that_stride(backend):
    """stride below the patch size (mmfast's option, not in VideoMAE): a Conv3d stepping `stride` pixels in
    space and a whole tubelet in time, on uint8 channels-last frames normalized in the same pass; gradients
    of the weight and bias as the Conv3d's."""
    torch.manual_seed(4)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    ours = mmfast.nn.TubeletEmbed(30, 8, 3, 16, num_frames=6, tubelet_size=3, stride=5, mean=mean, std=std,
                                  backend=backend).to(DEVICE)
    assert ours.num_patches == 2 * 5 * 5  # (30 - 8) // 5 + 1 = 5 places a side, 6 // 3 time steps
    frames = torch.randint(0, 256, (2, 6, 30, 30, 3), dtype=torch.uint8).to(DEVICE)
    positions = torch.randn(50, 16, device=DEVICE, requires_grad=True)
    out = ours(frames, positions, channels_last=True)
    normalized = ((frames.float() / 255 - torch.tensor(mean, device=DEVICE)) / torch.tensor(std, device=DEVICE))
    reference = torch.nn.Conv3d(3, 16, (3, 8, 8), stride=(3, 5, 5)).to(DEVICE)
    reference.load_state_dict(ours.projection.state_dict())
    expected = reference(normalized.permute(0, 4, 1, 2, 3)).flatten(2).transpose(1, 2) + positions
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    upstream = torch.randn_like(out)
    mine = torch.autograd.grad(out, [ours.projection.weight, ours.projection.bias, positions], upstream)
    theirs = torch.autograd.grad(expected, [reference.weight, reference.bias, positions], upstream)
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ast_embeddings_match_hf(backend):
    from transformers.models.audio_spectrogram_transformer.modeling_audio_spectrogram_transformer import ASTEmbeddings

    torch.manual_seed(5)
    config = transformers.ASTConfig(hidden_size=24, patch_size=16, frequency_stride=10, time_stride=10,
                                    num_mel_bins=40, max_length=52, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=37, hidden_dropout_prob=0.0)
    theirs = ASTEmbeddings(config)
    with torch.no_grad():  # HF initializes the tokens and positions at zero: make them count
        for parameter in (theirs.cls_token, theirs.distillation_token, theirs.position_embeddings):
            parameter.normal_()
    ours = mmfast.nn.ASTPatchEmbed.from_config(config, backend=backend)
    spectrogram = torch.randn(2, 52, 40, requires_grad=True)
    assert_same_module_math(ours, theirs, [spectrogram])


@pytest.mark.parametrize("backend", BACKENDS)
def test_swap_in_timm_vit_keeps_outputs(backend):
    timm = pytest.importorskip("timm")
    torch.manual_seed(6)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=5).eval().to(DEVICE)
    x = torch.randn(2, 3, 32, 32).to(DEVICE)
    before = model(x)
    weight = model.patch_embed.proj.weight
    assert swap_patch_embedding(model, backend=backend) == ["patch_embed"]
    assert isinstance(model.patch_embed, mmfast.nn.PatchEmbed) and model.patch_embed.proj.weight is weight
    torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_swap_in_hf_clip_and_siglip_keeps_outputs(backend):
    torch.manual_seed(7)
    clip = transformers.CLIPVisionModel(_clip_config()).eval()
    siglip = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
        hidden_size=32, image_size=32, patch_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=37)).eval()
    for model, size in ((clip.to(DEVICE), 28), (siglip.to(DEVICE), 32)):
        x = torch.randn(2, 3, size, size).to(DEVICE)
        before = model(pixel_values=x).last_hidden_state
        replaced = swap_patch_embedding(model, backend=backend)
        assert len(replaced) == 1 and replaced[0].endswith("embeddings")
        torch.testing.assert_close(model(pixel_values=x).last_hidden_state, before, rtol=1e-4, atol=1e-4)


def test_swap_refuses_a_model_without_patch_embedding():
    with pytest.raises(ValueError, match="no patch embedding"):
        swap_patch_embedding(torch.nn.Linear(2, 2))


def test_timm_users_can_script_trace_and_resize_a_swapped_model():
    """TorchScript (the fused op is called as Python from the scripted model), timm's FX feature
    extraction (PatchEmbed is registered as a leaf) and set_input_size give timm's outputs."""
    timm = pytest.importorskip("timm")
    from timm.layers import set_layer_config
    from timm.models._features_fx import create_feature_extractor, get_graph_node_names

    torch.manual_seed(8)
    with set_layer_config(scriptable=True):
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    swap_patch_embedding(model, backend="reference")
    torch.testing.assert_close(torch.jit.script(model)(x), expected, rtol=1e-5, atol=1e-5)
    last = get_graph_node_names(model)[1][-1]
    traced = create_feature_extractor(model, return_nodes=[last])
    torch.testing.assert_close(traced(x)[last], expected, rtol=1e-5, atol=1e-5)

    theirs = timm_layers.PatchEmbed(img_size=32, patch_size=16, embed_dim=24)
    ours = mmfast.nn.PatchEmbed(img_size=32, patch_size=16, embed_dim=24, backend="reference")
    ours.load_state_dict(theirs.state_dict())
    for size, patch in ((48, None), (48, 8)):
        theirs.set_input_size(img_size=size, patch_size=patch)
        ours.set_input_size(img_size=size, patch_size=patch)
        assert (ours.img_size, ours.grid_size, ours.num_patches, ours.patch_size) == (
            theirs.img_size, theirs.grid_size, theirs.num_patches, theirs.patch_size)
        image = torch.randn(2, 3, size, size)
        torch.testing.assert_close(ours(image), theirs(image), rtol=1e-5, atol=1e-5)
