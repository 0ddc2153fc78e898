"""The shipped synthetic mixture: 18 exact-match tasks in 3 conflicting families, and its tiny tokenizer.

Every task reads the same kind of input, a short digit string (each digit is one token, in Qwen's
tokenizer too), and the families map it to different kinds of output, so they pull shared parameters in
different directions:

  strings  digits -> digits       copy, copy_twice, drop_first, drop_last, first_two, last_three
  counts   digits -> number word  length, count_even, count_odd, count_small, count_large, count_zero
  labels   digits -> yes / no     has_zero, has_nine, last_even, last_small, ends_same, has_repeat

Tasks inside a family share a skill: copying a span (each strings task has a fixed input length, so the
span sits at a fixed offset), counting digits of a kind, or answering yes/no about digits. Sizes differ
3x across tasks and answers run from 1 to 6 tokens; every example is under 30 tokens. A 2-layer d=64
model trained on the whole mixture (batch 16 x 128 tokens, AdamW 3e-3) learns the counts and labels well
above chance within 300 steps and the strings family by ~1000 steps (docs/DATA.md). Even-numbered tasks
are written as chat records, odd-numbered ones as FLAN records, one JSONL file per task, plus
families.json.

    python -m merit_jax.data.synthetic --out DIR [--seed 0] [--examples-per-task 240]
    python -m merit_jax.data.synthetic --tokenizer   # regenerate assets/synthetic_tokenizer/
"""

import argparse
import json
import os
import pathlib

import numpy as np

VERSION = 1  # bump whenever generate() changes its output: names the cached mixture directory
DIGITS = "0123456789"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB_SIZE = 384
TOKENIZER_DIR = pathlib.Path(__file__).parent / "assets" / "synthetic_tokenizer"
# Qwen2.5's template without its default system prompt (examples stay short).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _yes(b):
    return "yes" if b else "no"


NUMBER_WORDS = "zero one two three four five six seven eight nine ten".split()


def _number(n):
    return NUMBER_WORDS[n]


def _small(c):
    return c < "5"


# name -> (family, answer(digits) -> str, (min_len, max_len) of the input, balance: digits -> digits with
# the rarer label, applied to half of the inputs)
TASKS = {
    "copy": ("strings", lambda s: s, (4, 4), None),
    "copy_twice": ("strings", lambda s: s + s, (3, 3), None),
    "drop_first": ("strings", lambda s: s[1:], (5, 5), None),
    "drop_last": ("strings", lambda s: s[:-1], (6, 6), None),
    "first_two": ("strings", lambda s: s[:2], (5, 5), None),
    "last_three": ("strings", lambda s: s[-3:], (6, 6), None),
    "length": ("counts", lambda s: _number(len(s)), (1, 9), None),
    "count_even": ("counts", lambda s: _number(sum(int(c) % 2 == 0 for c in s)), (2, 7), None),
    "count_odd": ("counts", lambda s: _number(sum(int(c) % 2 == 1 for c in s)), (2, 7), None),
    "count_small": ("counts", lambda s: _number(sum(map(_small, s))), (2, 7), None),
    "count_large": ("counts", lambda s: _number(sum(not _small(c) for c in s)), (2, 7), None),
    "count_zero": ("counts", lambda s: _number(s.count("0")), (2, 7), lambda s: "0" + s[1:]),
    "has_zero": ("labels", lambda s: _yes("0" in s), (2, 6), lambda s: s[:-1] + "0"),
    "has_nine": ("labels", lambda s: _yes("9" in s), (2, 6), lambda s: "9" + s[1:]),
    "last_even": ("labels", lambda s: _yes(int(s[-1]) % 2 == 0), (2, 7), None),
    "last_small": ("labels", lambda s: _yes(_small(s[-1])), (2, 6), None),
    "ends_same": ("labels", lambda s: _yes(s[0] == s[-1]), (2, 6), lambda s: s[:-1] + s[0]),
    "has_repeat": ("labels", lambda s: _yes(len(set(s)) < len(s)), (3, 5), None),
}
# Size of each task relative to examples_per_task: sizes differ by up to 3x across tasks.
_SIZE_FACTORS = np.linspace(0.5, 1.5, len(TASKS))


def families():
    """{task: family} of the synthetic mixture."""
    return {name: spec[0] for name, spec in TASKS.items()}


def generate(seed=0, examples_per_task=240):
    """{task: [record, ...]} of the mixture; a pure function of its arguments."""
    rng = np.random.default_rng(seed)
    factors = rng.permutation(_SIZE_FACTORS)
    out = {}
    for i, (name, (_, answer_fn, (lo, hi), balance)) in enumerate(TASKS.items()):
        n = max(8, int(round(examples_per_task * factors[i])))
        records = []
        for _ in range(n):
            s = "".join(rng.choice(list(DIGITS), size=int(rng.integers(lo, hi + 1))))
            if balance is not None and rng.random() < 0.5:
                s = balance(s)
            prompt, answer = f"{name.replace('_', ' ')}: {s}", answer_fn(s)
            if i % 2 == 0:
                records.append({"task": name, "messages": [{"role": "user", "content": prompt},
                                                           {"role": "assistant", "content": answer}]})
            else:
                records.append({"task": name, "inputs": prompt, "targets": answer})
        out[name] = records
    return out


def write_mixture(out_dir, seed=0, examples_per_task=240):
    """Writes OUT/<task>.jsonl, then OUT/families.json; returns OUT as a Path.

    Each file appears whole (written aside, then renamed): processes that generate the same mixture into a
    shared work directory at once never read a half-written file.
    """
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {f"{name}.jsonl": "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records)
             for name, records in generate(seed, examples_per_task).items()}
    files["families.json"] = json.dumps(families(), indent=1) + "\n"
    for name, text in files.items():
        tmp = out_dir / f".{name}.{os.getpid()}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out_dir / name)
    return out_dir


def _chat_text(record):
    messages = record.get("messages") or [{"role": "user", "content": record["inputs"]},
                                          {"role": "assistant", "content": record["targets"]}]
    # The special tokens are matched whole before BPE, so the training text leaves them out.
    return "".join(f"{m['role']}\n{m['content']}\n" for m in messages)


def build_tokenizer(out_dir=TOKENIZER_DIR):
    """Trains the Qwen2-style byte-level BPE tokenizer on seed-0 text and saves it as an HF tokenizer dir.

    Deterministic: the same text in the same order gives the same merges.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from merit_jax.data.tokenize import QWEN_PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    texts = [_chat_text(r) for records in generate(seed=0).values() for r in records]
    tok.train_from_iterator(texts, trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                 unk_token=None, bos_token=None, chat_template=CHAT_TEMPLATE,
                                 model_max_length=512)
    hf.save_pretrained(str(out_dir))
    # Qwen2's class (transformers 4.x and 5.x both load it from tokenizer.json), and the template inline too,
    # for readers that predate chat_template.jinja.
    config_path = pathlib.Path(out_dir) / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.update(tokenizer_class="Qwen2Tokenizer", chat_template=CHAT_TEMPLATE)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return pathlib.Path(out_dir)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="directory to write the mixture to")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--examples-per-task", type=int, default=240)
    p.add_argument("--tokenizer", action="store_true", help="regenerate the shipped tokenizer")
    a = p.parse_args(argv)
    if a.tokenizer:
        print(build_tokenizer())
    if a.out:
        print(write_mixture(a.out, a.seed, a.examples_per_task))


if __name__ == "__main__":
    main()
