"""Data layer, reading side: formats and sources, answer-only loss masks, truncation, held-out/calibration
splits, supervised token counts (and their cache), and the errors on bad input."""

import json
import logging

import ml_collections
import numpy as np
import pytest
from transformers import AutoTokenizer

from merit_jax.config import data_settings
from merit_jax.data import mixture as mx
from merit_jax.data import synthetic
from merit_jax.data.records import DataError

TOKENIZER = AutoTokenizer.from_pretrained(synthetic.TOKENIZER_DIR)
IM_END = "<|im_end|>"

CHAT = {"messages": [{"role": "user", "content": "reverse: 123"}, {"role": "assistant", "content": "321"}]}
FLAN = {"inputs": "count zero: 100", "targets": "two"}
VFLAN = {"id": "v0", "image": "img/a.png",
         "conversations": [{"from": "human", "value": "<image>\nwhat digit"}, {"from": "gpt", "value": "seven"}]}


def data_cfg(path="", tasks=(), n_calib=4, **over):
    d = dict(path=str(path), tasks=list(tasks), tokenizer="", image_root="", max_len=64, truncation="left",
             heldout_fraction=0.25, heldout_max=8, seed=0, synthetic=dict(seed=0, examples_per_task=24))
    d.update(over)
    return data_settings(ml_collections.ConfigDict(dict(data=d, model=dict(hf_path=""), extract=dict(n_calib=n_calib))))


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def supervised_text(ex):
    return TOKENIZER.decode(ex.input_ids[ex.loss_mask])


def numbered(record, n):
    """n distinct copies of a FLAN/chat record (distinct so that splits are observable)."""
    out = []
    for i in range(n):
        r = json.loads(json.dumps(record))
        if "inputs" in r:
            r["inputs"] += f" #{i}"
        else:
            r["messages"][0]["content"] += f" #{i}"
        out.append(r)
    return out


# ------------------------------------------------------------------------------------------------ formats


@pytest.mark.parametrize("record,answer", [(CHAT, "321"), (FLAN, "two"), (VFLAN, "seven")],
                         ids=["chat", "flan", "vision-flan"])
def test_each_format_supervises_exactly_its_answer(tmp_path, record, answer):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(b"png")
    write_jsonl(tmp_path / "mix" / "t.jsonl", [record] * 4)
    mix = mx.load_mixture(data_cfg(tmp_path / "mix", image_root=str(tmp_path)), TOKENIZER)
    for ex in mix.tasks["t"].train + mix.tasks["t"].heldout:
        assert supervised_text(ex) == answer + IM_END
        assert ex.answer == answer and ex.input_ids.dtype == np.int32 and ex.loss_mask.dtype == np.bool_
        # prompt_len: everything before the answer, ending with the generation prompt
        assert TOKENIZER.decode(ex.input_ids[:ex.prompt_len]).endswith("<|im_start|>assistant\n")
        assert ex.loss_mask[ex.prompt_len] and not ex.loss_mask[:ex.prompt_len].any()
    assert ex.image == (str(tmp_path / "img" / "a.png") if record is VFLAN else None)
    if record is VFLAN:  # a text-only tokenizer drops the <image> marker
        assert "<image>" not in TOKENIZER.decode(ex.input_ids)


def test_multi_turn_chat_supervises_every_assistant_turn(tmp_path):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "copy: 12"},
                {"role": "assistant", "content": "12"}, {"role": "user", "content": "again: 345"},
                {"role": "assistant", "content": "345"}]
    write_jsonl(tmp_path / "m" / "t.jsonl", [{"messages": messages}] * 2)
    ex = mx.load_mixture(data_cfg(tmp_path / "m", heldout_fraction=0.0), TOKENIZER).tasks["t"].train[0]
    assert supervised_text(ex) == "12" + IM_END + "345" + IM_END
    assert ex.answer == "345" and TOKENIZER.decode(ex.input_ids[ex.prompt_len:]) == "345" + IM_END + "\n"


def test_a_template_with_a_default_system_prompt(tmp_path):
    """Qwen2.5's own templates insert a system turn when there is none: masks must still be exact."""
    tok = AutoTokenizer.from_pretrained(synthetic.TOKENIZER_DIR)
    tok.chat_template = ("{%- if messages[0]['role'] != 'system' %}{{- '<|im_start|>system\\nYou help.<|im_end|>\\n' }}"
                         "{%- endif %}" + synthetic.CHAT_TEMPLATE)
    write_jsonl(tmp_path / "m" / "t.jsonl", [CHAT, FLAN])
    for ex in mx.load_mixture(data_cfg(tmp_path / "m", heldout_fraction=0.0), tok).tasks["t"].train:
        assert tok.decode(ex.input_ids).startswith("<|im_start|>system\nYou help.")
        assert supervised_text(ex) == ex.answer + IM_END


