"""Chat records -> token ids and a loss mask, with the model's own tokenizer and chat template.

The conversation is rendered once by the tokenizer's chat template and tokenised once (fast tokenizer,
batched). Assistant turns are located as character spans: rendering the messages before an assistant turn
with `add_generation_prompt=True` gives the text up to where its content starts, and the span ends with the
turn's closing token (`<|im_end|>`, else the tokenizer's eos), which is supervised too. A token is
supervised when its first character lies in such a span.
"""

import dataclasses
import logging

import numpy as np

from merit_jax.data.records import DataError, Record

log = logging.getLogger(__name__)

QWEN_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
TRUNCATION_MODES = ("left", "right", "skip")
QWEN_VL_IMAGE_TEXT = "<|vision_start|><|image_pad|><|vision_end|>"


@dataclasses.dataclass(eq=False)
class Example:
    """One tokenised example. `loss_mask[i]` is True when token i is supervised (never at i = 0)."""

    task: str
    input_ids: np.ndarray  # int32[L]
    loss_mask: np.ndarray  # bool[L]
    prompt_len: int  # tokens before the last assistant answer: generation starts here
    answer: str  # the last assistant answer, the exact-match reference
    image: str | None = None

    def __len__(self):
        return len(self.input_ids)

    @property
    def supervised_tokens(self):
        return int(self.loss_mask.sum())


class ChatEncoder:
    """Encodes Records with one tokenizer (a transformers fast tokenizer with a chat template)."""

    def __init__(self, tokenizer, images: bool | None = None):
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(f"{tokenizer.name_or_path}: a fast (Rust) tokenizer is needed for offsets")
        if not tokenizer.chat_template:
            raise ValueError(f"{tokenizer.name_or_path}: the tokenizer has no chat_template")
        self.tokenizer = tokenizer
        vocab = tokenizer.get_vocab()
        self.turn_end = "<|im_end|>" if "<|im_end|>" in vocab else tokenizer.eos_token
        # Vision-FLAN's "<image>" becomes Qwen2.5-VL's image placeholder (one <|image_pad|>, which the VL
        # processor expands) for a VL model, or disappears for a text model. `images` None: decided by the
        # vocabulary (Qwen2.5's text tokenizers hold the vision tokens too: the mixture passes it explicitly).
        if images is None:
            images = "<|image_pad|>" in vocab
        self.image_text = QWEN_VL_IMAGE_TEXT if images else ""

    def render(self, conversations, add_generation_prompt=False):
        if not conversations:
            return []
        return self.tokenizer.apply_chat_template(conversations, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def encode(self, records: list[Record]) -> list[Example]:
        convs = [self._with_image_text(r) for r in records]
        full = self.render(convs)
        heads = [(k, i) for k, c in enumerate(convs) for i, m in enumerate(c) if m["role"] == "assistant"]
        prefixes = self.render([convs[k][:i] for k, i in heads], add_generation_prompt=True)
        spans = [[] for _ in records]
        for (k, _), prefix in zip(heads, prefixes):
            if not full[k].startswith(prefix):
                raise DataError(f"{records[k].where}: the chat template of {self.tokenizer.name_or_path} is not "
                                "prefix-stable (the prompt rendered with add_generation_prompt is not a prefix of "
                                "the rendered conversation), so assistant tokens cannot be located")
            end = full[k].find(self.turn_end, len(prefix))
            if end < 0:
                raise DataError(f"{records[k].where}: no {self.turn_end} after an assistant turn in the "
                                "rendered conversation")
            spans[k].append((len(prefix), end + len(self.turn_end)))
        # The Rust tokenizer directly: transformers' per-encoding dict conversion would double the cost.
        encodings = self.tokenizer.backend_tokenizer.encode_batch(full, add_special_tokens=False)
        examples = []
        for k, (r, enc) in enumerate(zip(records, encodings)):
            starts = np.array([o[0] for o in enc.offsets], dtype=np.int64)
            mask = np.zeros(len(starts), dtype=bool)
            for s, e in spans[k]:
                mask |= (starts >= s) & (starts < e)
            mask[:1] = False  # the first token has no predecessor to predict it from
            answer = next(m["content"] for m in reversed(r.messages) if m["role"] == "assistant")
            examples.append(Example(task=r.task, input_ids=np.array(enc.ids, dtype=np.int32),
                                    loss_mask=mask, prompt_len=int(np.searchsorted(starts, spans[k][-1][0])),
                                    answer=answer, image=r.image))
        return examples

    def _with_image_text(self, r):
        if r.image is None:
            return r.messages
        text = self.image_text
        return [dict(m, content=m["content"].replace("<image>\n", text).replace("<image>", text))
                for m in r.messages]


def truncate(ex: Example, max_len: int, mode: str):
    """Applies the truncation rule; returns (example or None when skipped, "kept" | "truncated" | "skipped").

    left: keep the last max_len tokens (drops the oldest prompt tokens; keeps the answer);
    right: keep the first max_len tokens (may cut the answer);
    skip: drop the example. An example left with no supervised token is skipped.
    """
    if mode not in TRUNCATION_MODES:
        raise ValueError(f"data.truncation must be one of {TRUNCATION_MODES}, got {mode!r}")
    n = len(ex.input_ids)
    if n <= max_len:
        return ex, "kept"
    if mode == "skip":
        return None, "skipped"
    cut = slice(n - max_len, n) if mode == "left" else slice(0, max_len)
    mask = ex.loss_mask[cut].copy()
    mask[:1] = False
    if not mask.any():
        return None, "skipped"
    prompt_len = max(ex.prompt_len - (n - max_len), 0) if mode == "left" else min(ex.prompt_len, max_len)
    return dataclasses.replace(ex, input_ids=ex.input_ids[cut].copy(), loss_mask=mask,
                               prompt_len=prompt_len), "truncated"
