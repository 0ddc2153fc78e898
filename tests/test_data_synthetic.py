"""The shipped synthetic mixture and its tokenizer."""

import json
import time

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
    assert (out / "first_copy.jsonl").read_bytes() != (other / "first_copy.jsonl").read_bytes()
    families = json.loads((out / "families.json").read_text())
    assert len(families) == 16 and set(families) == {f[:-6] for f in files if f.endswith(".jsonl")}
    assert set(families.values()) == {"first", "second", "penult", "last"}
    records = {t: [r for r, _ in iter_raw(out / f"{t}.jsonl")] for t in families}
    sizes = {t: len(r) for t, r in records.items()}
    assert max(sizes.values()) >= 2.5 * min(sizes.values())
    shapes = {("messages" in r[0], "inputs" in r[0]) for r in records.values()}
    assert shapes == {(True, False), (False, True)}  # chat and FLAN records both
    pairs = {t: [_prompt_answer(r) for r in rs] for t, rs in records.items()}
    assert {len(a) for ps in pairs.values() for _, a in ps} == {1, 2, 3, 6}  # answer digits
    # Every family has the same task sizes and answer lengths, so the same supervised tokens.
    by_family = {}
    for t, ps in pairs.items():
        by_family.setdefault(families[t], []).append((len(ps), len(ps[0][1])))
    assert len({tuple(sorted(v)) for v in by_family.values()}) == 1, by_family
    # Semantics, independent of the task table: each family starts its answer from one input digit.
    position = {"first": 0, "second": 1, "penult": -2, "last": -1}
    for t, ps in pairs.items():
        digits = [p.split(": ")[1] for p, _ in ps]
        assert all(d.isdigit() and 3 <= len(d) <= 6 for d in digits), t
        assert all(a[0] == d[position[families[t]]] for d, (_, a) in zip(digits, ps)), t
    assert all(a == d.split(": ")[1][0] for d, a in pairs["first_copy"])
    assert all(a == d.split(": ")[1][-2] * 2 for d, a in pairs["penult_twice"])
    assert all(a == d.split(": ")[1][1] * 6 for d, a in pairs["second_repeat"])
    assert all(a == "".join(str((int(d.split(": ")[1][-1]) + k) % 10) for k in range(3))
               for d, a in pairs["last_count"])
    assert pairs["last_count"][0][0].startswith("last count: ")


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
