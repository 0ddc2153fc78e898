"""A tiny random Qwen2.5-VL on a small synthetic image-task mixture, on CPU (tests and smoke runs).

    python -m merit_jax.main --config configs/tiny_vl.py [--workdir DIR] [--config.KEY=VALUE ...]

Starts from configs/default.py and overrides what differs. The model is built from `model.tiny_vl`
(merit_jax.models.qwen2_5_vl.tiny_vl_hf_config) with the synthetic tokenizer plus Qwen2.5-VL's vision
tokens (merit_jax.data.vision.add_vision_tokens); the mixture is merit_jax.data.vision.
write_synthetic_vl_mixture: 4 image tasks in 2 families, Vision-FLAN-shaped records. See docs/VL.md.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    c = default.get_config()
    c.workdir = "workdir/tiny_vl"

    m = c.model
    m.model_type = "qwen2_5_vl"  # with hf_path "": build a random tiny model of this family
    # Overrides of merit_jax.models.qwen2_5_vl.TINY_TEXT / TINY_VISION (vocab_size comes from the tokenizer);
    # sequences are tuples, which --config.model.tiny_vl.vision.fullatt_block_indexes='(3, 7, 11)' can override.
    m.tiny_vl = ml_collections.ConfigDict(dict(
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, rope_theta=10000.0, mrope_section=(2, 3, 3)),
        vision=dict(depth=4, hidden_size=32, intermediate_size=48, num_heads=2, fullatt_block_indexes=(1, 3),
                    window_size=56),
        tie_word_embeddings=True))

    d = c.data
    d.synthetic.kind = "vl"  # text | vl: which synthetic mixture `data.path = ""` generates
    d.synthetic.examples_per_task = 48
    d.image_min_pixels = 28 * 28 * 4  # processor resize bounds (0: the model's preprocessor_config.json)
    d.image_max_pixels = 28 * 28 * 16  # at most 16 image tokens per image
    d.max_image_pixels = 1_000_000  # refuse image files larger than this (pixels), naming the record
    d.max_len = 96
    d.truncation = "skip"  # never cut through an image

    c.extract.exclude = ("embed_tokens", "lm_head", "^visual/")  # language model only (drop ^visual/ to add it)
    c.extract.n_calib = 16
    c.split.depth = 1
    c.basin.steps = 100
    c.train.freeze = ("^visual/",)  # regexes of frozen parameters: the vision tower (() trains it too)
    c.train.batch_size = 8
    c.train.seq_len = 128
    return c
