"""merit_jax.data: task mixtures (reading, tokenising, splitting, counting) and the Grain training stream.

See docs/DATA.md for the formats and rules.
"""

from merit_jax.data.mixture import Mixture, TaskData, load_mixture, load_tokenizer, train_token_counts
from merit_jax.data.packing import TokenTable, pad_batch, plan_rows
from merit_jax.data.pipeline import make_train_iterator, num_train_steps, steps_per_epoch
from merit_jax.data.records import DataError, Record
from merit_jax.data.sources import synthetic_dir, tokenizer_dir
from merit_jax.data.tokenize import ChatEncoder, Example, truncate

__all__ = [
    "ChatEncoder", "DataError", "Example", "Mixture", "Record", "TaskData", "TokenTable", "load_mixture",
    "load_tokenizer", "make_train_iterator", "num_train_steps", "pad_batch", "plan_rows", "steps_per_epoch",
    "synthetic_dir", "tokenizer_dir", "train_token_counts", "truncate",
]
