"""Image sizes in Qwen2.5-VL batches: layout sizes fitted on rows cover those rows and padding rows, grow for a
row that was not fitted (never an error), and the vision tower at Qwen2.5-VL-3B's structure (32 blocks,
full attention in blocks 7/15/23/31, 112-pixel windows; tiny widths) matches transformers on real images of
many sizes and aspect ratios, several per row."""

import logging

import jax
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

import merit_jax
from merit_jax.data import vision as V
from merit_jax.data.packing import TokenTable
from merit_jax.data.records import Record
from merit_jax.data.sources import Source, iter_records
from merit_jax.data.tokenize import ChatEncoder
from merit_jax.models.qwen2_5_vl import VisionConfig, VLConfig, tiny_vl_hf_config
from merit_jax.models.vision_layout import (fits, grown_sizes, layout_sizes, row_grid, stacked_layouts,
                                            vision_layout)
from tests.vl_fixtures import RELEASE_SIZES, TOKEN_IDS, VOCAB, write_vision_flan_release

# Qwen2.5-VL-3B's vision structure with tiny widths
VISION_3B = dict(depth=32, hidden_size=16, intermediate_size=24, num_heads=2, fullatt_block_indexes=(7, 15, 23, 31),
                 window_size=112, patch_size=14, temporal_patch_size=2, spatial_merge_size=2)
TINY = VisionConfig(depth=4, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
                    fullatt_block_indexes=(1, 3), window_size=56)  # configs/tiny_vl.py
VL3B = VisionConfig(out_hidden_size=64, **VISION_3B)
# (height, width): the release's sizes, and larger ones none of whose sides is a multiple of 28 (smart_resize
# rounds them), spanning several 112-pixel windows with partial ones at the edges, very wide and very tall
SIZES = [*RELEASE_SIZES, (300, 200), (60, 900), (900, 60), (333, 517)]


def _processor(max_tokens=512):  # configs/qwen2_5_vl_3b.py: images of at most 512 tokens
    return V.image_processor(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * max_tokens)


def test_a_padding_row_fits_the_sizes_fitted_on_the_images():
    """The reported failure: held-out rows of 168x56 and 112x64 images fitted 4 window segments; the last
    batch's padding row (one stand-in image, then padding patches, which never share a segment) needs 5."""
    rows = [[(1, 12, 4)], [(1, 8, 4)]]
    sizes = layout_sizes(rows, TINY)
    assert sizes.window_segments == 5
    for row in [*rows, []]:
        assert fits(row, sizes, TINY)
        vision_layout(row_grid(row, TINY), TINY, sizes=sizes)


