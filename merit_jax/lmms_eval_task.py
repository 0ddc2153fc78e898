"""A local lmms-eval task from a Qwen2.5-VL mixture's held-out examples, so the exported model is scored by
the tool of the paper's VL benchmarks, with its own Qwen2.5-VL model class:

    python -m merit_jax.lmms_eval_task --config configs/qwen2_5_vl_3b.py --workdir W      # writes W/lmms_eval/
    python -m lmms_eval --model qwen2_5_vl --model_args pretrained=W/hf,min_pixels=M,max_pixels=N \
        --include_path W/lmms_eval --tasks merit_heldout_vl --batch_size 1 --output_path OUT

(the command prints M and N: the run's image-size bounds, which lmms-eval would otherwise replace by its own
defaults). Each document is the conversation before the answer as chat messages (text and image parts, the
image at the `<image>` placeholder of the record), the image file with the size our processor resizes it to,
and the reference answer. lmms-eval's chat model renders the messages with the model's chat template and
generates greedily up to the tokenizer's end of turn; the metric is merit_jax's exact match
(merit_jax/lmms_eval_functions.py, copied beside the yaml). The writer checks that the chat template renders
every document's messages to exactly our prompt, so the model sees the tokens merit_jax's evaluate stage
feeds it.
"""

from __future__ import annotations

import json
import pathlib
import re
import shutil

from merit_jax.config import Settings
from merit_jax.lm_eval_task import heldout, prompt_text, run_cli, stop_token, write_docs

TASK_NAME = "merit_heldout_vl"
FUNCTIONS = pathlib.Path(__file__).with_name("lmms_eval_functions.py")
IMAGE_PLACEHOLDER = re.compile(r"<image>\n?")  # as merit_jax.data.tokenize.ChatEncoder replaces it
_IMAGE_PADS = re.compile(r"(<\|image_pad\|>)+")

_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_messages: !function {functions}.doc_to_messages
doc_to_visual: !function {functions}.doc_to_visual
doc_to_text: !function {functions}.doc_to_text
doc_to_target: answer
process_results: !function {functions}.process_results
generation_kwargs:
  until: ["{stop}"]
  max_new_tokens: {max_new_tokens}
  temperature: 0
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def prompt_messages(record) -> list[dict]:
    """The record's turns before its last answer, each content a list of text and image parts."""
    last = max(i for i, m in enumerate(record.messages) if m["role"] == "assistant")
    out = []
    for m in record.messages[:last]:
        texts = IMAGE_PLACEHOLDER.split(m["content"])
        parts = [{"type": "text", "text": texts[0]}]
        for text in texts[1:]:
            parts += [{"type": "image"}, {"type": "text", "text": text}]
        out.append({"role": m["role"], "content": [p for p in parts if p.get("text", True)]})
    return out


def render(tokenizer, messages, where: str) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # jinja's errors have no common base worth naming
        raise ValueError(f"{where}: the chat template of {tokenizer.name_or_path} cannot render multimodal "
                         f"messages (content as a list of image and text parts), which lmms-eval's Qwen2.5-VL "
                         f"model renders through the processor: {type(e).__name__}: {e}") from None


def match_records(held, records, tokenizer) -> list[list[dict]]:
    """The prompt messages of each held-out example: those of a record of its task and image whose messages
    the chat template renders to exactly the example's prompt (its image tokens collapsed to one each)."""
    wanted = {}  # (task, image, prompt) -> indices into held, in order
    for i, (name, ex) in enumerate(held):
        key = (name, ex.image, _IMAGE_PADS.sub("<|image_pad|>", prompt_text(tokenizer, ex)))
        wanted.setdefault(key, []).append(i)
    candidates = {key[:2] for key in wanted}
    found, left = [None] * len(held), len(held)
    for r in records:
        if (r.task, r.image) not in candidates:
            continue
        messages = prompt_messages(r)
        indices = wanted.get((r.task, r.image, render(tokenizer, messages, r.where)))
        if indices:
            found[indices.pop(0)], left = messages, left - 1
            if not left:
                break
    missing = [i for i, m in enumerate(found) if m is None]
    if missing:
        name, ex = held[missing[0]]
        raise ValueError(f"{len(missing)} held-out example(s) have no record whose messages the chat template of "
                         f"{tokenizer.name_or_path} renders to their prompt (first: task {name!r}, image "
                         f"{ex.image}): lmms-eval would see another prompt (the template renders image parts "
                         f"otherwise than '<image>' text, or the example was truncated)")
    return found


def write_task(held, records, tokenizer, patch_size: int, out_dir, *, max_new_tokens: int = 16,
               task: str = TASK_NAME) -> pathlib.Path:
    """Writes OUT/TASK.jsonl (one document per held-out example, `held`: [(task, VLExample)]), OUT/TASK.yaml
    and the task's functions; `records` are the mixture's records (merit_jax.data.sources.iter_records) and
    patch_size the image processor's. Returns the yaml path."""
    out = pathlib.Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    docs = []
    for (name, ex), messages in zip(held, match_records(held, records, tokenizer)):
        sizes = iter([(int(h) * patch_size, int(w) * patch_size) for _, h, w in ex.image_grid_thw])
        for part in (p for m in messages for p in m["content"] if p["type"] == "image"):
            (part["height"], part["width"]), part["path"] = next(sizes), str(pathlib.Path(ex.image).absolute())
        docs.append({"task": name, "messages": json.dumps(messages), "answer": ex.answer,
                     "prompt": prompt_text(tokenizer, ex)})
    data = write_docs(out / f"{task}.jsonl", docs)
    functions = f"{task}_functions"
    shutil.copyfile(FUNCTIONS, out / f"{functions}.py")
    yaml = out / f"{task}.yaml"
    yaml.write_text(_YAML.format(task=task, data=data, functions=functions, stop=stop_token(tokenizer),
                                 max_new_tokens=max_new_tokens))
    return yaml


def model_args(hf_dir, processor) -> str:
    """lmms-eval's --model_args for the export: its directory and our image-size bounds (lmms-eval's
    qwen2_5_vl otherwise resizes every image to at least 256 tokens)."""
    return (f"pretrained={hf_dir},min_pixels={processor.size['shortest_edge']},"
            f"max_pixels={processor.size['longest_edge']}")


def _write(s: Settings, wdir, tokenizer, mixture) -> str:
    from merit_jax.data import sources as src
    from merit_jax.data.vision import is_vl_run, processor_for

    if not is_vl_run(s.data):
        raise ValueError("not a Qwen2.5-VL run: its held-out task for lm-evaluation-harness is written by "
                         "`python -m merit_jax.lm_eval_task`")
    processor = processor_for(s.data)
    records = src.iter_records(src.resolve(s.data, wdir)[0], s.data.image_root)
    yaml = write_task(heldout(mixture), records, tokenizer, processor.patch_size, wdir / "lmms_eval",
                      max_new_tokens=s.evaluate.max_new_tokens)
    return (f"wrote {yaml}\npython -m lmms_eval --model qwen2_5_vl --model_args {model_args(wdir / 'hf', processor)} "
            f"--include_path {yaml.parent} --tasks {TASK_NAME} --batch_size 1 --output_path OUT")


def main(argv=None) -> int:
    run_cli(argv, _write)
    return 0


if __name__ == "__main__":
    main()
