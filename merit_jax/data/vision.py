"""Images for Qwen2.5-VL examples: loading with clear errors, transformers' Qwen2-VL image processor (its PIL
backend: Pillow only, no torchvision), image-token expansion, truncation that keeps images whole, batches;
and a small synthetic image-task mixture (Vision-FLAN shaped) with its tokenizer, for tests.

How the pieces fit (the lead wires them into the mixture / extract / train stages):

    processor = image_processor(model_dir, min_pixels=..., max_pixels=...)
    examples = encode_vl_records(records, ChatEncoder(tokenizer), processor, image_token_id=...,
                                 max_image_pixels=data.max_image_pixels)      # tokens expanded, lazily: no pixels
    ex, action = truncate_vl(ex, max_len, mode, vision_ids)                    # never cuts through an image
    batch = vl_batch(examples, rows, seq_len, processor, vision=model.vl_config.vision, bucket=True)
    logits = model(batch["input_ids"], pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                   segment_ids=batch["segment_ids"], vision_layout=batch["vision_layout"])

An example keeps only its image's path and patch grid (read from the file header): pixels are decoded when a
batch is built, so a 190k-image mixture costs no memory up front. The chat encoder renders Vision-FLAN's
`<image>` as `<|vision_start|><|image_pad|><|vision_end|>`; `expand_image_tokens` repeats `<|image_pad|>` to
the t*h*w/4 tokens the processor's grid gives (transformers' `Qwen2_5_VLProcessor` does the same), none of
them supervised.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import threading
from collections.abc import Sequence

import numpy as np

from merit_jax.config import DataSettings
from merit_jax.data.records import DataError, Record
from merit_jax.errors import reading
from merit_jax.artifacts import read_json
from merit_jax.data.synthetic_vl import (SYNTHETIC_VL_TASKS, SYNTHETIC_VL_VERSION,  # noqa: F401
                                        VL_CHAT_TEMPLATE, VL_TOKENIZER_DIR, write_synthetic_vl_mixture)
from merit_jax.data.tokenize import Example, truncate

log = logging.getLogger(__name__)
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
IMAGE_TOKEN = "<|image_pad|>"
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000  # data.max_image_pixels: larger files are refused before decoding


class ImageError(DataError):
    """A record's image is missing, unreadable, or over the configured size limit (names the record)."""


# ---------------------------------------------------------------------------------------------- loading


def _open(path, where: str, max_pixels: int):
    from PIL import Image, UnidentifiedImageError

    path = pathlib.Path(path)
    if not path.is_file():
        raise ImageError(f"{where}: image not found: {path}")
    try:
        image = Image.open(path)  # reads the header only
    except Image.DecompressionBombError as e:
        raise ImageError(f"{where}: image {path} is too large ({e})") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ImageError(f"{where}: unreadable image {path}: {e}") from None
    w, h = image.size
    if w * h > max_pixels:
        image.close()
        raise ImageError(f"{where}: image {path} is {w}x{h} = {w * h} pixels, over the limit "
                         f"data.max_image_pixels={max_pixels}")
    return image


