"""Tiny random Qwen2.5-VL models (transformers' own classes) and image prompts for the VL tests."""

from __future__ import annotations

import numpy as np
import torch
import transformers

from merit_jax.models.qwen2_5_vl import tiny_vl_hf_config

VOCAB = 151
TOKEN_IDS = {"<|vision_start|>": 146, "<|vision_end|>": 147, "<|image_pad|>": 148, "<|video_pad|>": 149}
IMAGE, START, END = TOKEN_IDS["<|image_pad|>"], TOKEN_IDS["<|vision_start|>"], TOKEN_IDS["<|vision_end|>"]
PATCH_DIM = 3 * 2 * 14 * 14
# (t, h, w) patch grids: a window-padded one (3x5 merged units against 2x2 windows), a square one whose
# merged grid the windows divide exactly, and a tall one.
GRIDS = {"wide": (1, 6, 10), "square": (1, 4, 4), "tall": (1, 8, 2)}


def tiny_vl(path, seed: int = 0, std: float = 0.1, tie_word_embeddings: bool = True, **text):
    """Saves a random Qwen2_5_VLForConditionalGeneration to `path`; returns it (fp32, eval mode)."""
    cfg = tiny_vl_hf_config(VOCAB, TOKEN_IDS, tie_word_embeddings=tie_word_embeddings, text=text)
    torch.manual_seed(seed)
    model = transformers.Qwen2_5_VLForConditionalGeneration(transformers.Qwen2_5_VLConfig(**cfg)).eval()
    with torch.no_grad():  # HF's init leaves biases at zero and norms at one: randomise everything
        for p in model.parameters():
            p.normal_(0.0, std)
    model.save_pretrained(path)
    return model


def pixels(grids, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random pixel_values [P, 1176] and image_grid_thw [N, 3] for named grids."""
    thw = np.array([GRIDS[g] for g in grids], np.int64).reshape(-1, 3)
    return np.random.RandomState(seed).randn(int(thw.prod(-1).sum()), PATCH_DIM).astype(np.float32), thw


def image_tokens(grid_name: str) -> list[int]:
    t, h, w = GRIDS[grid_name]
    return [START] + [IMAGE] * (t * h * w // 4) + [END]


def prompt(*parts, seed: int = 0) -> list[int]:
    """Token ids: an int n gives n random text tokens, a grid name that image's tokens."""
    rng = np.random.RandomState(seed)
    out = []
    for p in parts:
        out += list(rng.randint(0, 140, p)) if isinstance(p, int) else image_tokens(p)
    return [int(x) for x in out]


def token_types(ids: np.ndarray) -> np.ndarray:
    """What transformers' processor returns as mm_token_type_ids (1 at image tokens); its model needs it to
    build M-RoPE positions (without it, it falls back to 1-D positions)."""
    return (np.asarray(ids) == IMAGE).astype(np.int64)


def torch_logits(model, ids, pixel_values=None, grid=None, mask=None) -> np.ndarray:
    kw = {"input_ids": torch.tensor(ids), "mm_token_type_ids": torch.tensor(token_types(ids))}
    if pixel_values is not None:
        kw.update(pixel_values=torch.tensor(pixel_values), image_grid_thw=torch.tensor(grid))
    if mask is not None:
        kw["attention_mask"] = torch.tensor(mask)
    with torch.no_grad():
        return model(**kw).logits.numpy()


def random_vl_model(hf_cfg: dict, seed: int = 0, std: float = 0.02):
    """A Qwen2_5_VLForConditionalGeneration with numpy-drawn weights (norm scales 1, biases 0, the rest
    N(0, std)): on CPU, compiling jax.random for each of its ~70 tensors costs far more than the test."""
    import jax.numpy as jnp
    from flax import nnx

    from merit_jax.models import params as P
    from merit_jax.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration

    abstract = nnx.eval_shape(lambda: Qwen2_5_VLForConditionalGeneration.from_hf_config(hf_cfg, rngs=nnx.Rngs(0)))
    graphdef, abs_state = nnx.split(abstract)
    rng = np.random.default_rng(seed)

    def draw(path, var):
        leaf = P.path_name(path).rsplit("/", 1)[-1]
        value = (np.ones(var.shape) if leaf == "scale" else np.zeros(var.shape) if leaf == "bias"
                 else rng.normal(0.0, std, var.shape))
        return var.replace(jnp.asarray(value, var.dtype))

    return nnx.merge(graphdef, nnx.map_state(draw, abs_state))


# (height, width) of the JPEGs of `write_vision_flan_release` (the 64x64, 96x64, 64x112, 140x84,
# 56x168 as width x height): square, wide, tall, very tall; 64 and 112 are no multiples of 28 (the
# processor's smart_resize rounds them). Two tasks hold square and tall images only, so a branch without
# `image_shape` sees none of the wide ones.
RELEASE_SIZES = ((64, 64), (64, 96), (112, 64), (84, 140), (168, 56))
RELEASE_TASKS = {  # task -> (question, sizes of its images, cycled)
    "VQA_color": ("What color is the image?", ((168, 56), (64, 64), (112, 64))),
    "count_objects": ("How many objects are in the image?", ((112, 64), (168, 56), (64, 64))),
    "image_shape": ("Is the image wide or tall?", RELEASE_SIZES),
}


def write_vision_flan_release(out, per_task: int = 10, seed: int = 0):
    """A small Vision-FLAN-format release in OUT: `annotation_191-task_1k.json` (the public schema: id,
    task_name, image relative to the image folder, conversations; ids repeat across tasks, as in the
    release) and `images_191task_1k/<task>/` with JPEGs of RELEASE_SIZES. Returns (annotation, image root)."""
    import json
    import pathlib

    from PIL import Image

    out = pathlib.Path(out)
    root = out / "images_191task_1k"
    rng = np.random.default_rng(seed)
    colors = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}
    records = []
    for task, (question, sizes) in RELEASE_TASKS.items():
        (root / task).mkdir(parents=True, exist_ok=True)
        for i in range(per_task):
            h, w = sizes[i % len(sizes)]
            color = list(colors)[int(rng.integers(len(colors)))]
            pixels = np.clip(np.array(colors[color]) + rng.integers(-20, 20, (h, w, 3)), 0, 255).astype(np.uint8)
            rel = f"{task}/{i:03d}.jpg"
            Image.fromarray(pixels).save(root / rel, quality=90)
            answer = {"VQA_color": color, "count_objects": str(1 + i % 3),
                      "image_shape": "wide" if w > h else "tall" if h > w else "square"}[task]
            records.append({"id": str(i), "task_name": task, "image": rel, "conversations": [
                {"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]})
    annotation = out / "annotation_191-task_1k.json"
    annotation.write_text(json.dumps(records))
    return annotation, root
