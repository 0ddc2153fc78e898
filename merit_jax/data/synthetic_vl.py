"""The synthetic image-task mixture of configs/tiny_vl.py: Vision-FLAN-shaped records with drawn images whose
answers are computed from the drawing (4 tasks in 2 families), and where its shipped tokenizer lives.
Pure generation (numpy, PIL): `merit_jax.data.sources` generates it without importing the VL encoding."""

from __future__ import annotations

import json
import pathlib

import numpy as np

SYNTHETIC_VL_VERSION = 1  # bump whenever write_synthetic_vl_mixture changes its output (names the cached copy)
VL_TOKENIZER_DIR = pathlib.Path(__file__).parent / "assets" / "synthetic_vl_tokenizer"


COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
# task -> (family, question); the answer is computed from the drawn image
SYNTHETIC_VL_TASKS = {
    "color": ("appearance", "What color is the image?"),
    "brighter_side": ("appearance", "Which side is brighter, left or right?"),
    "count_squares": ("layout", "How many white squares are there?"),
    "shape": ("layout", "Is the image wide or tall?"),
}


def _draw(task: str, rng: np.random.Generator, min_side: int, max_side: int):
    from PIL import Image, ImageDraw

    h, w = (int(x) for x in rng.integers(min_side, max_side + 1, size=2))
    if task == "shape" and h == w:
        w += 14
    noise = rng.integers(0, 30, size=(h, w, 3))
    if task == "color":
        answer = str(rng.choice(list(COLORS)))
        pixels = np.clip(np.array(COLORS[answer]) + noise - 15, 0, 255)
    elif task == "brighter_side":
        answer = str(rng.choice(["left", "right"]))
        pixels = noise + 40
        half = slice(0, w // 2) if answer == "left" else slice(w // 2, w)
        pixels[:, half] += 160
    elif task == "count_squares":
        n = int(rng.integers(1, 4))
        answer, pixels = str(n), noise
        image = Image.fromarray(pixels.astype(np.uint8))
        draw = ImageDraw.Draw(image)
        side = max(4, min(h, w) // 5)
        for i in range(n):  # squares on a diagonal band, apart from each other
            x0 = int(i * (w - side) / max(n - 1, 1)) if n > 1 else (w - side) // 2
            y0 = int(rng.integers(0, h - side + 1))
            draw.rectangle([x0, y0, x0 + side - 1, y0 + side - 1], fill=(255, 255, 255))
        return image, answer
    else:  # shape
        answer = "wide" if w > h else "tall"
        pixels = noise + 100
    return Image.fromarray(pixels.astype(np.uint8)), answer


def write_synthetic_vl_mixture(out_dir, seed: int = 0, examples_per_task: int = 24, min_side: int = 28,
                               max_side: int = 84) -> pathlib.Path:
    """Writes OUT/annotation.json (Vision-FLAN records: id, task_name, image, conversations), the PNGs under
    OUT/images/ and OUT/families.json; images resolve against OUT (data.image_root). Deterministic."""
    out = pathlib.Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    records = []
    for task, (_, question) in SYNTHETIC_VL_TASKS.items():
        for i in range(examples_per_task):
            image, answer = _draw(task, rng, min_side, max_side)
            rel = f"images/{task}_{i:04d}.png"
            image.save(out / rel)
            records.append({"id": f"{task}_{i}", "task_name": task, "image": rel, "conversations": [
                {"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]})
    (out / "annotation.json").write_text(json.dumps(records, indent=0) + "\n")
    (out / "families.json").write_text(json.dumps({t: f for t, (f, _) in SYNTHETIC_VL_TASKS.items()}, indent=1))
    return out
