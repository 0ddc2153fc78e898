"""The VL benchmark bridge: lmms-eval, with its own Qwen2.5-VL model class, scores the tiny VL run's export on
`merit_heldout_vl` (written by `python -m merit_jax.lmms_eval_task`) as merit_jax's evaluate stage scores the
merged model: the same answers, string for string, and the same exact match.

lmms-eval runs in the evaluation environment of requirements-eval.txt (README: "Benchmarking the export"),
`.venv-eval/` in the checkout, or the one MERIT_EVAL_ENV names. Without it the test skips; with
MERIT_EVAL_ENV set (.ci/run builds the environment and sets it) a missing or broken environment fails.
"""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from merit_jax.config import data_settings
from merit_jax.stages import theta0_of
from tests.test_vl_pipeline import SMALL
from tests.vl_fixtures import (MULTIMODAL_CHAT_TEMPLATE, RELEASE_SIZES, RELEASE_TASKS, multimodal_vl_tokenizer,
                               write_vision_flan_release)

ROOT = Path(__file__).resolve().parents[1]
EVAL_PYTHON = ROOT / (os.environ.get("MERIT_EVAL_ENV") or ".venv-eval") / "bin" / "python"  # relative: to ROOT
# The tiny VL run, trained enough (basin 60 steps) to answer from the image, some answers right and some wrong;
# a quarter of each task held out (4 examples); one image of 150x200 pixels, over the run's 16-token bound, so
# that our resize and lmms-eval's would differ if the task did not resize it first.
RUN = [*SMALL, "--config.basin.steps=60", "--config.data.heldout_fraction=0.25",
       "--config.evaluate.max_new_tokens=6"]
TASKS = dict(RELEASE_TASKS, image_shape=("Is the image wide or tall?", ((200, 150), *RELEASE_SIZES)))


