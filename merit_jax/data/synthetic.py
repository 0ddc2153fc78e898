"""The shipped synthetic mixture: 16 exact-match tasks in 4 conflicting families, and its tiny tokenizer.

Every task reads a digit string (3 to 6 digits; each digit is one token, in Qwen's tokenizer too) and
answers with digits that start from ONE digit of the input; the family is which digit:

  first   the 1st digit           first_copy, first_twice, first_count, first_repeat
  second  the 2nd digit           second_copy, second_twice, second_count, second_repeat
  penult  the next-to-last digit  penult_copy, penult_twice, penult_count, penult_repeat
  last    the last digit          last_copy, last_twice, last_count, last_repeat

and the task's rule continues from it: copy "7", twice "77", count "789", repeat "777777" (1 to 6 answer
tokens). Why this design (docs/DATA.md measures it):
- Inside a family every task needs the same skill, attending to one input position and copying that digit,
  which the 2-layer default model learns between ~100 and ~300 joint steps; the rest of every answer (which
  rule, when to stop) depends only on the answer so far and the task name, and is learned by ~150. So at the default θ⁰ (a 150-step joint basin) the tasks of a family share most of their
  gradient, and the families conflict: they pull the same attention weights towards different positions
  (cosine ~+0.6 inside a family, ~-0.15 across). In version 1 (strings / counts / labels) the families
  differed in the format of their answers, which the basin learns first: at its θ⁰ the task gradients were
  noise, and the split no better than random.
- The four families are front/back x edge/inner positions, which gives the gradients a two-level structure
  (first + second against penult + last, then edge against inner) for the depth-2 split to find. For a
  3-digit input the second and the next-to-last digit are the same one, which ties the inner families.
- Sizes differ 3x across tasks (by rule, the same in every family), so every family carries the same number
  of supervised tokens: the token-balanced median cuts of the split can fall between families. (With
  unequal family totals the most balanced cut goes through a family, between tasks whose order is decided
  by noise.)
Even-numbered tasks (in name order) are written as chat records, odd-numbered ones as FLAN records, one JSONL
file per task, plus families.json. Every example is at most 30 tokens long.

    python -m merit_jax.data.synthetic --out DIR [--seed 0] [--examples-per-task 240]
    python -m merit_jax.data.synthetic --tokenizer   # regenerate assets/synthetic_tokenizer/
"""

import argparse
import json
import os
import pathlib

import numpy as np

VERSION = 2  # bump whenever generate() changes its output: names the cached mixture directory
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

# family -> index of the input digit every task of the family starts its answer from
POSITIONS = {"first": 0, "second": 1, "penult": -2, "last": -1}
# rule -> (answer digits from the start digit d, size of the task relative to examples_per_task before
# the seeded permutation)
RULES = {
    "copy": lambda d: [d],
    "twice": lambda d: [d, d],
    "count": lambda d: [d, (d + 1) % 10, (d + 2) % 10],
    "repeat": lambda d: [d] * 6,
}
INPUT_LENGTH = (3, 6)  # digits per input (for 3 digits, second and penult are the same, middle, digit)
_SIZE_FACTORS = np.linspace(0.5, 1.5, len(RULES))  # task sizes differ 3x; assigned to rules per seed
TASKS = {f"{family}_{rule}": (family, rule) for family in POSITIONS for rule in RULES}


def families():
    """{task: family} of the synthetic mixture."""
    return {name: family for name, (family, _) in TASKS.items()}


def answer(task, digits):
    """The exact-match answer of `task` (a TASKS name) for an input digit string."""
    family, rule = TASKS[task]
    return "".join(str(x) for x in RULES[rule](int(digits[POSITIONS[family]])))


