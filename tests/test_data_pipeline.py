"""Data layer, training side: packing (no token lost, no attention across examples), the Grain iterator
(seeded epochs, fractional epochs, shards), its Orbax-checkpointed state, and pad_batch."""

import collections

import grain
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from merit_jax.data import mixture as mx
from merit_jax.data import synthetic
from merit_jax.data.packing import TokenTable, first_fit, pad_batch, plan_rows
from merit_jax.data.pipeline import make_train_iterator, num_train_steps, steps_per_epoch
from tests.test_data import TOKENIZER, data_cfg

SEQ = 64


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    out = synthetic.write_mixture(tmp_path_factory.mktemp("syn"), seed=0, examples_per_task=24)
    return mx.load_mixture(data_cfg(out), TOKENIZER).train_examples()


def canonical(examples):
    """Example index -> index of its first identical twin (see row_examples)."""
    first = {}
    return [first.setdefault(e.input_ids.tobytes(), i) for i, e in enumerate(examples)]


def run(examples, **kw):
    kw = dict(dict(seq_len=SEQ, batch_size=4, seed=0, num_epochs=1.0), **kw)
    return list(make_train_iterator(examples, **kw))


def row_examples(batch, examples):
    """For each packed segment: (row, segment id, index of an example with exactly its tokens).

    Identical examples (same tokens, hence same mask) share the index of the first of them."""
    by_ids = {}
    for i, e in enumerate(examples):
        by_ids.setdefault(e.input_ids.tobytes(), i)
    out = []
    for r in range(batch["segment_ids"].shape[0]):
        for s in sorted(set(batch["segment_ids"][r].tolist()) - {0}):
            ids = batch["input_ids"][r][batch["segment_ids"][r] == s]
            out.append((r, s, by_ids[ids.tobytes()]))
    return out


def test_packing_loses_no_token_and_keeps_targets_inside_examples(examples):
    batches = run(examples)
    assert len(batches) == num_train_steps(examples, seq_len=SEQ, batch_size=4, seed=0, num_epochs=1.0)
    seen = collections.Counter()
    for b in batches:
        assert {k: (v.shape, v.dtype.name) for k, v in b.items()} == {
            "input_ids": ((4, SEQ), "int32"), "targets": ((4, SEQ), "int32"), "loss_mask": ((4, SEQ), "float32"),
            "segment_ids": ((4, SEQ), "int32"), "positions": ((4, SEQ), "int32")}
        seg = b["segment_ids"]
        pad = seg == 0
        assert not (b["input_ids"][pad] | b["targets"][pad] | b["positions"][pad]).any() and not b["loss_mask"][pad].any()
        for r, s, i in row_examples(b, examples):
            idx = np.flatnonzero(seg[r] == s)
            ex = examples[i]
            assert np.array_equal(idx, np.arange(idx[0], idx[0] + len(ex)))  # contiguous
            assert np.array_equal(b["positions"][r, idx], np.arange(len(ex)))  # restart per example
            assert np.array_equal(b["targets"][r, idx], np.append(ex.input_ids[1:], 0))  # never cross a segment
            assert np.array_equal(b["loss_mask"][r, idx], np.append(ex.loss_mask[1:], False))
            seen[i] += 1
        assert all(sorted(set(seg[r].tolist()) - {0}) == list(range(1, seg[r].max() + 1)) for r in range(4))
    assert seen == collections.Counter(canonical(examples))  # one epoch: every example exactly once
    assert sum(float(b["loss_mask"].sum()) for b in batches) == sum(int(e.loss_mask.sum()) for e in examples)
    filled = sum(int((b["segment_ids"] > 0).sum()) for b in batches) / (len(batches) * 4 * SEQ)
    assert filled > 0.8  # examples of 19-30 tokens: two fit a 64-token row


def test_packed_rows_give_the_model_the_same_logits_as_each_example_alone(examples):
    from merit_jax.models.config import ModelConfig
    from merit_jax.models.qwen2 import Qwen2ForCausalLM

    cfg = ModelConfig(vocab_size=len(TOKENIZER), hidden_size=32, intermediate_size=48, num_layers=2, num_heads=2,
                      num_kv_heads=1, head_dim=16)
    model = Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(0))
    b = run(examples, batch_size=2)[0]
    packed = np.asarray(model(jnp.asarray(b["input_ids"]), positions=jnp.asarray(b["positions"]),
                              segment_ids=jnp.asarray(b["segment_ids"])))
    leaky = np.asarray(model(jnp.asarray(b["input_ids"])))  # what ignoring the segments would give
    segs = row_examples(b, examples)
    alone = pad_batch([examples[i] for _, _, i in segs], SEQ)
    single = np.asarray(model(jnp.asarray(alone["input_ids"]), positions=jnp.asarray(alone["positions"]),
                              segment_ids=jnp.asarray(alone["segment_ids"])))
    for k, (r, s, i) in enumerate(segs):
        idx = np.flatnonzero(b["segment_ids"][r] == s)
        np.testing.assert_allclose(packed[r, idx], single[k, :len(idx)], atol=2e-5)
    later = [(r, s) for r, s, _ in segs if s > 1]
    assert later and any(not np.allclose(leaky[r][b["segment_ids"][r] == s], packed[r][b["segment_ids"][r] == s],
                                         atol=2e-5) for r, s in later)


