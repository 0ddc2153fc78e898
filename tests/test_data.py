"""The data layer: formats and sources, answer-only loss masks, token counts, packing, resumable iterators,
and clear errors on bad input."""

import json

import grain
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from transformers import AutoTokenizer

from merit_jax.data import synthetic
from merit_jax.data.mixture import load_mixture
from merit_jax.data.packing import pad_batch
from merit_jax.data.pipeline import make_train_iterator, num_train_steps
from merit_jax.data.records import DataError

TOKENIZER = AutoTokenizer.from_pretrained(synthetic.TOKENIZER_DIR)
IM_END = TOKENIZER.convert_tokens_to_ids("<|im_end|>")


def data_cfg(path="", tasks=(), **over):
    d = dict(path=str(path), tasks=tuple(tasks), tokenizer="", image_root="", max_len=64, truncation="left",
             heldout_fraction=0.2, heldout_max=8, seed=0, synthetic=dict(seed=0, examples_per_task=24))
    d.update(over)
    return ml_collections.ConfigDict(dict(data=d, model=dict(hf_path=""), extract=dict(n_calib=4)))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


CHAT = {"messages": [{"role": "user", "content": "reverse 1 2 3"}, {"role": "assistant", "content": "3 2 1"}]}
FLAN = {"inputs": "add 2 3", "targets": "5"}
VFLAN = {"id": "x", "conversations": [{"from": "human", "value": "what is 7"}, {"from": "gpt", "value": "seven"}]}


def _answer_tokens(ex):
    return TOKENIZER.decode(ex.input_ids[ex.loss_mask])


@pytest.mark.parametrize("record,answer", [(CHAT, "3 2 1"), (FLAN, "5"), (VFLAN, "seven")],
                         ids=["chat", "flan", "vision-flan"])
def test_formats_mask_exactly_the_answer(tmp_path, record, answer):
    (tmp_path / "mix").mkdir()
    write_jsonl(tmp_path / "mix" / "t.jsonl", [record] * 6)
    mix = load_mixture(data_cfg(tmp_path / "mix"), TOKENIZER)
    ex = mix.tasks["t"].train[0]
    assert _answer_tokens(ex).replace(" ", "") == (answer + "<|im_end|>").replace(" ", "")
    assert ex.answer == answer
    assert ex.input_ids[ex.loss_mask][-1] == IM_END
    assert not ex.loss_mask[:ex.prompt_len].any()  # nothing of the prompt is supervised


def test_sources_json_parquet_saved_dataset_and_task_list(tmp_path):
    import datasets

    rows = [dict(FLAN, task="a")] * 5
    (tmp_path / "a.json").write_text(json.dumps(rows))
    datasets.Dataset.from_list([dict(FLAN)] * 5).to_parquet(str(tmp_path / "b.parquet"))
    datasets.Dataset.from_list([dict(FLAN)] * 5).save_to_disk(str(tmp_path / "c"))
    cfg = data_cfg(tasks=[{"name": "a", "path": str(tmp_path / "a.json")},
                          {"name": "b", "path": str(tmp_path / "b.parquet")},
                          {"name": "c", "path": str(tmp_path / "c")}])
    mix = load_mixture(cfg, TOKENIZER)
    assert mix.names == ["a", "b", "c"]
    assert all(len(t.train) + len(t.heldout) == 5 for t in mix.tasks.values())


def test_token_counts_match_a_direct_count_and_splits_are_seeded(tmp_path):
    out = synthetic.write_mixture(tmp_path / "syn", seed=0, examples_per_task=24)
    a = load_mixture(data_cfg(out), TOKENIZER, workdir=tmp_path / "w")
    b = load_mixture(data_cfg(out), TOKENIZER)
    assert len(a.tasks) >= 16 and len({t.family for t in a.tasks.values()}) >= 3
    for name, t in a.tasks.items():
        assert t.train_tokens == sum(int(ex.loss_mask.sum()) for ex in t.train) > 0
        assert [e.answer for e in t.heldout] == [e.answer for e in b.tasks[name].heldout]
        assert len(t.calib) == min(4, len(t.train))
        assert {id(e) for e in t.calib} <= {id(e) for e in t.train}
    c = load_mixture(data_cfg(out, seed=1), TOKENIZER)
    assert any([e.answer for e in t.heldout] != [e.answer for e in c.tasks[n].heldout] for n, t in a.tasks.items())


def test_packing_loses_no_token_and_never_crosses_examples(tmp_path):
    out = synthetic.write_mixture(tmp_path / "syn", seed=0, examples_per_task=24)
    examples = load_mixture(data_cfg(out), TOKENIZER).train_examples()
    steps = num_train_steps(examples, seq_len=64, batch_size=4, seed=0, num_epochs=1.0)
    batches = list(make_train_iterator(examples, seq_len=64, batch_size=4, seed=0, num_epochs=1.0))
    assert len(batches) == steps
    supervised = sum(float(b["loss_mask"].sum()) for b in batches)
    real = sum(int((b["segment_ids"] > 0).sum()) for b in batches)
    assert real == sum(len(e) for e in examples)
    # every example's supervised targets = its mask shifted by one
    assert supervised == sum(int(e.loss_mask[1:].sum()) for e in examples)
    for b in batches:
        seg, pos, ids, tgt = b["segment_ids"], b["positions"], b["input_ids"], b["targets"]
        for r in range(seg.shape[0]):
            for s in set(seg[r].tolist()) - {0}:
                idx = np.flatnonzero(seg[r] == s)
                assert np.array_equal(pos[r, idx], np.arange(len(idx)))  # restarts per example
                assert np.array_equal(tgt[r, idx[:-1]], ids[r, idx[1:]])  # targets stay inside it
                assert b["loss_mask"][r, idx[-1]] == 0


