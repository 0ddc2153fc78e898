"""Qwen2.5-VL in NNX against transformers' Qwen2_5_VLForConditionalGeneration (fp32, max abs diff <= 1e-4)."""

import json

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

import merit_jax
from merit_jax.convert.__main__ import main as convert_main
from merit_jax.io.hf import save_hf
from merit_jax.models import params as P
from merit_jax.models.generate import left_pad
from merit_jax.io.load import load_model
from merit_jax.models.mrope import mrope_positions
from merit_jax.models.qwen2_5_vl import (Qwen2_5_VLForConditionalGeneration, generate_vl,
                                        language_model_filter, num_params, vision_layout)
from tests.vl_fixtures import IMAGE, pixels, prompt, tiny_vl, token_types, torch_logits

TOL = 1e-4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_vl")
    ref = tiny_vl(path)
    return path, ref, merit_jax.load_hf(path)


def test_load_hf_returns_the_vl_model_with_hf_names(tiny):
    path, ref, ours = tiny
    assert isinstance(ours, Qwen2_5_VLForConditionalGeneration)
    from merit_jax.io.hf import hf_key

    stored = set(load_file(path / "model.safetensors"))
    flat = P.flatten(ours)
    assert {hf_key(n)[0] for n in flat} == stored  # every tensor, no more, by the released names
    language = [n for n in flat if language_model_filter(n)]
    assert language and all(hf_key(n)[0].startswith("model.") for n in language)
    counts = num_params(ours)
    assert counts["language"] + counts["visual"] == sum(p.numel() for p in ref.parameters())
    assert counts["visual"] == sum(p.numel() for p in ref.model.visual.parameters())


def test_vision_tower_matches_transformers(tiny):
    _, ref, ours = tiny
    pv, grid = pixels(["wide", "square", "tall"], seed=1)
    with torch.no_grad():
        want = ref.model.visual(torch.tensor(pv), grid_thw=torch.tensor(grid)).pooler_output.numpy()
    np.testing.assert_allclose(np.asarray(ours.image_features(pv, grid)), want, atol=TOL, rtol=0)
    # the two small frames share one full-attention segment (attending only within themselves)
    assert vision_layout(grid, ours.vl_config.vision).full.gather.shape[0] == len(grid) - 1


# The parity cases, run by us as one padded batch (one compilation serves every parity test below).
CASES = {"text-only": (13,), "one-image": (4, "wide", 6), "two-images-of-different-sizes": (3, "wide", 2, "square", 5)}
CASE_GRIDS = {"text-only": [], "one-image": ["wide"], "two-images-of-different-sizes": ["wide", "square"]}


def _padded(rows, side):
    t = max(map(len, rows))
    ids, mask = np.zeros((len(rows), t), np.int64), np.zeros((len(rows), t), np.int64)
    for i, r in enumerate(rows):
        sl = slice(t - len(r), t) if side == "left" else slice(0, len(r))
        ids[i, sl], mask[i, sl] = r, 1
    return ids, mask