def test_epochs_are_reshuffled_by_seed_and_may_be_fractional(examples):
    n = len(examples)
    kw = dict(seq_len=SEQ, batch_size=4)
    orders = {s: [i for b in run(examples, seed=s, num_epochs=2.0) for _, _, i in row_examples(b, examples)]
              for s in (0, 1)}
    assert orders[0] == [i for b in run(examples, seed=0, num_epochs=2.0) for _, _, i in row_examples(b, examples)]
    assert orders[0] != orders[1]
    assert sorted(orders[0]) == sorted(canonical(examples) * 2) and orders[0][:n // 2] != orders[0][n:n + n // 2]
    half = [i for b in run(examples, num_epochs=0.5) for _, _, i in row_examples(b, examples)]
    assert len(half) == round(n / 2)
    assert not collections.Counter(half) - collections.Counter(canonical(examples))  # no example twice
    one_half = collections.Counter(i for b in run(examples, num_epochs=1.5) for _, _, i in row_examples(b, examples))
    assert sum(one_half.values()) == round(1.5 * n)
    assert not one_half - collections.Counter(canonical(examples) * 2)  # none more than twice
    assert num_train_steps(examples, num_epochs=0.5, seed=0, **kw) < steps_per_epoch(examples, **kw) \
        < num_train_steps(examples, num_epochs=1.5, seed=0, **kw)


def test_shards_split_each_global_batch(examples):
    whole = run(examples, batch_size=4)
    parts = [run(examples, batch_size=4, shard_index=p, shard_count=2) for p in range(2)]
    assert len(parts[0]) == len(parts[1]) == len(whole)  # every process runs the same number of steps
    for step, b in enumerate(whole):
        for k in b:
            np.testing.assert_array_equal(np.concatenate([parts[0][step][k], parts[1][step][k]]), b[k])


def test_iterator_state_saved_through_orbax_mid_epoch_resumes_exactly(examples, tmp_path):
    make = lambda: make_train_iterator(examples, seq_len=SEQ, batch_size=4, seed=3, num_epochs=2.0, num_threads=2)
    per_epoch = num_train_steps(examples, seq_len=SEQ, batch_size=4, seed=3, num_epochs=1.0)
    it = make()
    for _ in range(per_epoch - 2):  # stop two steps before the epoch ends: the rest crosses into epoch 2
        next(it)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(7, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
        expected = list(it)
        resumed = make()
        mngr.restore(7, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
    got = list(resumed)
    assert len(got) == len(expected) > 2
    for want, have in zip(expected, got):
        for k in want:
            np.testing.assert_array_equal(have[k], want[k])


def test_bad_arguments_are_refused(examples):
    with pytest.raises(ValueError, match=r"example \d+ of task '\w+' has \d+ tokens > seq_len=8"):
        make_train_iterator(examples, seq_len=8, batch_size=4, seed=0)
    with pytest.raises(ValueError, match="not divisible by shard_count=3"):
        make_train_iterator(examples, seq_len=SEQ, batch_size=4, seed=0, shard_count=3)
    with pytest.raises(ValueError, match="no training examples"):
        num_train_steps([], seq_len=SEQ, batch_size=4, seed=0)
    with pytest.raises(ValueError, match="less than one example"):
        plan_rows([3, 4], seq_len=8, batch_size=1, seed=0, num_epochs=0.1)
    with pytest.raises(ValueError, match=r"longer than seq_len=8"):
        pad_batch(examples[:2], 8)


def test_first_fit_and_the_plan_pad_only_the_last_batch():
    lengths = np.array([5, 3, 8, 2, 7, 1, 4])
    assert [b.tolist() for b in first_fit(lengths, 8)] == [[0, 1], [2], [3, 5, 6], [4]]
    rows = plan_rows(lengths, seq_len=8, batch_size=3, seed=0, num_epochs=1.0)
    used = [r for r in rows if len(r)]
    assert len(rows) == 6 and rows[:len(used)] == used and len(used) == 4  # 2 empty rows close the last batch
    assert sorted(np.concatenate(rows).tolist()) == list(range(7)) and all(lengths[r].sum() <= 8 for r in rows)


def test_pad_batch_gives_one_example_per_row(examples):
    b = pad_batch(examples[:3], SEQ)
    assert b["input_ids"].shape == (3, SEQ) and set(np.unique(b["segment_ids"])) == {0, 1}
    for r, e in enumerate(examples[:3]):
        assert np.array_equal(b["input_ids"][r, :len(e)], e.input_ids) and not b["input_ids"][r, len(e):].any()
        assert np.array_equal(b["positions"][r, :len(e)], np.arange(len(e)))
        assert np.array_equal(b["loss_mask"][r, :len(e) - 1], e.loss_mask[1:])
    assert TokenTable(examples[:3]).rows([[], [0, 1]], SEQ)["segment_ids"][0].sum() == 0
