"""The "merit_jax checkpoint": a self-describing directory holding a flat dict of parameters.

    CKPT/merit_jax.json    {"format": "merit_jax", "version": 1}   (written last: marks the directory complete)
    CKPT/config.json       the model's Hugging Face config
    CKPT/<tokenizer files> tokenizer.json, tokenizer_config.json, ... when a tokenizer directory was given
    CKPT/params/           an Orbax PyTree checkpoint of {name: array}, names "/"-joined parameter paths
                           such as "model/layers/0/self_attn/q_proj/kernel"

Everything is written into a hidden temporary directory next to CKPT and renamed into place at the end, so a
directory that exists under the final name is always complete. On several hosts every process takes part in
the Orbax save (each writes the shards it owns); only process 0 writes the json files and renames.

`save` writes a flat dict held in memory with one Orbax save; `Writer` writes the same format a few tensors at
a time (Orbax partial saving), for a model that should never be whole in memory (the merge's output).
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from merit_jax.errors import InputFileError, reading
from merit_jax.models.names import name_key

if TYPE_CHECKING:
    import jax

# jax and orbax are imported where they are used: a Hugging Face merge (merit_jax/merging/) uses this
# module's file helpers and should not pay seconds and ~150 MiB of resident memory for importing them.

logger = logging.getLogger(__name__)

FORMAT_NAME = "merit_jax"
FORMAT_VERSION = 1
MARKER_FILE = "merit_jax.json"
CONFIG_FILE = "config.json"
PARAMS_DIR = "params"

# Files copied from a tokenizer / processor directory when present (text and VL models).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "processor_config.json",
)


class CheckpointError(InputFileError):
    """A directory is not a (complete) merit_jax checkpoint, or a request does not fit the checkpoint."""


PathLike = str | os.PathLike


# ----------------------------------------------------------------------------------------------- helpers


def _is_primary() -> bool:
    import jax

    return jax.process_index() == 0


def _sync(tag: str) -> None:
    import jax
    from jax.experimental import multihost_utils

    # A barrier only matters (and only costs) when there are several processes.
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(tag)


def _temp_dir_for(path: pathlib.Path) -> pathlib.Path:
    # Deterministic (not random) so that every host agrees on it without communication.
    return path.parent / f".{path.name}.merit_jax-tmp"


def fsync_dir(path: pathlib.Path) -> None:
    """Makes the entries of directory `path` (files created or renamed in it) durable; best effort."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_atomic(path: PathLike, obj: Any) -> None:
    """Writes json to `path` via a temporary file and rename (a reader never sees half a file)."""
    from merit_jax.artifacts import write_json

    write_json(path, obj, sort_keys=True)


def has_tokenizer(directory: PathLike) -> bool:
    """Whether `directory` holds tokenizer / processor files worth copying along."""
    return any((pathlib.Path(directory) / name).is_file() for name in TOKENIZER_FILES)


def copy_tokenizer_files(src_dir: PathLike, dst_dir: PathLike) -> list[str]:
    """Copies the tokenizer / processor files of TOKENIZER_FILES present in `src_dir`; returns their names."""
    src_dir, dst_dir = pathlib.Path(src_dir), pathlib.Path(dst_dir)
    if not src_dir.is_dir():
        raise FileNotFoundError(f"tokenizer directory {src_dir} does not exist")
    copied = []
    for name in TOKENIZER_FILES:
        if (src_dir / name).is_file():
            shutil.copyfile(src_dir / name, dst_dir / name)
            copied.append(name)
    if not copied:
        logger.warning("no tokenizer files (%s) found in %s", ", ".join(TOKENIZER_FILES[:2]), src_dir)
    return copied


def _check_params(params: Mapping[str, Any]) -> None:
    if not isinstance(params, Mapping) or not params:
        raise ValueError("params must be a non-empty dict {name: array}")
    for name, value in params.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"parameter names must be non-empty strings, got {name!r}")
        if not (hasattr(value, "shape") and hasattr(value, "dtype")):
            raise TypeError(f"parameter {name!r} is a {type(value).__name__}, not an array")


