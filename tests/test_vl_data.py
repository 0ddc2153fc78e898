"""VL data: image errors name the record, tokens expand per the processor, loss on the answer only, packed
batches keep images with their text, and the tiny VL config trains end to end."""

import importlib.util
import json
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from merit_jax.config import data_settings
from merit_jax.data import synthetic
from merit_jax.data import vision as V
from merit_jax.data.packing import plan_rows
from merit_jax.data.records import Record
from merit_jax.data.sources import Source, iter_records
from merit_jax.data.tokenize import ChatEncoder
from merit_jax.losses import token_losses
from merit_jax.models import params as P
from merit_jax.models.qwen2_5_vl import VLConfig, tiny_vl_hf_config
from tests.vl_fixtures import random_vl_model

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _tiny_vl_config():
    spec = importlib.util.spec_from_file_location("tiny_vl_config", ROOT / "configs" / "tiny_vl.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The tiny_vl config's pieces: synthetic mixture, VL tokenizer, processor, encoded examples."""
    cfg = _tiny_vl_config()
    root = tmp_path_factory.mktemp("vl_data")
    mix = V.write_synthetic_vl_mixture(root / "mix", seed=0, examples_per_task=6)
    tokenizer_dir = V.add_vision_tokens(synthetic.TOKENIZER_DIR, root / "tokenizer")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    processor = V.image_processor(min_pixels=cfg.data.image_min_pixels, max_pixels=cfg.data.image_max_pixels)
    records = list(iter_records([Source(mix)]))
    ids = V.vision_token_ids(tokenizer)
    examples = V.encode_vl_records(records, ChatEncoder(tokenizer), processor, image_token_id=ids[V.IMAGE_TOKEN],
                                   max_image_pixels=cfg.data.max_image_pixels)
    return dict(cfg=cfg, root=root, tokenizer=tokenizer, processor=processor, records=records, ids=ids,
                examples=examples)


def _record(image, where="mix.json [record 3]"):
    return Record("color", [{"role": "user", "content": "<image>\nWhat color?"},
                            {"role": "assistant", "content": "red"}], str(image), where)


def _encode(setup, record, **kw):
    return V.encode_vl_records([record], ChatEncoder(setup["tokenizer"]), setup["processor"],
                               image_token_id=setup["ids"][V.IMAGE_TOKEN], **kw)


def test_missing_unreadable_and_too_large_images_name_the_record(setup, tmp_path):
    with pytest.raises(V.ImageError, match=r"mix.json \[record 3\]: image not found: .*nope.png"):
        _encode(setup, _record(tmp_path / "nope.png"))
    (tmp_path / "junk.png").write_bytes(b"this is not a picture")
    with pytest.raises(V.ImageError, match=r"mix.json \[record 3\]: unreadable image .*junk.png"):
        _encode(setup, _record(tmp_path / "junk.png"))
    Image.new("RGB", (120, 90), (1, 2, 3)).save(tmp_path / "big.png")
    with pytest.raises(V.ImageError, match=r"mix.json \[record 3\]: image .*big.png is 120x90 = 10800 pixels, "
                                           r"over the limit data.max_image_pixels=10000"):
        _encode(setup, _record(tmp_path / "big.png"), max_image_pixels=10_000)
    # a body cut short: the header reads (encoding succeeds), decoding the pixels for a batch fails
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (60, 60, 3), np.uint8)).save(tmp_path / "cut.png")
    data = (tmp_path / "cut.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[:len(data) // 2])
    [ex] = _encode(setup, _record(tmp_path / "cut.png"))
    with pytest.raises(V.ImageError, match=r"mix.json \[record 3\]: unreadable image .*cut.png"):
        V.load_pixels([ex], setup["processor"])


def test_image_tokens_expand_per_the_processor_and_loss_is_on_the_answer_only(setup):
    tok, image_id = setup["tokenizer"], setup["ids"][V.IMAGE_TOKEN]
    for rec, ex in zip(setup["records"][::5], setup["examples"][::5]):
        pixel_values, grid = V.preprocess(setup["processor"], [Image.open(rec.image)])  # transformers' own
        np.testing.assert_array_equal(ex.image_grid_thw, grid)
        assert int((ex.input_ids == image_id).sum()) == grid.prod() // 4 == len(pixel_values) // 4
        run = np.flatnonzero(ex.input_ids == image_id)
        assert (np.diff(run) == 1).all()  # one contiguous run between <|vision_start|> and <|vision_end|>
        assert ex.input_ids[run[0] - 1] == setup["ids"]["<|vision_start|>"]
        assert ex.input_ids[run[-1] + 1] == setup["ids"]["<|vision_end|>"]
        answer = rec.messages[-1]["content"]
        assert tok.decode(ex.input_ids[ex.loss_mask]) == answer + "<|im_end|>"
        assert tok.decode(ex.input_ids[ex.prompt_len:]).startswith(answer)


def test_truncation_never_cuts_an_image(setup):
    ex, vision_ids = setup["examples"][0], setup["ids"].values()
    n = len(ex)
    assert V.truncate_vl(ex, n, "left", vision_ids)[1] == "kept"
    cut, action = V.truncate_vl(ex, n - 3, "left", vision_ids)  # "<|im_start|>user\n" goes, the image stays
    assert action == "truncated" and cut.input_ids[0] == setup["ids"]["<|vision_start|>"]
    assert V.truncate_vl(ex, n - 4, "left", vision_ids) == (None, "skipped")  # would cut <|vision_start|>
    cut, action = V.truncate_vl(ex, n - 1, "right", vision_ids)  # drops the final newline only
    assert action == "truncated" and cut.loss_mask.sum() == ex.loss_mask.sum()


def test_packed_batch_keeps_images_with_their_text(setup):
    examples, processor = setup["examples"], setup["processor"]
    vision = VLConfig.from_hf(_hf_config(setup)).vision
    rows = plan_rows([len(e) for e in examples], seq_len=128, batch_size=2, seed=1, num_epochs=1.0)[:2]
    batch = V.vl_batch(examples, rows, 128, processor, vision=vision, bucket=True)
    order = [examples[i] for r in rows for i in r]
    want_pv = np.concatenate([V.preprocess(processor, [Image.open(e.image)])[0] for e in order])
    n = len(want_pv)
    np.testing.assert_array_equal(batch["pixel_values"][:n], want_pv)  # images in row-major example order
    assert not batch["pixel_values"][n:].any() and batch["pixel_values"].shape[0] == batch["vision_layout"].num_patches
    grid = batch["image_grid_thw"]
    assert (grid.prod(-1) // 4).sum() == (batch["input_ids"] == setup["ids"][V.IMAGE_TOKEN]).sum()
    assert len(grid) & (len(grid) - 1) == 0  # bucketed to a power of two (zero rows own no tokens)


def test_synthetic_vl_mixture_is_deterministic_and_its_answers_hold(setup, tmp_path):
    again = V.write_synthetic_vl_mixture(tmp_path / "again", seed=0, examples_per_task=6)
    first = setup["root"] / "mix"
    assert (again / "annotation.json").read_text() == (first / "annotation.json").read_text()
    for r in json.loads((again / "annotation.json").read_text()):
        assert (again / r["image"]).read_bytes() == (first / r["image"]).read_bytes()
        if r["task_name"] == "shape":
            w, h = Image.open(again / r["image"]).size
            assert r["conversations"][1]["value"] == ("wide" if w > h else "tall")


def _hf_config(setup):
    cfg = setup["cfg"].model.tiny_vl.to_dict()
    return tiny_vl_hf_config(len(setup["tokenizer"]), setup["ids"], **cfg)


def test_tiny_vl_config_trains_with_the_vision_tower_frozen(setup):
    """tiny_vl end to end: packed image batches, jitted SGD steps on the language side only; the loss falls."""
    cfg, examples = setup["cfg"], setup["examples"]
    model = random_vl_model(_hf_config(setup))
    rows = plan_rows([len(e) for e in examples], seq_len=cfg.train.seq_len, batch_size=4, seed=0, num_epochs=1.0)
    batch = V.vl_batch(examples, rows[:4], cfg.train.seq_len, setup["processor"], vision=model.vl_config.vision,
                       bucket=True)
    graphdef, state = nnx.split(model)
    frozen = {k for k in P.flatten(state) if any(re.search(p, k) for p in cfg.train.freeze)}
    assert frozen and all(k.startswith("visual/") for k in frozen)

    def loss_fn(state, batch):
        logits = nnx.merge(graphdef, state)(
            batch["input_ids"], pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
            segment_ids=batch["segment_ids"], vision_layout=batch["vision_layout"])
        total, n = token_losses(logits, batch["targets"], batch["loss_mask"])
        return total / n

    @jax.jit
    def step(state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(state, batch)
        update = nnx.map_state(lambda path, g: g.replace(jnp.zeros_like(g[...])) if P.path_name(path) in frozen
                               else g, grads)
        return jax.tree.map(lambda p, g: p - 0.5 * g, state, update), loss, grads

    before = P.flatten(state)
    losses = []
    for _ in range(4):
        state, loss, grads = step(state, batch)
        losses.append(float(loss))
    after = P.flatten(state)
    assert losses[-1] < losses[0] - 0.1, losses
    assert all(np.array_equal(before[k], after[k]) for k in frozen)
    assert not np.array_equal(before["model/layers/0/mlp/up_proj/kernel"], after["model/layers/0/mlp/up_proj/kernel"])
    # the image features reach the loss: the (frozen) vision tower has gradients, down to the patch embedding
    g = P.flatten(grads)
    assert np.abs(np.asarray(g["visual/patch_embed/proj/weight"])).sum() > 0
    assert all(np.isfinite(np.asarray(v)).all() for v in g.values())  # empty bucket segments stay harmless
    layout = batch["vision_layout"]
    assert (layout.full.piece < 0).all(-1).any() or (layout.window.piece < 0).all(-1).any()  # there are some


def test_image_tokens_must_match_images(setup):
    """In a VL run every record goes through ImageEncoding: image tokens typed into a record without an image
    are an error naming it; a row whose image tokens do not match its images is refused before the model."""
    encoding = V.ImageEncoding(data_settings(setup["cfg"]), setup["tokenizer"])
    text = Record("color", [{"role": "user", "content": "what is <|image_pad|>?"},
                            {"role": "assistant", "content": "red"}], None, "mix.json [record 9]")
    with pytest.raises(V.ImageError, match=r"mix.json \[record 9\]: 1 image placeholder\(s\) in the text for 0"):
        encoding(ChatEncoder(setup["tokenizer"], images=True).encode([text])[0], text.where, 96, "skip")
    plain = Record("color", [{"role": "user", "content": "say red"}, {"role": "assistant", "content": "red"}],
                   None, "mix.json [record 10]")
    ex, action = encoding(ChatEncoder(setup["tokenizer"], images=True).encode([plain])[0], plain.where, 96, "skip")
    assert action == "kept" and ex.image_grid_thw.shape == (0, 3)
    examples = setup["examples"][:2]
    vl = VLConfig.from_hf(_hf_config(setup))
    images = V.RowImages(examples, setup["processor"], vl).fit([[0], [1]])
    from merit_jax.data.packing import TokenTable
    batch = TokenTable(examples).rows([[0], [1]], 128)
    batch["input_ids"][0, np.flatnonzero(batch["input_ids"][0] == vl.image_token_id)[0]] = 5  # one token gone
    with pytest.raises(V.ImageError, match=r"the row holds \d+ image tokens, its images .* need"):
        images.add(batch, [[0], [1]])