# ------------------------------------------------------------------------------------------------ sources


def test_jsonl_json_parquet_saved_dataset_in_one_directory(tmp_path):
    import datasets

    d = tmp_path / "mix"
    write_jsonl(d / "a.jsonl", numbered(FLAN, 5))
    (d / "b.json").write_text(json.dumps(numbered(CHAT, 6)))
    datasets.Dataset.from_list(numbered(FLAN, 7)).to_parquet(str(d / "c.parquet"))
    datasets.Dataset.from_list(numbered(FLAN, 8)).save_to_disk(str(d / "d"))
    write_jsonl(d / "e.jsonl", [dict(FLAN, task="named_e")] * 3 + [dict(FLAN, task_name="named_f")] * 2)
    (d / "families.json").write_text(json.dumps({"a": "fam1", "b": "fam2"}))
    (d / "README.md").write_text("not data")
    mix = mx.load_mixture(data_cfg(d), TOKENIZER)
    assert mix.names == ["a", "b", "c", "d", "named_e", "named_f"]  # stems, then task / task_name fields
    sizes = {n: len(t.train) + len(t.heldout) for n, t in mix.tasks.items()}
    assert sizes == {"a": 5, "b": 6, "c": 7, "d": 8, "named_e": 3, "named_f": 2}
    assert (mix.tasks["a"].family, mix.tasks["b"].family, mix.tasks["c"].family) == ("fam1", "fam2", None)


def test_task_list_in_the_config_selects_tasks_from_files(tmp_path):
    both = write_jsonl(tmp_path / "both.jsonl", [dict(FLAN, task="x")] * 3 + [dict(CHAT, task="y")] * 4)
    plain = write_jsonl(tmp_path / "plain.jsonl", [FLAN] * 5)
    write_jsonl(tmp_path / "shards" / "part0.jsonl", [FLAN] * 2)  # one task in shards without task fields
    write_jsonl(tmp_path / "shards" / "part1.jsonl", [FLAN] * 3)
    cfg = data_cfg(tasks=[{"name": "y", "path": str(both), "family": "f"}, {"name": "z", "path": str(plain)},
                          {"name": "s", "path": str(tmp_path / "shards")}])
    mix = mx.load_mixture(cfg, TOKENIZER)
    assert mix.names == ["s", "y", "z"] and mix.tasks["y"].family == "f"
    assert [len(t.train) + len(t.heldout) for t in mix.tasks.values()] == [5, 4, 5]
    assert {e.answer for e in mix.tasks["y"].train} == {"321"}


def test_jsonl_is_streamed_line_by_line(tmp_path):
    """A record after a malformed line is never reached: the reader stops at the line it cannot parse."""
    from merit_jax.data.records import iter_raw

    f = tmp_path / "t.jsonl"
    f.write_text(json.dumps(FLAN) + "\n\n" + json.dumps(CHAT) + "\n{oops\n")
    it = iter_raw(f)
    assert next(it) == (FLAN, f"{f}:1") and next(it) == (CHAT, f"{f}:3")
    with pytest.raises(DataError, match=r"t\.jsonl:4: malformed JSON"):
        next(it)


# ------------------------------------------------------------------------------- counts, splits, truncation


def test_token_counts_match_a_direct_count_and_are_cached(tmp_path, monkeypatch):
    out = synthetic.write_mixture(tmp_path / "syn", seed=0, examples_per_task=24)
    cfg = data_cfg(out)
    mix = mx.load_mixture(cfg, TOKENIZER, workdir=tmp_path / "w")
    for name, task in mix.tasks.items():
        # direct count: tokenise each answer on its own, plus its closing <|im_end|>
        direct = sum(len(TOKENIZER(ex.answer, add_special_tokens=False)["input_ids"]) + 1 for ex in task.train)
        assert task.train_tokens == direct == sum(int(ex.loss_mask.sum()) for ex in task.train)
    cached = list((tmp_path / "w" / "data").glob("train_tokens-*.json"))
    assert len(cached) == 1 and json.loads(cached[0].read_text())["train_tokens"] == mix.train_tokens()

    def no_reload(*a, **k):
        raise AssertionError("counted twice")

    monkeypatch.setattr(mx, "load_mixture", no_reload)
    assert mx.train_token_counts(cfg, TOKENIZER, tmp_path / "w") == mix.train_tokens()
    with pytest.raises(AssertionError, match="counted twice"):  # another max_len is another fingerprint
        mx.train_token_counts(data_cfg(out, max_len=63), TOKENIZER, tmp_path / "w")


