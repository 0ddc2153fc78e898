"""Chunked cross-entropy: the same losses, accuracies and gradients as whole logits, in a fraction of the
memory (what makes Qwen2.5's 152k vocabulary trainable at long sequences)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from merit_jax.losses import chunked_token_ce, token_ce
from merit_jax.models.config import ModelConfig, tiny_hf_config
from merit_jax.models.qwen2 import Qwen2ForCausalLM
from merit_jax.training.step import SplitModel, forward_losses


def _model(vocab, tie=True):
    cfg = ModelConfig.from_hf(tiny_hf_config(vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=1,
                                             tie_word_embeddings=tie))
    return Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(0))


def _batch(vocab, b, t, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (b, t)).astype(np.int32)
    return {"input_ids": ids, "targets": np.roll(ids, -1, 1), "loss_mask": (rng.random((b, t)) < 0.7).astype(np.float32),
            "segment_ids": np.ones((b, t), np.int32), "positions": np.broadcast_to(np.arange(t), (b, t)).astype(np.int32)}


@pytest.mark.parametrize("chunk", [1, 7, 16, 64])
def test_chunked_ce_and_hits_equal_whole_logits(chunk):
    model = _model(97, tie=False)
    batch = _batch(97, 3, 23)
    h = model.hidden(batch["input_ids"])
    logits = model.logits(h)
    want_ce, want_hit = token_ce(logits, batch["targets"]), jnp.argmax(logits, -1) == batch["targets"]
    ce, hit = chunked_token_ce(h, model.logits, batch["targets"], chunk, hits=True)  # 23 % 7 != 0: padded
    np.testing.assert_allclose(ce, want_ce, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(hit, want_hit)


def test_chunked_loss_gradients_equal_whole_logits():
    split = SplitModel(_model(97))
    params = SplitModel.params_of(_model(97))
    batch = {k: jnp.asarray(v) for k, v in _batch(97, 2, 30, seed=1).items()}
    grad = lambda chunk: jax.grad(lambda p: forward_losses(split, p, batch, chunk)[0])(params)
    whole, chunked = grad(0), grad(8)
    for k in whole:
        np.testing.assert_allclose(chunked[k], whole[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_chunked_loss_step_needs_far_less_memory():
    """The compiled forward+backward's temporary memory: whole logits [4, 256, 16384] fp32 are 64 MiB (and
    their gradient as much); with 32-position chunks the step holds a few chunks' logits at a time."""
    vocab, b, t = 16384, 4, 256
    split = SplitModel(_model(vocab))
    params = SplitModel.params_of(_model(vocab))
    batch = {k: jnp.asarray(v) for k, v in _batch(vocab, b, t).items()}

    def temp_bytes(chunk):
        fn = jax.jit(jax.grad(lambda p, bt: forward_losses(split, p, bt, chunk)[0]))
        return fn.lower(params, batch).compile().memory_analysis().temp_size_in_bytes

    logits_bytes = b * t * vocab * 4
    whole, chunked = temp_bytes(0), temp_bytes(32)
    assert whole >= logits_bytes  # the whole [B, T, V] exists
    chunk_bytes = b * 32 * vocab * 4
    assert chunked < whole / 4 and chunked < 4 * chunk_bytes, (whole, chunked)  # a few chunks' worth
