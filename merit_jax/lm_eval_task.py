"""A local lm-evaluation-harness task from the mixture's held-out examples, so the exported model is scored
by the same tool as the paper's benchmarks:

    python -m merit_jax.lm_eval_task --config configs/default.py --workdir W      # writes W/lm_eval/
    lm_eval --model hf --model_args pretrained=W/hf --include_path W/lm_eval --tasks merit_heldout

Each document is an already chat-templated prompt (decoded from our own prompt tokens) and its reference
answer; the metric is exact match of the generation up to `<|im_end|>`, the same as the `evaluate` stage.
"""

from __future__ import annotations

import json
import pathlib
import sys

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


def write_task(mixture, tokenizer, out_dir, *, max_new_tokens: int = 16, task: str = TASK_NAME) -> pathlib.Path:
    """Writes OUT/TASK.jsonl (one document per held-out example) and OUT/TASK.yaml; returns the yaml path."""
    out = pathlib.Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    data = out / f"{task}.jsonl"
    with data.open("w") as f:
        for name, t in mixture.tasks.items():
            for ex in t.heldout:
                prompt = tokenizer.decode(ex.input_ids[:ex.prompt_len].tolist(), skip_special_tokens=False)
                f.write(json.dumps({"task": name, "prompt": prompt, "answer": ex.answer.strip()}) + "\n")
    stop = "<|im_end|>" if "<|im_end|>" in tokenizer.get_vocab() else tokenizer.eos_token
    yaml = out / f"{task}.yaml"
    yaml.write_text(_YAML.format(task=task, data=data, stop=stop, max_new_tokens=max_new_tokens))
    return yaml


def main(argv=None) -> int:
    from absl import app, flags
    from ml_collections import config_flags

    config = config_flags.DEFINE_config_file("config", "configs/default.py", "Config file.")
    workdir = flags.DEFINE_string("workdir", None, "Work directory.")

    def run(_):
        from merit_jax.data.mixture import load_mixture, load_tokenizer

        cfg = config.value
        wdir = pathlib.Path(workdir.value or cfg.workdir)
        tokenizer = load_tokenizer(cfg)
        yaml = write_task(load_mixture(cfg, tokenizer, wdir), tokenizer, wdir / "lm_eval",
                          max_new_tokens=cfg.evaluate.max_new_tokens)
        print(f"wrote {yaml}\nlm_eval --model hf --model_args pretrained={wdir / 'hf'} "
              f"--include_path {yaml.parent} --tasks {TASK_NAME}")

    app.run(run, argv=argv or sys.argv)
    return 0


if __name__ == "__main__":
    main()