def test_heldout_and_calibration_are_seeded_draws(tmp_path, caplog):
    write_jsonl(tmp_path / "m" / "big.jsonl", numbered(FLAN, 40))
    write_jsonl(tmp_path / "m" / "small.jsonl", numbered(FLAN, 6))
    with caplog.at_level(logging.WARNING):
        a = mx.load_mixture(data_cfg(tmp_path / "m", n_calib=8, heldout_fraction=0.3, heldout_max=10), TOKENIZER)
    assert "small" in caplog.text and "n_calib=8" in caplog.text  # fewer than n_calib: all, with a warning
    big, small = a.tasks["big"], a.tasks["small"]
    assert (len(big.heldout), len(big.train), len(big.calib)) == (10, 30, 8)  # min(heldout_max, 0.3 * 40)
    assert (len(small.heldout), len(small.train), len(small.calib)) == (1, 5, 5)  # floor(0.3 * 6)
    assert {id(e) for e in big.calib} <= {id(e) for e in big.train}
    b = mx.load_mixture(data_cfg(tmp_path / "m", n_calib=8, heldout_fraction=0.3, heldout_max=10), TOKENIZER)
    c = mx.load_mixture(data_cfg(tmp_path / "m", n_calib=8, heldout_fraction=0.3, heldout_max=10, seed=1), TOKENIZER)
    prompts = lambda t: [TOKENIZER.decode(e.input_ids) for e in t]
    assert prompts(big.heldout) == prompts(b.tasks["big"].heldout) and prompts(big.calib) == prompts(b.tasks["big"].calib)
    assert prompts(big.heldout) != prompts(c.tasks["big"].heldout)


@pytest.mark.parametrize("mode", ["left", "skip"])
def test_truncation_of_long_prompts_is_applied_and_counted(tmp_path, mode):
    long = {"inputs": "copy: " + "7" * 60, "targets": "12345"}
    write_jsonl(tmp_path / "m" / "t.jsonl", [long] * 3 + numbered(FLAN, 3))
    mix = mx.load_mixture(data_cfg(tmp_path / "m", max_len=40, truncation=mode, heldout_fraction=0.0), TOKENIZER)
    kept = mix.tasks["t"].train
    assert all(len(e) <= 40 and e.loss_mask.any() and not e.loss_mask[0] for e in kept)
    if mode == "skip":
        assert mix.stats["skipped"] == {"t": 3} and mix.stats["truncated"] == {} and len(kept) == 3
        return
    assert mix.stats["truncated"] == {"t": 3} and mix.stats["skipped"] == {} and len(kept) == 6
    cut = [e for e in kept if len(e) == 40]
    assert len(cut) == 3  # the oldest prompt tokens go; the whole answer stays
    assert all(supervised_text(e) == "12345" + IM_END for e in cut)
    assert all(TOKENIZER.decode(e.input_ids[e.prompt_len:]) == "12345" + IM_END + "\n" for e in cut)


def test_right_truncation_keeps_the_prompt_and_cuts_the_answer(tmp_path):
    write_jsonl(tmp_path / "m" / "t.jsonl", [{"inputs": "copy: 12", "targets": "5" * 60}] + numbered(FLAN, 2))
    mix = mx.load_mixture(data_cfg(tmp_path / "m", max_len=40, truncation="right", heldout_fraction=0.0), TOKENIZER)
    assert mix.stats["truncated"] == {"t": 1}
    (cut,) = [e for e in mix.tasks["t"].train if len(e) == 40]
    assert TOKENIZER.decode(cut.input_ids[:cut.prompt_len]) == "<|im_start|>user\ncopy: 12<|im_end|>\n" \
        "<|im_start|>assistant\n"
    assert supervised_text(cut) == "5" * (40 - cut.prompt_len) and cut.answer == "5" * 60


def test_right_truncation_that_leaves_no_answer_skips_and_counts(tmp_path):
    write_jsonl(tmp_path / "m" / "t.jsonl", [{"inputs": "copy: " + "7" * 60, "targets": "1"}] + numbered(FLAN, 2))
    mix = mx.load_mixture(data_cfg(tmp_path / "m", max_len=40, truncation="right", heldout_fraction=0.0), TOKENIZER)
    assert mix.stats["skipped"] == {"t": 1} and len(mix.tasks["t"].train) == 2