# ------------------------------------------------------------------------------------------ inspection


def checkpoint_problem(path: PathLike) -> str | None:
    """None if `path` is a complete merit_jax checkpoint, else a sentence saying what is wrong."""
    path = pathlib.Path(path)
    if not path.exists():
        return f"{path} does not exist"
    if not path.is_dir():
        return f"{path} is not a directory"
    marker = path / MARKER_FILE
    if not marker.is_file():
        if (path / CONFIG_FILE).is_file() and any(path.glob("*.safetensors")):
            return f"{path} has no {MARKER_FILE}: it looks like a Hugging Face directory, not a merit_jax checkpoint"
        return f"{path} has no {MARKER_FILE}: not a merit_jax checkpoint (or an incomplete one)"
    try:
        meta = json.loads(marker.read_text())
    except (OSError, ValueError) as e:
        return f"{marker} is unreadable: {e}"
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        return f"{marker} does not say format={FORMAT_NAME!r}: {meta!r}"
    if meta.get("version") != FORMAT_VERSION:
        return f"{marker} has version {meta.get('version')!r}; this merit_jax reads version {FORMAT_VERSION}"
    if not (path / CONFIG_FILE).is_file():
        return f"incomplete checkpoint: {path / CONFIG_FILE} is missing"
    if not (path / PARAMS_DIR / "_METADATA").is_file():
        return f"incomplete checkpoint: {path / PARAMS_DIR} holds no finished Orbax checkpoint (_METADATA missing)"
    return None


def is_checkpoint(path: PathLike) -> bool:
    """True if `path` is a complete merit_jax checkpoint directory."""
    return checkpoint_problem(path) is None


def check_checkpoint(path: PathLike) -> pathlib.Path:
    """Returns `path` as an absolute Path (Orbax needs one), or raises CheckpointError naming what is missing."""
    problem = checkpoint_problem(path)
    if problem is not None:
        raise CheckpointError(problem)
    return pathlib.Path(path).absolute()


def read_hf_config(path: PathLike) -> dict:
    """The model's Hugging Face config stored with the checkpoint."""
    from merit_jax.artifacts import read_json

    return read_json(check_checkpoint(path) / CONFIG_FILE)


def _tree_metadata(path: pathlib.Path) -> Mapping[str, Any]:
    import orbax.checkpoint as ocp

    from etils import epath

    # The handler's own metadata (the tree), not the Checkpointer's: a Writer-made params/ has no Checkpointer
    # step metadata (_CHECKPOINT_METADATA), only the PyTree's.
    with reading(path / PARAMS_DIR, "merit_jax checkpoint's tensor metadata"):
        meta = ocp.PyTreeCheckpointHandler().metadata(epath.Path(path / PARAMS_DIR))
    # orbax >= 0.11 returns a TreeMetadata wrapping the tree; older ones the tree itself.
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    if not isinstance(tree, Mapping):
        raise CheckpointError(f"{path / PARAMS_DIR}: unexpected Orbax metadata {type(tree).__name__}, not a flat dict")
    return tree