@pytest.mark.parametrize("vcfg", [TINY, VL3B], ids=["tiny", "3b"])
def test_fitted_sizes_cover_every_row_and_grown_sizes_cover_more(vcfg):
    """Random rows of 0-4 images of random sizes and aspect ratios, through the processor's smart_resize."""
    rng = np.random.default_rng(0)
    processor = _processor(16 if vcfg is TINY else 512)

    def grid():
        h = int(rng.integers(20, 700))
        w = int(np.clip(h * np.exp(rng.uniform(-3, 3)), 10, 4000))  # aspect ratios up to ~20:1
        return V.image_grid(processor, h, w)

    def rows(n):
        return [[grid() for _ in range(int(rng.integers(0, 5)))] for _ in range(n)]

    for _ in range(10):
        fitted, more = rows(6), rows(6)
        sizes = layout_sizes(fitted, vcfg)
        for row in [*fitted, []]:
            assert fits(row, sizes, vcfg)
            vision_layout(row_grid(row, vcfg), vcfg, sizes=sizes)
        for row in more:  # `fits` says exactly whether a row lays out within the sizes
            try:
                vision_layout(row_grid(row, vcfg), vcfg, sizes=sizes)
                laid_out = True
            except ValueError:
                laid_out = False
            assert fits(row, sizes, vcfg) == laid_out
        grown = grown_sizes(sizes, more, vcfg)
        assert all(fits(row, grown, vcfg) for row in [*fitted, *more, []])
        assert grown.full_segments & (grown.full_segments - 1) == 0  # powers of two: few distinct shapes
        assert grown.window_segments & (grown.window_segments - 1) == 0


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """The Vision-FLAN-format release, encoded as the tiny VL run encodes it."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("release")
    annotation, images = write_vision_flan_release(root, per_task=4)
    tokenizer = AutoTokenizer.from_pretrained(str(V.VL_TOKENIZER_DIR))
    ids = V.vision_token_ids(tokenizer)
    records = list(iter_records([Source(annotation)], str(images)))
    processor = _processor(16)
    examples = V.encode_vl_records(records, ChatEncoder(tokenizer), processor, image_token_id=ids[V.IMAGE_TOKEN])
    hf = tiny_vl_hf_config(len(tokenizer), ids)
    return dict(examples=examples, processor=processor, vl=VLConfig.from_hf(hf))


def test_row_images_never_fail_on_padding_rows_or_rows_that_were_not_fitted(release, caplog):
    examples, vl = release["examples"], release["vl"]
    tall = [i for i, ex in enumerate(examples) if ex.image_grid_thw.tolist() in ([[1, 12, 4]], [[1, 8, 4]])]
    images = V.RowImages(examples, release["processor"], vl).fit([[i] for i in tall])
    text = TokenTable(examples).rows([[tall[0]], [], []], 64)
    batch = images.add(text, [[tall[0]]])  # two padding rows: the evaluation's last batch
    assert batch["pixel_values"].shape[:2] == (3, images.sizes.num_patches)
    fitted = images.sizes
    wide = next(i for i, ex in enumerate(examples) if ex.image_grid_thw.tolist() == [[1, 6, 10]])
    pair = [wide, tall[0]]  # a packed row of two images, never fitted, over the sizes: they grow, with a warning
    assert not fits(images.grids(pair), fitted, vl.vision)
    with caplog.at_level(logging.WARNING, logger="merit_jax.data.vision"):
        batch = images.add(TokenTable(examples).rows([pair, [tall[0]]], 128), [pair, [tall[0]]])
    assert "grown" in caplog.text and images.sizes.num_patches > fitted.num_patches
    assert batch["vision/window/gather"].shape[1] == images.sizes.window_segments
    assert len(set(ex.image_grid_thw.tobytes() for ex in examples)) == len(RELEASE_SIZES)


def test_an_image_smart_resize_refuses_names_the_record(release, tmp_path):
    from transformers import AutoTokenizer

    Image.new("RGB", (1000, 4), (9, 9, 9)).save(tmp_path / "strip.jpg")  # aspect ratio 250 > 200
    tokenizer = AutoTokenizer.from_pretrained(str(V.VL_TOKENIZER_DIR))
    record = Record("strip", [{"role": "user", "content": "<image>\nWhat?"}, {"role": "assistant", "content": "x"}],
                    str(tmp_path / "strip.jpg"), "ann.json [record 7]")
    with pytest.raises(V.ImageError, match=r"ann.json \[record 7\]: image .*strip.jpg \(1000x4\) cannot be resized"):
        V.encode_vl_records([record], ChatEncoder(tokenizer), release["processor"],
                            image_token_id=V.vision_token_ids(tokenizer)[V.IMAGE_TOKEN])


def test_grids_follow_the_released_processor_config_with_the_3b_bounds(tmp_path):
    """Qwen2.5-VL-3B-Instruct's preprocessor_config.json, with configs/qwen2_5_vl_3b.py's pixel bounds: the
    grid read from the header (tokens expanded before pixels are decoded) is the processor's own, and large
    images stay within 512 tokens."""
    import json

    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor"}))
    processor = V.image_processor(tmp_path, min_pixels=56 * 56, max_pixels=28 * 28 * 512)
    for h, w in [*SIZES, (2000, 3000), (3000, 700), (20, 3000), (10, 10)]:
        grid = V.image_grid(processor, h, w)
        _, want = V.preprocess(processor, [Image.new("RGB", (w, h))])
        assert [list(grid)] == want.tolist(), (h, w)
        assert grid[1] % 2 == grid[2] % 2 == 0 and grid[1] * grid[2] // 4 <= 512


def _picture(h, w, rng):
    """Smooth colour gradients plus noise: patches differ across the image, so attending over a window or
    over the whole image gives different features."""
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([np.sin(6 * x + rng.uniform(0, 6)), np.cos(5 * y), x * y], -1) * 100 + 128
    return np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


def test_vision_tower_at_3b_structure_matches_transformers_per_row(tmp_path):
    """Real images of every size in SIZES, packed several per row (and a row without images), through the
    per-row (vmapped, fitted-size) path under jit, against transformers' vision tower on each row's images."""
    cfg = tiny_vl_hf_config(VOCAB, TOKEN_IDS, vision=VISION_3B)
    torch.manual_seed(0)
    ref = transformers.Qwen2_5_VLForConditionalGeneration(transformers.Qwen2_5_VLConfig(**cfg)).eval()
    with torch.no_grad():
        for name, p in ref.model.visual.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.15)
    ref.save_pretrained(tmp_path)
    ours = merit_jax.load_hf(tmp_path)
    vcfg = ours.vl_config.vision
    assert (vcfg.depth, vcfg.fullatt_block_indexes, vcfg.window_units) == (32, (7, 15, 23, 31), 4)

    processor = _processor()
    rng = np.random.default_rng(1)
    pics = [Image.fromarray(_picture(h, w, rng)) for h, w in SIZES]
    per_image = [V.preprocess(processor, [p]) for p in pics]
    resized = [(g[0, 1] * 14, g[0, 2] * 14) != hw for (_, g), hw in zip(per_image, SIZES)]
    assert sum(resized) == 7  # all but 84x140 and 168x56, which are multiples of 28 already
    rows = [[0, 5], [6, 3, 2], [7], [1, 4, 8], []]  # several images of different sizes per row; none in one
    grids = [np.concatenate([per_image[i][1] for i in r]) if r else np.zeros((0, 3), np.int32) for r in rows]
    sizes = layout_sizes(grids, vcfg)
    pixels = np.zeros((len(rows), sizes.num_patches, vcfg.patch_dim), np.float32)
    for j, r in enumerate(rows):
        pv = np.concatenate([per_image[i][0] for i in r]) if r else np.zeros((0, vcfg.patch_dim))
        pixels[j, :len(pv)] = pv
    layout = stacked_layouts(grids, vcfg, sizes)
    got = np.asarray(jax.jit(jax.vmap(lambda pv, lay: ours.visual(pv, lay)))(pixels, layout))
    for j, r in enumerate(rows[:-1]):
        with torch.no_grad():
            want = ref.model.visual(torch.tensor(pixels[j, :int(grids[j].prod(-1).sum())]),
                                    grid_thw=torch.tensor(grids[j])).pooler_output.numpy()
        np.testing.assert_allclose(got[j, :len(want)], want, atol=1e-4, rtol=0)
    assert np.isfinite(got[-1]).all()