# --------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("content,match", [
    ('{"inputs": "a", "targets": "b"}\n{"inputs": "a", \n', r"t\.jsonl:2: malformed JSON"),
    ('{"inputs": "a", "targets": "b"}\n{"inputs": "a"}\n', r"t\.jsonl:2: record has none of 'messages'"),
    ('{"messages": [{"role": "user", "content": "a"}]}\n', r"t\.jsonl:1: conversation has no assistant turn"),
    ('{"messages": [{"role": "bot", "content": "a"}]}\n', r"t\.jsonl:1: unknown role 'bot'"),
    ('{"conversations": [{"from": "human"}]}\n', r"t\.jsonl:1: each turn needs 'from' and 'value'"),
    ('{"inputs": "a", "targets": 3}\n', r"t\.jsonl:1: 'targets' must be a string"),
    ('', r"t\.jsonl: no records \(empty task 't'\)"),
], ids=["malformed-json", "missing-fields", "no-answer", "bad-role", "bad-turn", "bad-type", "empty-task"])
def test_bad_records_name_the_file_line_and_problem(tmp_path, content, match):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "t.jsonl").write_text(content)
    with pytest.raises(DataError, match=match):
        mx.load_mixture(data_cfg(tmp_path / "m"), TOKENIZER)


def test_bad_rows_in_json_and_parquet_are_named(tmp_path):
    import datasets

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "t.json").write_text(json.dumps([FLAN, {"inputs": "x"}]))
    with pytest.raises(DataError, match=r"t\.json \[record 1\]: record has none"):
        mx.load_mixture(data_cfg(tmp_path / "a"), TOKENIZER)
    (tmp_path / "b").mkdir()
    datasets.Dataset.from_list([FLAN, dict(FLAN, targets=None)]).to_parquet(str(tmp_path / "b" / "t.parquet"))
    with pytest.raises(DataError, match=r"t\.parquet row 1: 'targets' must be a string"):
        mx.load_mixture(data_cfg(tmp_path / "b"), TOKENIZER)


def test_duplicate_absent_missing_image_and_all_skipped_tasks(tmp_path):
    write_jsonl(tmp_path / "dup" / "x.jsonl", [FLAN])
    (tmp_path / "dup" / "x.json").write_text(json.dumps([FLAN]))
    with pytest.raises(DataError, match=r"duplicate task name 'x': records in both .*x\.json and .*x\.jsonl"):
        mx.load_mixture(data_cfg(tmp_path / "dup"), TOKENIZER)
    write_jsonl(tmp_path / "dup2" / "x.jsonl", [FLAN])  # a task named by its stem, and by records elsewhere
    write_jsonl(tmp_path / "dup2" / "y.jsonl", [dict(FLAN, task="x")])
    with pytest.raises(DataError, match=r"duplicate task name 'x': records in both .*x\.jsonl and .*y\.jsonl"):
        mx.load_mixture(data_cfg(tmp_path / "dup2"), TOKENIZER)
    write_jsonl(tmp_path / "shards" / "s0.jsonl", [dict(FLAN, task="x")])  # named in records: shards may split
    write_jsonl(tmp_path / "shards" / "s1.jsonl", [dict(FLAN, task="x")])
    assert mx.load_mixture(data_cfg(tmp_path / "shards", heldout_fraction=0.0), TOKENIZER).names == ["x"]
    f = write_jsonl(tmp_path / "a.jsonl", [dict(FLAN, task="x")])
    with pytest.raises(DataError, match=r"data\.tasks: duplicate task name\(s\) \['x'\]"):
        mx.load_mixture(data_cfg(tasks=[{"name": "x", "path": str(f)}, {"name": "x", "path": str(f)}]), TOKENIZER)
    with pytest.raises(DataError, match=r"task 'w' not found in .*a\.jsonl"):
        mx.load_mixture(data_cfg(tasks=[{"name": "w", "path": str(f)}]), TOKENIZER)
    with pytest.raises(DataError, match=r"do not exist: .*w .*nope\.jsonl"):
        mx.load_mixture(data_cfg(tasks=[{"name": "w", "path": str(tmp_path / "nope.jsonl")}]), TOKENIZER)
    v = write_jsonl(tmp_path / "v" / "v.jsonl", [VFLAN])
    with pytest.raises(DataError, match=r"v\.jsonl:1: image not found: .*img/a\.png"):
        mx.load_mixture(data_cfg(v), TOKENIZER)
    write_jsonl(tmp_path / "long" / "t.jsonl", [{"inputs": "9" * 80, "targets": "1"}])
    with pytest.raises(DataError, match=r"task 't': all 1 examples were skipped"):
        mx.load_mixture(data_cfg(tmp_path / "long", max_len=16, truncation="skip"), TOKENIZER)
