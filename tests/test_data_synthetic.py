"""The shipped synthetic mixture and its tokenizer."""

import json
import time

import numpy as np
from transformers import AutoTokenizer

from merit_jax.data import synthetic
from merit_jax.data.records import iter_raw


def test_generation_is_fast_deterministic_and_has_conflicting_families(tmp_path):
    start = time.perf_counter()
    out = synthetic.write_mixture(tmp_path / "a", seed=5, examples_per_task=240)
    assert time.perf_counter() - start < 2.0
    again = synthetic.write_mixture(tmp_path / "b", seed=5, examples_per_task=240)
    other = synthetic.write_mixture(tmp_path / "c", seed=6, examples_per_task=240)
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(p.name for p in again.iterdir())
    assert all((out / f).read_bytes() == (again / f).read_bytes() for f in files)
    assert (out / "copy.jsonl").read_bytes() != (other / "copy.jsonl").read_bytes()
    families = json.loads((out / "families.json").read_text())
    assert len(families) >= 16 and set(families) == {f[:-6] for f in files if f.endswith(".jsonl")}
    assert set(families.values()) == {"strings", "counts", "labels"}
    records = {t: [r for r, _ in iter_raw(out / f"{t}.jsonl")] for t in families}
    sizes = [len(r) for r in records.values()]
    assert max(sizes) >= 2.5 * min(sizes)
    shapes = {("messages" in r[0], "inputs" in r[0]) for r in records.values()}
    assert shapes == {(True, False), (False, True)}  # chat and FLAN records both
    pairs = {t: [_prompt_answer(r) for r in rs] for t, rs in records.items()}
    answer_lengths = {len(a) for t, ps in pairs.items() if families[t] == "strings" for _, a in ps}
    assert max(answer_lengths) >= 3 * min(answer_lengths)
    # Same inputs, different kinds of output per family: digits, number words, yes/no.
    kinds = {"strings": str.isdigit, "counts": synthetic.NUMBER_WORDS.__contains__, "labels": ("yes", "no").__contains__}
    for t, ps in pairs.items():
        assert all(p.split(": ")[1].isdigit() and 1 <= len(p.split(": ")[1]) <= 9 for p, _ in ps), t
        assert all(kinds[families[t]](a) for _, a in ps), t
    # Spot checks of the semantics (independent of the task table):
    assert all(a == d.split(": ")[1] for d, a in pairs["copy"])
    assert all(a == synthetic.NUMBER_WORDS[len(d.split(": ")[1])] for d, a in pairs["length"])
    assert all((a == "yes") == ("0" in d.split(": ")[1]) for d, a in pairs["has_zero"])
    for t in ("has_zero", "has_nine", "ends_same", "last_even"):  # labels are not one-sided
        assert 0.25 < np.mean([a == "yes" for _, a in pairs[t]]) < 0.75, t


def _prompt_answer(r):
    if "messages" in r:
        return r["messages"][0]["content"], r["messages"][1]["content"]
    return r["inputs"], r["targets"]


def test_shipped_tokenizer_loads_offline_and_round_trips_the_chat_template():
    tok = AutoTokenizer.from_pretrained(synthetic.TOKENIZER_DIR)
    assert 300 <= len(tok) <= 512
    assert (tok.pad_token, tok.eos_token) == ("<|endoftext|>", "<|im_end|>")
    assert [tok.convert_tokens_to_ids(t) for t in synthetic.SPECIAL_TOKENS] == [0, 1, 2]
    messages = [{"role": "user", "content": "copy twice: 907"}, {"role": "assistant", "content": "907907"}]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == "<|im_start|>user\ncopy twice: 907<|im_end|>\n<|im_start|>assistant\n907907<|im_end|>\n"
    assert tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True) == \
        "<|im_start|>user\ncopy twice: 907<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert ids.count(tok.convert_tokens_to_ids("<|im_end|>")) == 2
    digits = tok("907907", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(digits) == list("907907")  # one token per digit, as in Qwen's tokenizer
    assert tok.decode(tok("unseen Ünïcode ✓", add_special_tokens=False)["input_ids"]) == "unseen Ünïcode ✓"


def test_tokenizer_regenerates_identically(tmp_path):
    out = synthetic.build_tokenizer(tmp_path / "tok")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_text() == (synthetic.TOKENIZER_DIR / name).read_text(), name