def tensor_specs(path: PathLike) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{name: (shape, dtype)} of every stored tensor, from Orbax metadata alone (no tensor data is read)."""
    path = check_checkpoint(path)
    return {
        name: (tuple(int(s) for s in m.shape), np.dtype(m.dtype))
        for name, m in sorted(_tree_metadata(path).items(), key=lambda item: name_key(item[0]))
    }


# ---------------------------------------------------------------------------------------------- saving


def _check_save_args(path: pathlib.Path, hf_config, tokenizer_dir, overwrite: bool, extra_json) -> None:
    # Everything that can fail is checked before any process writes (a late failure on process 0 alone
    # would leave the others waiting at a barrier).
    if not isinstance(hf_config, Mapping):
        raise TypeError(f"hf_config must be a dict, got {type(hf_config).__name__}")
    if tokenizer_dir is not None and not pathlib.Path(tokenizer_dir).is_dir():
        raise FileNotFoundError(f"tokenizer directory {tokenizer_dir} does not exist")
    for name in extra_json or {}:
        if name in (MARKER_FILE, CONFIG_FILE) or "/" in name or name.startswith(".") or name == PARAMS_DIR:
            raise ValueError(f"extra_json file name {name!r} is reserved or not a plain file name")
    for what, obj in [(CONFIG_FILE, dict(hf_config)), *(extra_json or {}).items()]:
        try:
            json.dumps(obj)
        except (TypeError, ValueError) as e:
            raise TypeError(f"{what}: not json-serialisable: {e}") from e
    if path.exists() and not overwrite:
        if not path.is_dir() or any(path.iterdir()):
            what = "a merit_jax checkpoint" if is_checkpoint(path) else "a non-empty path"
            raise FileExistsError(f"{path} is already {what}; pass overwrite=True to replace it")


def _start_temp_dir(path: pathlib.Path) -> pathlib.Path:
    """The (fresh, empty) hidden temporary directory every process writes `path` into."""
    tmp = _temp_dir_for(path)
    if _is_primary():
        # A leftover temp dir is the remains of a killed save: never complete, safe to discard.
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _sync(f"merit_jax.io.checkpoint.save.mkdir:{path}")
    return tmp


def _finish(tmp: pathlib.Path, path: pathlib.Path, hf_config, tokenizer_dir, extra_json) -> None:
    """Writes the json files into `tmp` (process 0), then renames it to `path` once every process is done."""
    if _is_primary():
        write_json_atomic(tmp / CONFIG_FILE, dict(hf_config))
        if tokenizer_dir is not None:
            copy_tokenizer_files(tokenizer_dir, tmp)
        for name, obj in (extra_json or {}).items():
            write_json_atomic(tmp / name, obj)
        # The marker goes last: its presence is what makes a directory a checkpoint.
        write_json_atomic(tmp / MARKER_FILE, {"format": FORMAT_NAME, "version": FORMAT_VERSION})
        fsync_dir(tmp)
    _sync(f"merit_jax.io.checkpoint.save.written:{path}")
    if _is_primary():
        replace_dir(tmp, path)
    _sync(f"merit_jax.io.checkpoint.save.renamed:{path}")


def save(
    path: PathLike,
    params: Mapping[str, Any],
    hf_config: Mapping[str, Any],
    tokenizer_dir: PathLike | None = None,
    *,
    overwrite: bool = False,
    extra_json: Mapping[str, Any] | None = None,
) -> pathlib.Path:
    """Writes a merit_jax checkpoint atomically; returns its path.

    params: flat {name: numpy array | jax.Array} (jax.Arrays may be sharded over hosts: every process must
      call save with its part). Stored dtypes are kept exactly (bf16 stays bf16). The whole dict is written
      by one Orbax save; to write a model a few tensors at a time, use `Writer`.
    hf_config: the model's Hugging Face config dict (written as config.json).
    tokenizer_dir: a directory whose tokenizer / processor files (TOKENIZER_FILES) are copied along.
    overwrite: replace an existing checkpoint (or any existing non-empty directory) at `path`; without it
      that is refused with FileExistsError.
    extra_json: {file name: json-able object} written into the checkpoint too (e.g. how it was made).
    """
    path = pathlib.Path(path).absolute()
    _check_params(params)
    _check_save_args(path, hf_config, tokenizer_dir, overwrite, extra_json)
    import orbax.checkpoint as ocp

    tmp = _start_temp_dir(path)
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
        ckptr.save(tmp / PARAMS_DIR, args=ocp.args.PyTreeSave(dict(params)))
    _finish(tmp, path, hf_config, tokenizer_dir, extra_json)
    logger.info("saved %d tensors to %s", len(params), path)
    return path


class Writer:
    """Writes a merit_jax checkpoint a few tensors at a time, so that the model is never whole in memory.

        with checkpoint.Writer(path, hf_config, tokenizer_dir=None, overwrite=False, extra_json=None) as w:
            for part in parts:          # {name: array}, each name once in all
                w.write(part)
            w.commit()                  # -> path, complete
        # leaving the block without commit() (an exception) discards everything written

    The result is the same version-1 checkpoint `save` writes: `params/` is one Orbax PyTree checkpoint of the
    flat dict, built with Orbax's partial saving (`orbax.checkpoint.experimental.v1.partial`): each `write`
    adds its tensors to a pending partial checkpoint, `commit` finalizes it (a metadata-only merge of the
    parts' OCDBT databases) and then renames the whole directory into place as `save` does. Each write is
    written in the background while the caller prepares the next one (at most one write in flight), so the
    memory in use is about two parts whatever the model's size. Each write costs more than the one before
    (Orbax reads every earlier part's metadata): write in a few dozen parts at most, not tensor by tensor.

    Several processes: every process makes the same calls with the same names; jax.Arrays sharded over the
    processes are written shard by shard by the processes that own them (numpy arrays by process 0 only).
    """

    def __init__(
        self,
        path: PathLike,
        hf_config: Mapping[str, Any],
        tokenizer_dir: PathLike | None = None,
        *,
        overwrite: bool = False,
        extra_json: Mapping[str, Any] | None = None,
    ):
        self.path = pathlib.Path(path).absolute()
        _check_save_args(self.path, hf_config, tokenizer_dir, overwrite, extra_json)
        self._hf_config, self._tokenizer_dir, self._extra_json = dict(hf_config), tokenizer_dir, extra_json
        self._names: set[str] = set()
        self._pending = None  # the AsyncResponse of the write in flight
        self._done = False
        self._tmp = _start_temp_dir(self.path)
        # Orbax's partial-save target; its finalized PyTree becomes params/ (see commit).
        self._partial = self._tmp / f"{PARAMS_DIR}-partial"  # not hidden: Orbax globs for its parts

    def write(self, params: Mapping[str, Any]) -> None:
        """Adds tensors {name: array} (names not written before); returns once the previous write is on disk."""
        if self._done:
            raise RuntimeError(f"{self.path}: write after commit / abort")
        if not params:
            return
        _check_params(params)
        again = [name for name in params if name in self._names]
        if again:
            raise ValueError(f"{self.path}: tensor {again[0]!r} was already written")
        from orbax.checkpoint.experimental.v1 import partial as ocp_partial

        self._wait()
        self._names.update(params)
        self._pending = ocp_partial.save_async(self._partial, dict(params))

    def _wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def commit(self) -> pathlib.Path:
        """Finishes the checkpoint and renames it into place (every process calls it); returns its path."""
        if self._done:
            raise RuntimeError(f"{self.path}: commit after commit / abort")
        if not self._names:
            raise ValueError(f"{self.path}: nothing was written")
        from orbax.checkpoint.experimental.v1 import partial as ocp_partial

        self._wait()
        ocp_partial.finalize(self._partial)  # barriers inside: every process's parts are on disk after it
        if _is_primary():
            # The finalized partial checkpoint holds the PyTree in one subdirectory (v1's checkpointable layout);
            # that directory alone is a complete Orbax PyTree checkpoint: it becomes params/.
            trees = [p for p in self._partial.iterdir() if (p / "_METADATA").is_file()]
            if len(trees) != 1:
                raise RuntimeError(f"{self._partial}: expected one Orbax PyTree in the finalized partial save, "
                                   f"found {[p.name for p in trees]}")
            os.replace(trees[0], self._tmp / PARAMS_DIR)
            shutil.rmtree(self._partial)
        _finish(self._tmp, self.path, self._hf_config, self._tokenizer_dir, self._extra_json)
        self._done = True
        logger.info("saved %d tensors to %s", len(self._names), self.path)
        return self.path

    def abort(self) -> None:
        """Discards everything written (the final path is left as it was)."""
        if self._done:
            return
        self._done = True
        try:
            self._wait()
        except Exception:  # noqa: BLE001 - aborting anyway; the caller's exception is the one that matters
            pass
        if _is_primary():
            shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> "Writer":
        return self

    def __exit__(self, *exc) -> None:
        self.abort()  # a no-op after commit()


def replace_dir(src: pathlib.Path, dst: pathlib.Path) -> None:
    """Renames directory `src` to `dst`, moving an existing `dst` aside first and deleting it afterwards.

    Between the two renames `dst` is briefly absent, never half-written.
    """
    src, dst = pathlib.Path(src), pathlib.Path(dst)
    old = None
    if dst.exists():
        old = dst.parent / f".{dst.name}.merit_jax-old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
    os.replace(src, dst)
    fsync_dir(dst.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------- loading


def load(
    path: PathLike,
    names: Sequence[str] | None = None,
    shardings: jax.sharding.Sharding | Mapping[str, jax.sharding.Sharding] | None = None,
) -> dict[str, Any]:
    """Restores all tensors (names=None) or the named subset.

    shardings: None returns numpy arrays (stored dtype, on the host). Otherwise one jax Sharding for every
      tensor, or {name: Sharding} covering every requested name; each process then reads only the shards
      it owns, so a large model is never whole on one device or host.
    """
    with Reader(path) as reader:
        return reader.read(names, shardings)


class Reader:
    """An open checkpoint for many partial restores (metadata read once, one Orbax checkpointer reused).

        with checkpoint.Reader(path) as r:
            r.specs, r.hf_config            # {name: (shape, dtype)}, config.json
            r.read(["a", "b"])              # as `load(path, names, shardings)`
    """

    def __init__(self, path: PathLike):
        import orbax.checkpoint as ocp

        self.path = check_checkpoint(path)
        self.specs = tensor_specs(self.path)
        self.hf_config = read_hf_config(self.path)
        self._ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())

    def read(
        self,
        names: Sequence[str] | None = None,
        shardings: jax.sharding.Sharding | Mapping[str, jax.sharding.Sharding] | None = None,
    ) -> dict[str, Any]:
        import orbax.checkpoint as ocp

        specs = self.specs
        if names is None:
            wanted = list(specs)
        else:
            wanted = list(dict.fromkeys(names))
            missing = [n for n in wanted if n not in specs]
            if missing:
                raise KeyError(f"{self.path}: no tensor named {missing[0]!r} ({len(missing)} requested names missing)")
        if not wanted:
            return {}

        restore_args = {}
        for name in wanted:
            shape, dtype = specs[name]
            if shardings is None:
                restore_args[name] = ocp.RestoreArgs(restore_type=np.ndarray, dtype=dtype)
                continue
            if isinstance(shardings, Mapping):
                if name not in shardings:
                    raise KeyError(f"shardings has no entry for tensor {name!r}")
                sharding = shardings[name]
            else:
                sharding = shardings
            restore_args[name] = ocp.ArrayRestoreArgs(sharding=sharding, global_shape=shape, dtype=dtype)

        item = {name: 0 for name in wanted}  # only the keys matter with partial_restore
        where = f" (tensors {wanted[0]!r}..{wanted[-1]!r})" if len(wanted) > 1 else f" (tensor {wanted[0]!r})"
        with reading(self.path / PARAMS_DIR, "merit_jax checkpoint", where):
            restored = self._ckptr.restore(
                self.path / PARAMS_DIR,
                args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                            partial_restore=len(wanted) < len(specs)),
            )
        return {name: restored[name] for name in wanted}

    def close(self) -> None:
        self._ckptr.close()

    def __enter__(self) -> "Reader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
