"""A local lm-evaluation-harness task from the mixture's held-out examples, so the exported model is scored
by the same tool as the paper's benchmarks:

    python -m merit_jax.lm_eval_task --config configs/default.py --workdir W      # writes W/lm_eval/
    lm_eval --model hf --model_args pretrained=W/hf --include_path W/lm_eval --tasks merit_heldout

Each document is an already chat-templated prompt (decoded from our own prompt tokens) and its reference
answer; the metric is exact match of the generation up to `<|im_end|>`, the same as the `evaluate` stage.
The helpers below (held-out order, the answer's stop token, the JSONL and the command line) are shared with
the Qwen2.5-VL task of merit_jax.lmms_eval_task.
"""

from __future__ import annotations

import json
import pathlib
import sys

from merit_jax.config import Settings, settings

TASK_NAME = "merit_heldout"

_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
generation_kwargs:
  until: ["{stop}"]
  do_sample: false
  max_gen_toks: {max_new_tokens}
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def heldout(mixture) -> list:
    """[(task name, Example)] in the evaluate stage's order: tasks by name, each task's held-out examples."""
    held = [(name, ex) for name, t in mixture.tasks.items() for ex in t.heldout]
    if not held:
        raise ValueError("no held-out examples (data.heldout_fraction is 0, or too small for the tasks' sizes?)")
    return held


def stop_token(tokenizer) -> str:
    """The token that ends an answer: `<|im_end|>` (Qwen chat templates), else the tokenizer's eos."""
    return "<|im_end|>" if "<|im_end|>" in tokenizer.get_vocab() else tokenizer.eos_token


def prompt_text(tokenizer, ex) -> str:
    """The example's prompt as text, special tokens kept (decoded from our own prompt tokens)."""
    return tokenizer.decode(ex.input_ids[:ex.prompt_len].tolist(), skip_special_tokens=False)


def write_docs(path: pathlib.Path, docs) -> pathlib.Path:
    """One JSON document a line."""
    with path.open("w") as f:
        for doc in docs:
            f.write(json.dumps(doc) + "\n")
    return path


def write_task(mixture, tokenizer, out_dir, *, max_new_tokens: int = 16, task: str = TASK_NAME) -> pathlib.Path:
    """Writes OUT/TASK.jsonl (one document per held-out example) and OUT/TASK.yaml; returns the yaml path."""
    out = pathlib.Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    data = write_docs(out / f"{task}.jsonl", ({"task": name, "prompt": prompt_text(tokenizer, ex),
                                               "answer": ex.answer.strip()} for name, ex in heldout(mixture)))
    yaml = out / f"{task}.yaml"
    yaml.write_text(_YAML.format(task=task, data=data, stop=stop_token(tokenizer), max_new_tokens=max_new_tokens))
    return yaml


def run_cli(argv, write) -> None:
    """`python -m MODULE --config CONFIG --workdir W`: write(settings, workdir, tokenizer, mixture) writes the task
    and returns the command that scores the export with it, which is printed. Bad input: `error: ...`, exit 2."""
    from absl import app, flags
    from ml_collections import config_flags

    config = config_flags.DEFINE_config_file("config", "configs/default.py", "Config file.")
    workdir = flags.DEFINE_string("workdir", None, "Work directory.")

    def run(_):
        from merit_jax.data.mixture import load_mixture, load_tokenizer

        s = settings(config.value)
        wdir = pathlib.Path(workdir.value or s.workdir).absolute()
        try:
            tokenizer = load_tokenizer(s.data)
            print(write(s, wdir, tokenizer, load_mixture(s.data, tokenizer, wdir)))
        except (ValueError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0

    app.run(run, argv=argv or sys.argv)


def _write(s: Settings, wdir, tokenizer, mixture) -> str:
    yaml = write_task(mixture, tokenizer, wdir / "lm_eval", max_new_tokens=s.evaluate.max_new_tokens)
    return (f"wrote {yaml}\nlm_eval --model hf --model_args pretrained={wdir / 'hf'} "
            f"--include_path {yaml.parent} --tasks {TASK_NAME}")


def main(argv=None) -> int:
    run_cli(argv, _write)
    return 0


if __name__ == "__main__":
    main()