def _eval_python() -> Path:
    required = bool(os.environ.get("MERIT_EVAL_ENV"))
    if not EVAL_PYTHON.is_file():
        msg = f"no evaluation environment at {EVAL_PYTHON.parent.parent} (README: Benchmarking the export)"
        if required:
            pytest.fail(f"MERIT_EVAL_ENV is set but {msg}")
        pytest.skip(msg)
    probe = subprocess.run([str(EVAL_PYTHON), "-c", "import lmms_eval, torchvision.ops, decord"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        (pytest.fail if required else pytest.skip)(f"the evaluation environment is broken:\n{probe.stderr[-2000:]}")
    return EVAL_PYTHON


def _run(cmd, **kw):
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="module")
def bridged(tmp_path_factory):
    """The tiny VL run, its lmms-eval task (the CLI) and lmms-eval's run of the printed command, with samples."""
    python = _eval_python()
    tmp = tmp_path_factory.mktemp("lmms_eval_bridge")
    annotation, image_root = write_vision_flan_release(tmp / "vision_flan", per_task=16, tasks=TASKS)
    flags = [*RUN, f"--config.data.path={annotation}", f"--config.data.image_root={image_root}"]  # shipped tokenizer
    workdir = tmp / "wd"
    env = dict(os.environ, XLA_FLAGS="--xla_backend_optimization_level=0")
    config = ["--config", "configs/tiny_vl.py", "--workdir", str(workdir), *flags]
    _run([sys.executable, "-m", "merit_jax.main", *config], env=env, timeout=900)
    printed = _run([sys.executable, "-m", "merit_jax.lmms_eval_task", *config], env=env, timeout=300).stdout
    command = shlex.split(next(line for line in printed.splitlines() if line.startswith("python -m lmms_eval")))
    # The printed command, on this CPU (lmms-eval's qwen2_5_vl defaults to CUDA) and with its samples logged.
    command[0] = str(python)
    command[command.index("--model_args") + 1] += ",device=cpu,device_map=cpu"
    command[command.index("--output_path") + 1] = str(tmp / "out")
    offline = dict(os.environ, HF_HOME=str(tmp / "hf_home"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = _run([*command, "--log_samples"], env=offline, timeout=600)
    # lmms-eval's CLI exits 0 after an error too: the results file is what says that it ran
    results = sorted((tmp / "out").glob("*/*_results.json"))
    assert results, f"lmms-eval wrote no results:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    samples = [json.loads(line) for line in next((tmp / "out").glob("*/*_samples_merit_heldout_vl.jsonl")).open()]
    cfg = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    return workdir, cfg, json.loads(results[0].read_text()), sorted(samples, key=lambda s: s["doc_id"])


def test_lmms_eval_answers_and_scores_the_export_like_our_evaluate_stage(bridged):
    from merit_jax import artifacts as wd
    from merit_jax.data.mixture import load_mixture, load_tokenizer
    from merit_jax.data.vision import row_images_for
    from merit_jax.evaluation import Evaluator, load_flat
    from merit_jax.io.load import load_model

    workdir, cfg, results, samples = bridged
    # the evaluate stage's Evaluator, as the stage builds it, on the merged model
    tokenizer = load_tokenizer(data_settings(cfg))
    template = load_model(theta0_of(cfg, workdir))
    ev = Evaluator(template, load_mixture(data_settings(cfg), tokenizer, None), tokenizer, max_len=cfg.data.max_len,
                   batch=cfg.evaluate.get("batch_size", 32), max_new_tokens=cfg.evaluate.max_new_tokens,
                   make_images=row_images_for(data_settings(cfg), template))
    ours = ev.answers(load_flat(wd.merged_dir(workdir)))
    theirs = [s["filtered_resps"] for s in samples]
    assert len(theirs) == len(ev.heldout) == 12
    assert theirs == ours
    assert len(set(ours)) > 1  # the answers depend on the image and the question
    assert [s["target"] for s in samples] == [ex.answer for _, ex in ev.heldout]

    # lmms-eval's exact match equals the evaluate stage's (results.json: per-task means of the merged model)
    stage = json.loads((workdir / "evaluate/results.json").read_text())
    counts = stage["data"]["heldout_examples"]
    accuracy = stage["models"]["merit"]["accuracy"]
    want = sum(accuracy[t] * n for t, n in counts.items()) / sum(counts.values())
    assert results["results"]["merit_heldout_vl"]["exact_match,none"] == pytest.approx(want)
    assert 0 < want < 1
    assert [s["exact_match"] for s in samples] == [float(o.strip() == ex.answer.strip())
                                                   for o, (_, ex) in zip(ours, ev.heldout)]


# What lmms-eval's chat Qwen2.5-VL model (lmms_eval/models/chat/qwen2_5_vl.py) feeds the model for each
# document, by its own steps: the task's messages, ChatMessages.to_hf_messages, the processor's chat template,
# qwen_vl_utils.process_vision_info, the processor of the export (with the printed bounds).
_LMMS_INPUTS = """
import json, sys, numpy as np
from lmms_eval.protocol import ChatMessages
from qwen_vl_utils import process_vision_info
from transformers import AutoProcessor
sys.path.insert(0, sys.argv[1])
from merit_heldout_vl_functions import doc_to_messages
processor = AutoProcessor.from_pretrained(sys.argv[2], min_pixels=int(sys.argv[3]), max_pixels=int(sys.argv[4]))
out = {}
for i, line in enumerate(open(sys.argv[1] + "/merit_heldout_vl.jsonl")):
    messages = [ChatMessages(messages=doc_to_messages(json.loads(line))).to_hf_messages()]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    images, _ = process_vision_info(messages)
    x = processor(text=text, images=images, return_tensors="np")
    out.update({f"ids{i}": x["input_ids"][0], f"pixels{i}": x["pixel_values"], f"grid{i}": x["image_grid_thw"]})
np.savez(sys.argv[5], **out)
"""


def test_lmms_eval_feeds_the_model_our_prompt_tokens_and_pixels(bridged, tmp_path):
    """Token for token and pixel for pixel (to float rounding): the image is resized by the task as our
    processor resizes it; without that, lmms-eval's qwen_vl_utils would resize the 150x200 image otherwise."""
    from merit_jax.data import vision as V
    from merit_jax.data.mixture import load_mixture, load_tokenizer
    from merit_jax.lm_eval_task import heldout

    workdir, cfg, _, _ = bridged
    processor = V.processor_for(data_settings(cfg))
    bounds = [str(processor.size["shortest_edge"]), str(processor.size["longest_edge"])]
    _run([str(EVAL_PYTHON), "-c", _LMMS_INPUTS, str(workdir / "lmms_eval"), str(workdir / "hf"), *bounds,
          str(tmp_path / "inputs.npz")], env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=300)
    theirs = np.load(tmp_path / "inputs.npz")
    held = heldout(load_mixture(data_settings(cfg), load_tokenizer(data_settings(cfg)), None))
    assert any(np.prod(_size(ex.image)) > cfg.data.image_max_pixels for _, ex in held)  # the 150x200 one
    for i, (_, ex) in enumerate(held):
        np.testing.assert_array_equal(theirs[f"ids{i}"], ex.input_ids[:ex.prompt_len])
        pixels, grid = V.load_pixels([ex], processor)
        np.testing.assert_array_equal(theirs[f"grid{i}"], grid)
        np.testing.assert_allclose(theirs[f"pixels{i}"], pixels, atol=1e-5)


def _size(path):
    from PIL import Image

    with Image.open(path) as image:
        return image.size


# a template that renders string contents only (as the shipped synthetic VL tokenizer's did before)
STRINGS_ONLY_TEMPLATE = ("{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] "
                         "+ '<|im_end|>' + '\\n' }}{%- endfor %}{%- if add_generation_prompt %}"
                         "{{- '<|im_start|>assistant\\n' }}{%- endif %}")


@pytest.mark.parametrize("template, error", [
    (STRINGS_ONLY_TEMPLATE, "cannot render multimodal messages"),
    (MULTIMODAL_CHAT_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", "<image>"), "another prompt"),
])
def test_the_writer_refuses_a_chat_template_that_would_show_lmms_eval_another_prompt(tmp_path, template, error):
    """(No evaluation environment needed.) A template that cannot render content lists, or renders an image
    part otherwise than our prompt has it, is refused before lmms-eval runs, naming the record or example."""
    import importlib.util

    from merit_jax.data import sources as src
    from merit_jax.data.mixture import load_mixture, load_tokenizer
    from merit_jax.lm_eval_task import heldout
    from merit_jax.lmms_eval_task import write_task

    spec = importlib.util.spec_from_file_location("tiny_vl", ROOT / "configs" / "tiny_vl.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config()
    cfg.data.synthetic.examples_per_task = 12
    cfg.data.tokenizer = str(multimodal_vl_tokenizer(tmp_path / "tokenizer"))
    (tmp_path / "tokenizer" / "chat_template.jinja").write_text(template)
    tokenizer = load_tokenizer(data_settings(cfg))
    held = heldout(load_mixture(data_settings(cfg), tokenizer, tmp_path))
    records = src.iter_records(src.resolve(data_settings(cfg), tmp_path)[0])
    with pytest.raises(ValueError, match=error) as e:
        write_task(held, records, tokenizer, 14, tmp_path / "lmms_eval")
    assert "annotation.json [record" in str(e.value) or "task 'brighter_side'" in str(e.value)
    assert not (tmp_path / "lmms_eval" / "merit_heldout_vl.yaml").exists()
