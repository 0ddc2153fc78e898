"""The document functions of the `merit_heldout_vl` lmms-eval task. merit_jax.lmms_eval_task copies this file
beside the task's yaml; lmms-eval imports it from there, in its own environment (requirements-eval.txt), so
it imports nothing but Pillow and the standard library.

A document (one line of merit_heldout_vl.jsonl) holds the conversation before the answer as chat messages
whose content is a list of text and image parts, each image's file with the size our image processor resizes
it to, and the reference answer. The image is resized here, once, as our processor resizes it (Pillow,
bicubic), so that lmms-eval's own resizing (qwen_vl_utils, then the model's processor) has nothing left to do
and the model sees the pixels that merit_jax's evaluate stage feeds it.
"""

import json

from PIL import Image


def _image(part):
    with Image.open(part["path"]) as image:
        image = image.convert("RGB")
    size = (part["width"], part["height"])
    return image if image.size == size else image.resize(size, Image.Resampling.BICUBIC)


def doc_to_messages(doc):
    """Chat messages for lmms-eval's chat models: image parts carry the resized PIL image."""
    return [{"role": m["role"], "content": [dict(p, url=_image(p)) if p["type"] == "image" else p
                                            for p in m["content"]]}
            for m in json.loads(doc["messages"])]


def doc_to_visual(doc):
    return [_image(p) for m in json.loads(doc["messages"]) for p in m["content"] if p["type"] == "image"]


def doc_to_text(doc):
    """The text of the last user turn (what lmms-eval's simple models and its logs show)."""
    user = [m for m in json.loads(doc["messages"]) if m["role"] == "user"][-1]
    return "".join(p["text"] for p in user["content"] if p["type"] == "text")


def exact_match(generation: str, answer: str) -> float:
    """merit_jax's exact match (merit_jax.evaluation): the answer up to the end-of-turn token, stripped."""
    return float(generation.strip() == answer.strip())


def process_results(doc, results):
    return {"exact_match": exact_match(results[0], doc["answer"])}