@pytest.fixture(scope="module")
def cases():
    rows = [prompt(*parts, seed=i) for i, parts in enumerate(CASES.values())]
    pv, grid = pixels([g for gs in CASE_GRIDS.values() for g in gs], seed=3)
    return rows, pv, grid


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(tiny, cases, case):
    """Each case alone in transformers against its row of our right-padded batch."""
    _, ref, ours = tiny
    rows, pv, grid = cases
    ids, mask = _padded(rows, "right")
    got = np.asarray(ours(ids, pixel_values=pv, image_grid_thw=grid, attention_mask=mask))
    i = list(CASES).index(case)
    first = sum(len(gs) for gs in list(CASE_GRIDS.values())[:i])
    own_grid = grid[first:first + len(CASE_GRIDS[case])]
    start = int(grid[:first].prod(-1).sum())
    own_pv = pv[start:start + int(own_grid.prod(-1).sum())] if len(own_grid) else None
    want = torch_logits(ref, np.array([rows[i]]), own_pv, own_grid if len(own_grid) else None)[0]
    np.testing.assert_allclose(got[i, :len(rows[i])], want, atol=TOL, rtol=0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_with_padding_matches_transformers(tiny, cases, side):
    _, ref, ours = tiny
    rows, pv, grid = cases
    ids, mask = _padded(rows, side)
    got = np.asarray(ours(ids, pixel_values=pv, image_grid_thw=grid, attention_mask=mask))
    want = torch_logits(ref, ids, pv, grid, mask)
    np.testing.assert_allclose(got[mask > 0], want[mask > 0], atol=TOL, rtol=0)


def test_mrope_positions_match_get_rope_index(tiny):
    _, ref, _ = tiny
    rows = [prompt(1, "tall", 3, "wide", seed=8), prompt("square", 4, seed=9)]
    ids, mask = left_pad(rows)
    _, grid = pixels(["tall", "wide", "square"])
    want, want_delta = ref.model.get_rope_index(torch.tensor(ids).long(), torch.tensor(token_types(ids)),
                                                torch.tensor(grid), attention_mask=torch.tensor(mask))
    got, delta = mrope_positions(ids, grid, image_token_id=IMAGE, attention_mask_bt=mask)
    np.testing.assert_array_equal(np.asarray(got), want.numpy())
    np.testing.assert_array_equal(np.asarray(delta), want_delta.numpy()[:, 0])


def test_packed_rows_under_jit_equal_separate_examples(tiny):
    """Two image examples packed in one row (segments), jitted with a precomputed power-of-two layout, give
    each example's logits from transformers: M-RoPE restarts per segment, features go to their example."""
    _, ref, ours = tiny
    a, b = prompt(2, "wide", 3, seed=10), prompt(1, "tall", 4, seed=11)
    pv, grid = pixels(["wide", "tall"], seed=12)
    row = np.array([a + b + [0, 0]])
    segments = np.array([[1] * len(a) + [2] * len(b) + [0, 0]])
    layout = vision_layout(grid, ours.vl_config.vision, bucket=True)
    assert len(pv) == 76 and layout.num_patches == 128
    graphdef, state = nnx.split(ours)

    @jax.jit
    def forward(state, ids, pv, grid, segments, layout):
        return nnx.merge(graphdef, state)(ids, pixel_values=pv, image_grid_thw=grid, segment_ids=segments,
                                          vision_layout=layout)

    got = np.asarray(forward(state, row, pv, grid, segments, layout))[0]
    want_a = torch_logits(ref, np.array([a]), pv[:60], grid[:1])[0]
    want_b = torch_logits(ref, np.array([b]), pv[60:], grid[1:])[0]
    np.testing.assert_allclose(got[:len(a)], want_a, atol=TOL, rtol=0)
    np.testing.assert_allclose(got[len(a):len(a) + len(b)], want_b, atol=TOL, rtol=0)


def test_export_loads_in_transformers_and_greedy_decodes_the_same(tmp_path):
    ref = tiny_vl(tmp_path / "src", seed=1, std=0.3, tie_word_embeddings=False)
    ours = merit_jax.load_hf(tmp_path / "src")
    hf_cfg = json.loads((tmp_path / "src" / "config.json").read_text())
    save_hf(ours, hf_cfg, tmp_path / "out", max_shard_bytes=200_000)  # several shards + index
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    back = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    want_state, got_state = ref.state_dict(), back.state_dict()
    assert sorted(want_state) == sorted(got_state)
    for k in want_state:
        assert torch.equal(want_state[k], got_state[k]), k
    ids, mask = left_pad([prompt(3, "wide", 2, seed=13), prompt(1, "square", 1, seed=14)])
    pv, grid = pixels(["wide", "square"], seed=15)
    with torch.no_grad():
        want = back.generate(input_ids=torch.tensor(ids).long(), attention_mask=torch.tensor(mask).long(),
                             pixel_values=torch.tensor(pv), image_grid_thw=torch.tensor(grid),
                             mm_token_type_ids=torch.tensor(token_types(ids)), max_new_tokens=6, do_sample=False,
                             eos_token_id=None, pad_token_id=0)[:, ids.shape[1]:].numpy()
    got = generate_vl(ours, ids, mask, pv, grid, max_new_tokens=6)
    np.testing.assert_array_equal(got, want)
    assert len(set(want.ravel().tolist())) > 2  # a decode that actually moves


def test_reads_transformers5_tensor_names_and_converts_through_the_cli(tiny, tmp_path):
    path, _, ours = tiny
    renamed = tmp_path / "v5names"
    renamed.mkdir()
    (renamed / "config.json").write_text((path / "config.json").read_text())
    tensors = load_file(path / "model.safetensors")
    save_file({("model.visual." + k[7:] if k.startswith("visual.") else
                "model.language_model." + k[6:] if k.startswith("model.") else k): v for k, v in tensors.items()},
              renamed / "model.safetensors")
    again = merit_jax.load_hf(renamed)
    a, b = P.flatten(ours), P.flatten(again)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert convert_main(["hf-to-orbax", "--hf", str(path), "--out", str(tmp_path / "ckpt")]) == 0
    from_ckpt = load_model(tmp_path / "ckpt")
    assert isinstance(from_ckpt, Qwen2_5_VLForConditionalGeneration)
    assert convert_main(["orbax-to-hf", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "back")]) == 0
    back = load_file(tmp_path / "back" / "model.safetensors")
    assert sorted(back) == sorted(tensors) and all(np.array_equal(back[k], tensors[k]) for k in tensors)


def test_bad_inputs_are_named(tiny):
    _, _, ours = tiny
    ids = np.array([prompt(2, "square", 2)])
    pv, grid = pixels(["wide"])
    with pytest.raises(ValueError, match=r"4 <\|image_pad\|> tokens .* implies 15"):
        ours(ids, pixel_values=pv, image_grid_thw=grid)
    with pytest.raises(NotImplementedError, match="videos"):
        ours(ids, pixel_values_videos=pv, video_grid_thw=grid)
    graphdef, state = nnx.split(ours)
    with pytest.raises(ValueError, match="vision_layout="):
        jax.jit(lambda s, g: nnx.merge(graphdef, s)(ids, pixel_values=pv, image_grid_thw=g))(state, grid)
    cfg = json.loads((tiny[0] / "config.json").read_text())
    cfg["text_config"]["rope_parameters"]["mrope_section"] = [2, 2, 2]
    with pytest.raises(ValueError, match=r"mrope_section \[2, 2, 2\] must sum to head_dim/2 = 8"):
        Qwen2_5_VLForConditionalGeneration.from_hf_config(cfg, rngs=nnx.Rngs(0))
