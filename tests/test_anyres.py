"""AnyRes (mmfast.data.anyres): the grid chosen as transformers chooses it, the tiles cut from the
padded image with the overview first, and a LLaVA that takes images of different sizes in one batch
(each its overview and tiles; more tokens for a larger image) giving each prompt the answer it gets alone."""
import random

import numpy as np
import pytest
import torch
from PIL import Image

from mmfast.data.anyres import anyres_tiles, best_resolution, check_pinpoints, tile_count

PINPOINTS = [(16, 32), (32, 16), (32, 32), (16, 48)]


def test_the_grid_is_the_one_transformers_chooses():
    utils = pytest.importorskip("transformers.image_processing_utils")
    rng = random.Random(0)
    for _ in range(300):
        height, width = rng.randint(4, 120), rng.randint(4, 120)
        assert best_resolution(height, width, PINPOINTS) == tuple(utils.select_best_resolution((height, width),
                                                                                                 PINPOINTS))
    assert best_resolution(50, 100, [(32, 64), (64, 32), (64, 64)]) == (32, 64)  # as many pixels, less padding


def test_tiles_are_the_padded_image_row_by_row_after_the_overview():
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (16, 32, 3), dtype=np.uint8))  # 16 high, 32 wide
    tiles = anyres_tiles(image, PINPOINTS, 16)
    assert tiles.shape == (3, 3, 16, 16) and tiles.dtype == torch.uint8 and tile_count(16, 32, PINPOINTS, 16) == 3
    # the grid is the image's own size: the tiles are its left and right halves, unchanged
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)
    assert torch.equal(tiles[1], pixels[:, :, :16]) and torch.equal(tiles[2], pixels[:, :, 16:])
    overview = torch.from_numpy(np.array(image.resize((16, 16), Image.BICUBIC))).permute(2, 0, 1)
    assert torch.equal(tiles[0], overview)
    # a smaller image is scaled up into its grid and centred on black
    # 20 high, 14 wide: the 32 x 16 grid, the image scaled to 23 x 16, 4 black rows above and 5 below
    small = anyres_tiles(Image.new("RGB", (14, 20), (200, 10, 10)), PINPOINTS, 16)
    assert small.shape[0] == 1 + 2 and (small[1, :, :4] == 0).all() and (small[2, :, -5:] == 0).all()
    assert (small[1, 0, 4:] > 150).all() and (small[2, 0, :-5] > 150).all()
    with pytest.raises(ValueError, match=r"multiples of the tower's 16-pixel input, got \[16, 20\]"):
        check_pinpoints([(16, 20)], 16)


def test_images_of_different_sizes_in_one_batch_answer_as_alone():
    pytest.importorskip("tokenizers")
    from mmfast.data.conversations import train_tokenizer
    from mmfast.data.llava_processor import LlavaProcessor
    from mmfast.models.clip import VisionConfig
    from mmfast.models.llama import LlamaConfig
    from mmfast.models.llava import Llava, LlavaConfig

    tokenizer = train_tokenizer(["What shape is in the image? A red circle. Which color?"] * 20, 120)
    config = LlavaConfig(vision=VisionConfig(image_size=16, patch_size=8, width=32, layers=1, heads=2,
                                             mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)),
                         text=LlamaConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=32, intermediate_size=48,
                                          num_hidden_layers=1, num_attention_heads=2),
                         vision_feature_layer=-1, image_token_id=tokenizer.token_to_id("<image>"),
                         image_grid_pinpoints=[list(p) for p in PINPOINTS])
    torch.manual_seed(0)
    model = Llava(config).eval()
    processor = LlavaProcessor(tokenizer, config)
    rng = np.random.default_rng(2)
    images = [Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8)) for size in ((16, 16, 3), (30, 44, 3))]
    prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                          {"type": "text", "text": "Which color?"}]}])
    together = processor(images=images, text=[prompt, prompt])
    tokens = (together["input_ids"] == config.image_token_id).sum(1)
    # 16 x 16: a 16 x 32 grid (overview + 2 tiles); 30 x 44: 32 x 32 (overview + 4 tiles)
    assert [tile_count(16, 16, PINPOINTS, 16), tile_count(30, 44, PINPOINTS, 16)] == [3, 5]
    assert tokens.tolist() == [3 * model.image_tokens, 5 * model.image_tokens]
    assert together["pixel_values"].shape == (8, 3, 16, 16)
    out = model.generate(**together, max_new_tokens=4)
    for row, image in enumerate(images):
        alone = processor(images=[image], text=[prompt])
        expected = model.generate(**alone, max_new_tokens=4)[0, alone["input_ids"].shape[1]:]
        assert out[row, together["input_ids"].shape[1]:].tolist() == expected.tolist()
    with pytest.raises(ValueError, match="AnyRes tiles"):
        __import__("mmfast.models.llava", fromlist=["to_hf_llava"]).to_hf_llava(model)