def test_iterator_state_saved_with_orbax_resumes_exactly(tmp_path):
    out = synthetic.write_mixture(tmp_path / "syn", seed=0, examples_per_task=24)
    examples = load_mixture(data_cfg(out), TOKENIZER).train_examples()
    make = lambda: make_train_iterator(examples, seq_len=64, batch_size=4, seed=3, num_epochs=2.0)
    it = make()
    for _ in range(3):
        next(it)
    with ocp.Checkpointer(grain.checkpoint.CheckpointHandler()) as ckptr:
        ckptr.save(tmp_path / "it", args=grain.checkpoint.CheckpointSave(it))
        expected = [next(it) for _ in range(3)]
        fresh = make()
        ckptr.restore(tmp_path / "it", args=grain.checkpoint.CheckpointRestore(fresh))
    for want in expected:
        got = next(fresh)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])


def test_sharded_iterators_cover_the_global_batch(tmp_path):
    out = synthetic.write_mixture(tmp_path / "syn", seed=0, examples_per_task=24)
    examples = load_mixture(data_cfg(out), TOKENIZER).train_examples()
    kw = dict(seq_len=64, batch_size=4, seed=0, num_epochs=1.0)
    whole = next(make_train_iterator(examples, **kw))
    parts = [next(make_train_iterator(examples, shard_index=i, shard_count=2, **kw)) for i in range(2)]
    np.testing.assert_array_equal(np.concatenate([p["input_ids"] for p in parts]), whole["input_ids"])


def test_truncation_is_counted_never_silent(tmp_path):
    (tmp_path / "m").mkdir()
    long = {"inputs": " ".join(["9"] * 80), "targets": "ok"}
    write_jsonl(tmp_path / "m" / "t.jsonl", [long] * 3 + [FLAN] * 3)
    left = load_mixture(data_cfg(tmp_path / "m", max_len=32), TOKENIZER)
    assert left.stats["truncated"]["t"] == 3 and all(len(e) <= 32 for e in left.tasks["t"].train)
    assert all(e.loss_mask.any() for e in left.tasks["t"].train)  # left truncation keeps the answer
    skip = load_mixture(data_cfg(tmp_path / "m", max_len=32, truncation="skip"), TOKENIZER)
    assert skip.stats["skipped"]["t"] == 3
    assert sum(len(t.train) + len(t.heldout) for t in skip.tasks.values()) == 3


def test_pad_batch_rows(tmp_path):
    (tmp_path / "m").mkdir()
    write_jsonl(tmp_path / "m" / "t.jsonl", [FLAN] * 4)
    exs = load_mixture(data_cfg(tmp_path / "m"), TOKENIZER).tasks["t"].train[:2]
    b = pad_batch(exs, 40)
    assert b["input_ids"].shape == (2, 40) and (b["segment_ids"] <= 1).all()
    assert b["loss_mask"].sum() == sum(int(e.loss_mask[1:].sum()) for e in exs)


@pytest.mark.parametrize("content,match", [
    ('{"inputs": "a", "targets": "b"}\n{"inputs": "a", \n', r"t\.jsonl:2"),
    ('{"inputs": "a"}\n', r"t\.jsonl:1"),
], ids=["malformed-json", "missing-field"])
def test_bad_records_name_file_and_line(tmp_path, content, match):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "t.jsonl").write_text(content)
    with pytest.raises(DataError, match=match):
        load_mixture(data_cfg(tmp_path / "m"), TOKENIZER)


def test_empty_task_duplicate_task_absent_task_and_missing_image(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="empty"):
        load_mixture(data_cfg(tmp_path / "m"), TOKENIZER)
    f = write_jsonl(tmp_path / "a.jsonl", [FLAN] * 3)
    with pytest.raises(DataError, match="duplicate"):
        load_mixture(data_cfg(tasks=[{"name": "x", "path": str(f)}, {"name": "x", "path": str(f)}]), TOKENIZER)
    with pytest.raises(DataError, match="nope"):
        load_mixture(data_cfg(tasks=[{"name": "x", "path": str(tmp_path / "nope.jsonl")}]), TOKENIZER)
    img = write_jsonl(tmp_path / "v.jsonl", [dict(VFLAN, image="missing.jpg", task_name="v")])
    with pytest.raises(DataError, match="missing.jpg"):
        load_mixture(data_cfg(tasks=[{"name": "v", "path": str(img)}], image_root=str(tmp_path)), TOKENIZER)