def image_size(path, where: str, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """(height, width) from the file's header; ImageError naming `where` if missing, unreadable, too large."""
    with _open(path, where, max_pixels) as image:
        w, h = image.size
    return h, w


def load_image(path, where: str, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
    """The decoded image as an RGB PIL image; ImageError naming `where` on a bad file."""
    image = _open(path, where, max_pixels)
    try:
        image.load()  # decodes: a truncated or corrupt body fails here
        return image.convert("RGB")
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageError(f"{where}: unreadable image {path}: {e}") from None
    finally:
        image.close()


# -------------------------------------------------------------------------------------------- processor


def image_processor(model_dir=None, *, min_pixels: int | None = None, max_pixels: int | None = None):
    """transformers' `Qwen2VLImageProcessorPil`, configured by MODEL_DIR/preprocessor_config.json when there is
    one (a released Qwen2.5-VL ships it), with min/max pixel bounds overridden when given."""
    from transformers import Qwen2VLImageProcessorPil

    overrides = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v}
    if model_dir and (pathlib.Path(model_dir) / "preprocessor_config.json").is_file():
        with reading(pathlib.Path(model_dir) / "preprocessor_config.json", "image processor config"):
            return Qwen2VLImageProcessorPil.from_pretrained(str(model_dir), **overrides)
    return Qwen2VLImageProcessorPil(**overrides)


def image_grid(processor, height: int, width: int) -> tuple[int, int, int]:
    """The (t, h, w) patch grid the processor gives an image of this size (its own `smart_resize`)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    factor = processor.patch_size * processor.merge_size
    rh, rw = smart_resize(height, width, factor=factor, min_pixels=processor.size["shortest_edge"],
                          max_pixels=processor.size["longest_edge"])
    return 1, rh // processor.patch_size, rw // processor.patch_size


def preprocess(processor, images) -> tuple[np.ndarray, np.ndarray]:
    """(pixel_values float32 [P, C*2*14*14], image_grid_thw int32 [N, 3]) of PIL images, as the processor
    computes them (resize, rescale, normalise, patchify)."""
    out = processor(images=list(images), return_tensors="np")
    return np.asarray(out["pixel_values"], np.float32), np.asarray(out["image_grid_thw"], np.int32)


# ----------------------------------------------------------------------------------------------- tokens


def vision_token_ids(tokenizer) -> dict[str, int]:
    """{token: id} of the vision special tokens; ValueError when the tokenizer lacks them."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in VISION_TOKENS[:3] if t not in vocab]
    if missing:
        raise ValueError(f"{tokenizer.name_or_path}: the tokenizer has no {missing} token(s): not a Qwen2.5-VL "
                         "tokenizer (see merit_jax.data.vision.add_vision_tokens)")
    return {t: vocab[t] for t in VISION_TOKENS if t in vocab}


def expand_image_tokens(input_ids: np.ndarray, loss_mask: np.ndarray, grids: np.ndarray, image_token_id: int,
                        merge_size: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Repeats the i-th image token to grids[i].prod() / merge_size^2 tokens (never supervised)."""
    slots = np.flatnonzero(input_ids == image_token_id)
    if len(slots) != len(grids):
        raise ImageError(f"{where}: {len(slots)} image placeholder(s) in the text for {len(grids)} image(s) "
                         "(a record with an image needs exactly one '<image>' in its turns)")
    repeats = np.ones(len(input_ids), np.int64)
    repeats[slots] = np.asarray(grids, np.int64).prod(-1) // (merge_size * merge_size)
    mask = np.repeat(loss_mask, repeats)
    mask[np.repeat(input_ids == image_token_id, repeats)] = False
    return np.repeat(input_ids, repeats).astype(np.int32), mask


@dataclasses.dataclass(eq=False)
class VLExample(Example):
    """An Example whose image tokens are expanded; pixels are loaded when a batch is built.

    image_grid_thw int32 [N, 3] (N = 0 for a text-only example); `where` names the record in errors."""

    image_grid_thw: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 3), np.int32))
    where: str = ""

    @property
    def images(self) -> list[str]:
        return [self.image] if self.image else []


def _grid_of(processor, path, where: str, max_image_pixels: int) -> tuple[int, int, int]:
    h, w = image_size(path, where, max_image_pixels)
    try:
        return image_grid(processor, h, w)
    except ValueError as e:  # smart_resize refuses aspect ratios over 200 (a 1-pixel strip, say)
        raise ImageError(f"{where}: image {path} ({w}x{h}) cannot be resized for the model: {e}") from None


def to_vl_example(example: Example, where: str, processor, *, image_token_id: int,
                  max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> VLExample:
    """Reads the image's header (size, validity), computes its grid and expands its tokens."""
    images = [example.image] if example.image else []
    grids = np.array([_grid_of(processor, p, where, max_image_pixels) for p in images], np.int32).reshape(-1, 3)
    ids, mask = expand_image_tokens(example.input_ids, example.loss_mask, grids, image_token_id,
                                    processor.merge_size, where)
    slots = np.flatnonzero(example.input_ids == image_token_id)
    added = grids.prod(-1) // processor.merge_size ** 2 - 1  # tokens each image adds
    prompt_len = example.prompt_len + int(added[slots < example.prompt_len].sum())
    base = {f.name: getattr(example, f.name) for f in dataclasses.fields(Example)}
    base.update(input_ids=ids, loss_mask=mask, prompt_len=prompt_len)
    return VLExample(**base, image_grid_thw=grids, where=where)


def encode_vl_records(records: Sequence[Record], encoder, processor, *, image_token_id: int,
                      max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> list[VLExample]:
    """Records -> VLExamples: the chat encoder's tokens with each image's tokens expanded."""
    return [to_vl_example(ex, r.where, processor, image_token_id=image_token_id, max_image_pixels=max_image_pixels)
            for r, ex in zip(records, encoder.encode(list(records)))]


def truncate_vl(ex: VLExample, max_len: int, mode: str, vision_ids):
    """`tokenize.truncate`, except that an example whose cut would lose any vision token (`vision_ids`: the
    ids of `vision_token_ids(tokenizer)`) is skipped: an image is fed whole, with its start/end markers, or
    not at all. Returns (example or None, "kept" | "truncated" | "skipped")."""
    out, action = truncate(ex, max_len, mode)
    if out is not None and action == "truncated":
        ids = np.asarray(sorted(set(vision_ids)))
        if np.isin(out.input_ids, ids).sum() != np.isin(ex.input_ids, ids).sum():
            return None, "skipped"
    return out, action


# ---------------------------------------------------------------------------------------------- batches


def load_pixels(examples: Sequence[VLExample], processor,
                max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[np.ndarray, np.ndarray]:
    """(pixel_values [P, D], image_grid_thw [N, 3]) of the examples' images, in order; checks each grid
    against the one its tokens were expanded for (an image replaced on disk is named)."""
    pixels, grids = [], []
    for ex in examples:
        for path in ex.images:
            pv, grid = preprocess(processor, [load_image(path, ex.where, max_image_pixels)])
            pixels.append(pv)
            grids.append(grid)
        got = np.concatenate(grids[len(grids) - len(ex.images):] or [np.zeros((0, 3), np.int32)])
        if not np.array_equal(got, ex.image_grid_thw):
            raise ImageError(f"{ex.where}: image grid {got.tolist()} differs from {ex.image_grid_thw.tolist()} "
                             "computed when the example was encoded (was the image file changed?)")
    patch_dim = 3 * processor.temporal_patch_size * processor.patch_size ** 2
    if not pixels:
        return np.zeros((0, patch_dim), np.float32), np.zeros((0, 3), np.int32)
    return np.concatenate(pixels), np.concatenate(grids).astype(np.int32)


def vl_batch(examples: Sequence[VLExample], rows: Sequence[Sequence[int]], seq_len: int, processor, *,
             vision=None, bucket: bool = False, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> dict:
    """The batch dict of packed `rows` (example indices per row, as `packing.plan_rows` gives), plus
    pixel_values float32 [P, D] and image_grid_thw int32 [N, 3] of the rows' images in row-major order, and,
    with `vision` (a VisionConfig), the host-computed `vision_layout` for jit.

    bucket: pad P and N (and the layout) to powers of two (zero pixels, zero grid rows) so few shapes recur.
    """
    from merit_jax.data.packing import TokenTable

    batch = TokenTable(list(examples)).rows([list(r) for r in rows], seq_len)
    order = [examples[i] for r in rows for i in r]
    pixel_values, grid = load_pixels(order, processor, max_image_pixels)
    if vision is not None and len(grid):
        from merit_jax.models.vision_layout import vision_layout

        layout = vision_layout(grid, vision, bucket=bucket)
        batch["vision_layout"] = layout
        pixel_values = np.pad(pixel_values, ((0, layout.num_patches - len(pixel_values)), (0, 0)))
    if bucket and len(grid):
        grid = np.pad(grid, ((0, (1 << (len(grid) - 1).bit_length()) - len(grid)), (0, 0)))
    batch["pixel_values"], batch["image_grid_thw"] = pixel_values, grid
    return batch


class RowImages:
    """The per-row image inputs of batches of packed rows (merit_jax.models.inputs: pixel_values [R, P, D],
    mrope_positions [R, 3, S], the stacked vision layout), with sizes fixed by `fit` on every row a run will
    see, so that one compilation serves the run. Rows are lists of indices into `examples` (VLExamples, or
    plain Examples for text-only rows).

        images = RowImages(examples, processor, vl_config).fit(rows)
        batch = images.add(TokenTable(examples).rows(some_rows, seq_len), some_rows)

    The sizes cover the fitted rows and padding rows (`layout_sizes`). A batch with a row that was not fitted
    and does not fit grows them (`grown_sizes`: a new shape, so one more compilation, logged) in a single
    process; with several processes that is an error, since every process must agree on the shapes: there,
    fit every row first (the stages do).
    """

    def __init__(self, examples: Sequence[Example], processor, vl_config,
                 max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
        self.examples, self.processor, self.vl = examples, processor, vl_config
        self.max_image_pixels = max_image_pixels
        self.sizes = None
        self._lock = threading.Lock()  # batches are built by several loader threads

    def grids(self, row: Sequence[int]) -> np.ndarray:
        got = [getattr(self.examples[i], "image_grid_thw", None) for i in row]
        return np.concatenate([g for g in got if g is not None] + [np.zeros((0, 3), np.int32)]).astype(np.int32)

    def fit(self, rows: Sequence[Sequence[int]]) -> "RowImages":
        """Fixes the array sizes to cover `rows` (and padding rows); returns self."""
        from merit_jax.models.vision_layout import layout_sizes

        self.sizes = layout_sizes([self.grids(r) for r in rows], self.vl.vision)
        return self

    def _cover(self, rows: list[list[int]]):
        """The sizes to build these rows with: the fitted ones, grown when a row does not fit them (see the
        class docstring)."""
        import jax

        from merit_jax.models.vision_layout import fits, grown_sizes

        sizes = self.sizes
        misfits = [r for r in rows if not fits(self.grids(r), sizes, self.vl.vision)]
        if not misfits:
            return sizes
        where = [self.examples[i].where for i in misfits[0]]
        if jax.process_count() > 1:
            raise ValueError(f"row of {where}: its images {self.grids(misfits[0]).tolist()} do not fit the vision "
                             f"layout sizes {self.sizes} fitted for this run; with several processes every row "
                             "must be fitted up front (RowImages.fit) so that all processes agree on the shapes")
        with self._lock:  # another thread may have grown them meanwhile
            old = self.sizes
            misfits = [r for r in misfits if not fits(self.grids(r), old, self.vl.vision)]
            if not misfits:
                return old
            self.sizes = sizes = grown_sizes(old, [self.grids(r) for r in misfits], self.vl.vision)
        log.warning("vision layout sizes grown from %s to %s for the row of %s (not fitted up front): one more "
                    "compilation", tuple(old), tuple(sizes), where)
        return sizes

    def add(self, batch: dict, rows: Sequence[Sequence[int]]) -> dict:
        """`batch` (the text keys of these rows; more rows than `rows` are padding rows) plus the vision keys."""
        import jax

        from merit_jax.models.inputs import layout_keys
        from merit_jax.models.mrope import mrope_positions
        from merit_jax.models.vision_layout import next_pow2, stacked_layouts

        if self.sizes is None:
            raise RuntimeError("RowImages.fit(rows) first: it fixes the array sizes of the run")
        n_rows = len(batch["input_ids"])
        rows = [list(r) for r in rows] + [[]] * (n_rows - len(rows))
        sizes = self._cover(rows)
        grids = [self.grids(r) for r in rows]
        pixels = np.zeros((n_rows, sizes.num_patches, self.vl.vision.patch_dim), np.float32)
        for j, r in enumerate(rows):
            if len(grids[j]):
                pv, _ = load_pixels([self.examples[i] for i in r], self.processor, self.max_image_pixels)
                pixels[j, :len(pv)] = pv
        tokens = ((np.asarray(batch["input_ids"]) == self.vl.image_token_id) & (np.asarray(batch["segment_ids"]) > 0))
        for j, r in enumerate(rows):  # each image token must pick a feature of its own row
            want = int(grids[j].prod(-1).sum()) // self.vl.vision.merge_unit
            if int(tokens[j].sum()) != want:
                raise ImageError(f"{[self.examples[i].where for i in r]}: the row holds {int(tokens[j].sum())} image "
                                 f"tokens, its images {grids[j].tolist()} need {want}")
        every = np.concatenate(grids)
        # zero grid rows (they own no token) up to a power of two: the eager host ops compile per image count
        every = np.pad(every, ((0, next_pow2(len(every)) - len(every)), (0, 0))) if len(every) else every
        with jax.default_device(jax.devices("cpu")[0]):  # host-side data work: never on the accelerator
            positions, _ = mrope_positions(batch["input_ids"], every if len(every) else None,
                                           image_token_id=self.vl.image_token_id,
                                           spatial_merge_size=self.vl.vision.spatial_merge_size,
                                           segment_ids_bt=batch["segment_ids"])
        layout = stacked_layouts(grids, self.vl.vision, sizes)
        return {**batch, "pixel_values": pixels, "mrope_positions": np.asarray(positions).transpose(1, 0, 2),
                **layout_keys(layout)}


# ------------------------------------------------------------------------- tokenizer and synthetic mixture




def build_vl_tokenizer(out_dir=VL_TOKENIZER_DIR) -> pathlib.Path:
    """Regenerates the shipped tokenizer of the synthetic VL mixture (configs/tiny_vl.py): the synthetic
    tokenizer plus the vision tokens, and a default Qwen2-VL preprocessor_config.json."""
    import merit_jax.data.synthetic as synthetic

    add_vision_tokens(synthetic.TOKENIZER_DIR, out_dir)
    (pathlib.Path(out_dir) / "chat_template.jinja").write_text(VL_CHAT_TEMPLATE)
    image_processor().save_pretrained(str(out_dir))
    return pathlib.Path(out_dir)


def processor_for(data: DataSettings):
    """The run's image processor: the preprocessor_config.json of model.hf_path, else of the tokenizer
    directory (transformers' defaults, with a warning, without one), resized within data.image_min_pixels /
    data.image_max_pixels when set."""
    from merit_jax.data.sources import tokenizer_dir

    d = data
    places = [p for p in (data.model_path, tokenizer_dir(data)) if p]
    found = next((p for p in places if (pathlib.Path(p) / "preprocessor_config.json").is_file()), None)
    if found is None:
        log.warning("no preprocessor_config.json in %s: transformers' default Qwen2-VL image processor settings",
                    places)
    return image_processor(found, min_pixels=int(d.image_min_pixels) or None,
                           max_pixels=int(d.image_max_pixels) or None)


def max_image_pixels_of(data: DataSettings) -> int:
    """data.max_image_pixels (0 or unset: DEFAULT_MAX_IMAGE_PIXELS)."""
    return int(data.max_image_pixels or DEFAULT_MAX_IMAGE_PIXELS)


def row_images_for(data: DataSettings, model):
    """examples -> RowImages for a Qwen2.5-VL model (the run's processor and image size limit); None for a
    text model. What the train, extract and evaluate stages build their image inputs with."""
    vl = getattr(model, "vl_config", None)
    if vl is None:
        return None
    processor = processor_for(data)
    max_pixels = max_image_pixels_of(data)
    return lambda examples: RowImages(examples, processor, vl, max_pixels)


def is_vl_run(data: DataSettings) -> bool:
    """Whether the run's model is a Qwen2.5-VL: model.model_type for a random start, else the model_type in
    model.hf_path's config.json (decided by the model, not the tokenizer: Qwen2.5's text tokenizers hold the
    vision tokens too)."""
    path = data.model_path
    if not path:
        return data.model_type == "qwen2_5_vl"
    config = pathlib.Path(path) / "config.json"
    return config.is_file() and read_json(config).get("model_type") == "qwen2_5_vl"


class ImageEncoding:
    """Turns a tokenised record into a VLExample (image tokens expanded; a record whose text holds image
    tokens without an image is an error naming it) and truncates it without cutting an image: the mixture's
    step for every record of a Qwen2.5-VL run."""

    def __init__(self, data: DataSettings, tokenizer):
        self.processor = processor_for(data)
        self.ids = vision_token_ids(tokenizer)
        self.max_image_pixels = max_image_pixels_of(data)

    def __call__(self, ex: Example, where: str, max_len: int, mode: str):
        """(VLExample or None, "kept" | "truncated" | "skipped")."""
        ex = to_vl_example(ex, where, self.processor, image_token_id=self.ids[IMAGE_TOKEN],
                           max_image_pixels=self.max_image_pixels)
        return truncate_vl(ex, max_len, mode, self.ids.values())


def add_vision_tokens(tokenizer_dir, out_dir) -> pathlib.Path:
    """A copy of a tokenizer with Qwen2.5-VL's vision special tokens appended (for tiny test models)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tok.add_special_tokens({"additional_special_tokens": list(VISION_TOKENS)})
    tok.save_pretrained(str(out_dir))
    return pathlib.Path(out_dir)