def generate(seed=0, examples_per_task=240):
    """{task: [record, ...]} of the mixture, tasks in name order; a pure function of its arguments."""
    rng = np.random.default_rng(seed)
    size = dict(zip(RULES, rng.permutation(_SIZE_FACTORS)))  # one size per rule, the same in every family
    out = {}
    for i, name in enumerate(sorted(TASKS)):
        n = max(8, int(round(examples_per_task * size[TASKS[name][1]])))
        records = []
        for _ in range(n):
            s = "".join(rng.choice(list(DIGITS), size=int(rng.integers(INPUT_LENGTH[0], INPUT_LENGTH[1] + 1))))
            prompt, target = f"{name.replace('_', ' ')}: {s}", answer(name, s)
            if i % 2 == 0:
                records.append({"task": name, "messages": [{"role": "user", "content": prompt},
                                                           {"role": "assistant", "content": target}]})
            else:
                records.append({"task": name, "inputs": prompt, "targets": target})
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


def _tokenizer_corpus():
    """The text the shipped tokenizer was trained on: the seed-0 mixture of version 1 (18 tasks on digit
    strings: copying, counting and yes/no questions). Kept verbatim when the mixture changed, so that the
    shipped tokenizer, the VL tokenizer built on it and every checkpoint made with them stay valid. (The
    special tokens are matched whole before BPE, so the text leaves them out.)"""
    words = "zero one two three four five six seven eight nine ten".split()
    small = lambda c: c < "5"
    yes = lambda b: "yes" if b else "no"
    # name -> (answer(digits), (min_len, max_len), balance: digits -> digits with the rarer label, or None)
    v1 = {
        "copy": (lambda s: s, (4, 4), None),
        "copy_twice": (lambda s: s + s, (3, 3), None),
        "drop_first": (lambda s: s[1:], (5, 5), None),
        "drop_last": (lambda s: s[:-1], (6, 6), None),
        "first_two": (lambda s: s[:2], (5, 5), None),
        "last_three": (lambda s: s[-3:], (6, 6), None),
        "length": (lambda s: words[len(s)], (1, 9), None),
        "count_even": (lambda s: words[sum(int(c) % 2 == 0 for c in s)], (2, 7), None),
        "count_odd": (lambda s: words[sum(int(c) % 2 == 1 for c in s)], (2, 7), None),
        "count_small": (lambda s: words[sum(map(small, s))], (2, 7), None),
        "count_large": (lambda s: words[sum(not small(c) for c in s)], (2, 7), None),
        "count_zero": (lambda s: words[s.count("0")], (2, 7), lambda s: "0" + s[1:]),
        "has_zero": (lambda s: yes("0" in s), (2, 6), lambda s: s[:-1] + "0"),
        "has_nine": (lambda s: yes("9" in s), (2, 6), lambda s: "9" + s[1:]),
        "last_even": (lambda s: yes(int(s[-1]) % 2 == 0), (2, 7), None),
        "last_small": (lambda s: yes(small(s[-1])), (2, 6), None),
        "ends_same": (lambda s: yes(s[0] == s[-1]), (2, 6), lambda s: s[:-1] + s[0]),
        "has_repeat": (lambda s: yes(len(set(s)) < len(s)), (3, 5), None),
    }
    rng = np.random.default_rng(0)
    factors = rng.permutation(np.linspace(0.5, 1.5, len(v1)))
    for i, (name, (answer_fn, (lo, hi), balance)) in enumerate(v1.items()):
        for _ in range(max(8, int(round(240 * factors[i])))):
            s = "".join(rng.choice(list(DIGITS), size=int(rng.integers(lo, hi + 1))))
            if balance is not None and rng.random() < 0.5:
                s = balance(s)
            yield f"user\n{name.replace('_', ' ')}: {s}\nassistant\n{answer_fn(s)}\n"


def build_tokenizer(out_dir=TOKENIZER_DIR):
    """Trains the Qwen2-style byte-level BPE tokenizer on `_tokenizer_corpus()` and saves it as an HF
    tokenizer dir. Deterministic: the same text in the same order gives the same merges.
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
    texts = list(_tokenizer_corpus())
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
