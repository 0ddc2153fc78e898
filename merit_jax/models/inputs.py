"""What a batch dict feeds the model, for every stage (train, held-out eval, extraction, evaluate).

Text batches: the keys of docs/DATA.md, each [rows, S]. Qwen2.5-VL batches add each row's own images, so
that every array leads with the row axis and shards over the data axes like the text keys:

    pixel_values      float32 [rows, P, C*2*14*14]  the row's patches, zero-padded to P
    mrope_positions   int32   [rows, 3, S]          multimodal RoPE positions (temporal, height, width)
    vision/...        the row's VisionLayout (merit_jax.models.qwen2_5_vl), fields flattened to keys

P and the layout sizes are fitted once per stage on every row it will feed, padding rows included
(merit_jax.data.vision.RowImages, docs/VL.md "Image sizes"), so one compilation serves the stage.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp

from merit_jax.losses import chunked_token_ce

TEXT_KEYS = {"input_ids": 2, "targets": 2, "loss_mask": 2, "segment_ids": 2, "positions": 2}  # key -> ndim
_SEGMENT_FIELDS = ("gather", "piece", "scatter")
_LAYOUT_NDIM = {"patch_order": 1, "unit_restore": 1, "rope_hw": 2, "gather": 2, "piece": 2, "scatter": 1}
VISION_KEYS = {"pixel_values": 3, "mrope_positions": 3,
               **{f"vision/{f}": 1 + _LAYOUT_NDIM[f] for f in ("patch_order", "unit_restore", "rope_hw")},
               **{f"vision/{seg}/{f}": 1 + _LAYOUT_NDIM[f] for seg in ("full", "window") for f in _SEGMENT_FIELDS}}


def batch_keys(vl: bool) -> dict[str, int]:
    """{key: ndim} of a batch dict (with the row axis)."""
    return {**TEXT_KEYS, **VISION_KEYS} if vl else dict(TEXT_KEYS)


def is_vl(batch: Mapping[str, Any]) -> bool:
    return "pixel_values" in batch


def layout_keys(layout) -> dict[str, Any]:
    """A (stacked) VisionLayout as batch-dict entries."""
    out = {f"vision/{f}": getattr(layout, f) for f in ("patch_order", "unit_restore", "rope_hw")}
    for seg in ("full", "window"):
        out.update({f"vision/{seg}/{f}": getattr(getattr(layout, seg), f) for f in _SEGMENT_FIELDS})
    return out


def layout_of(batch: Mapping[str, Any]):
    """The VisionLayout held in a batch dict's vision/ entries."""
    from merit_jax.models.vision_layout import SegmentGather, VisionLayout

    seg = {s: SegmentGather(*(batch[f"vision/{s}/{f}"] for f in _SEGMENT_FIELDS)) for s in ("full", "window")}
    return VisionLayout(batch["vision/patch_order"], batch["vision/unit_restore"], batch["vision/rope_hw"],
                        seg["full"], seg["window"])


def batch_logits(model, batch: Mapping[str, Any]):
    """logits float32 [rows, S, V] of a batch dict (text or VL), inside or outside a trace."""
    if not is_vl(batch):
        return model(batch["input_ids"], positions=batch["positions"], segment_ids=batch["segment_ids"])
    return model(batch["input_ids"], pixel_values=batch["pixel_values"],
                 positions=jnp.moveaxis(jnp.asarray(batch["mrope_positions"]), 1, 0),
                 segment_ids=batch["segment_ids"], vision_layout=layout_of(batch))


def batch_hidden(model, batch: Mapping[str, Any]):
    """Final hidden states [rows, S, D] of a batch dict (text or VL; VL inside a trace only)."""
    if not is_vl(batch):
        return model.hidden(batch["input_ids"], positions=batch["positions"], segment_ids=batch["segment_ids"])
    return model.hidden(batch["input_ids"], pixel_values=batch["pixel_values"],
                        positions=jnp.moveaxis(jnp.asarray(batch["mrope_positions"]), 1, 0),
                        segment_ids=batch["segment_ids"], vision_layout=layout_of(batch))


def batch_token_ce(model, batch: Mapping[str, Any], chunk: int = 0, hits: bool = False):
    """Cross-entropy [rows, S] of every position of a batch dict (and argmax hits with `hits`), the logits
    computed `chunk` positions at a time (model.logits_chunk; merit_jax.losses.chunked_token_ce)."""
    return chunked_token_ce(batch_hidden(model, batch), model.logits, batch["targets"], chunk, hits)
