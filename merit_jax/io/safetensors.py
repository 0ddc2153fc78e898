"""Safetensors, the tensor files of Hugging Face directories: ONE reader and ONE streaming writer.

Every Hugging Face directory merit_jax reads or writes goes through here: loading and exporting models
(convert/hf.py) and merging HF checkpoints (merging/). A file is an 8-byte little-endian header length, a JSON
header {name: {dtype, shape, data_offsets}, "__metadata__": {...}}, then the tensors' bytes; a directory holds
`model.safetensors`, or shards `model-0000i-of-0000n.safetensors` listed by `model.safetensors.index.json`.

Reading uses positioned reads (os.preadv), not a memory map: every page a map touches counts as resident
memory of the process until the map goes, so merging K mapped models would look (and, under memory limits,
be) K models large. Positioned reads also let several threads read one file at once.

Writing streams: each shard's header is planned from the tensors' specs and written first, then the bytes are
appended as they are produced, so no shard and no whole tensor is ever held in memory.

Shard size: one bound, MAX_SHARD_BYTES = 5 GB (5·10⁹ bytes), the Hugging Face hub's `max_shard_size="5GB"`
(huggingface_hub's split_*_state_dict_into_shards, transformers 4's save_pretrained; public Qwen2.5 releases
ship ~4 GB shards under it). `python -m merit_jax.merge` always wrote 5GB shards; the exporter's 2 GiB dated
from holding a whole shard in memory (safetensors.save_file), which the streaming writer never does, so the
bound no longer costs memory and only the file count and the hub convention are left to choose by.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Mapping, Sequence

import ml_dtypes
import numpy as np

from merit_jax.io import checkpoint
from merit_jax.errors import InputFileError, describe
from merit_jax.artifacts import read_json

INDEX_FILE = "model.safetensors.index.json"
MAX_SHARD_BYTES = 5 * 10**9  # Hugging Face's "5GB" (see the module docstring)
_MAX_HEADER_BYTES = 1 << 28
_READ_BLOCK_BYTES = 64 << 20  # a slice across columns is read in row blocks of at most this many bytes

ST_TO_NP = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U64": np.dtype(np.uint64), "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
NP_TO_ST = {v: k for k, v in ST_TO_NP.items()}

Spec = tuple[tuple[int, ...], np.dtype]  # (shape, dtype) of one tensor


def nbytes(shape: Sequence[int], dtype) -> int:
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


class UnreadableSafetensors(InputFileError):
    """A safetensors file that cannot be read: unopenable, truncated, a corrupt header, an unknown dtype."""

    def __init__(self, path: str | os.PathLike, problem: str, where: str = ""):
        self.path, self.problem = pathlib.Path(path), problem
        super().__init__(f"{path}{where}: cannot read this safetensors file ({problem}); is it truncated or "
                         "corrupt? Copy it again")


class MissingShard(InputFileError):
    """A shard named by model.safetensors.index.json is not in the directory."""

    def __init__(self, directory: str | os.PathLike, fname: str, tensor: str):
        self.directory, self.fname = pathlib.Path(directory), fname
        super().__init__(f"{self.directory / fname}: missing (listed in {INDEX_FILE} for tensor {tensor!r})")


# ============================================================================================= reading


class SafetensorsFile:
    """One .safetensors file; the header is read and checked against the file's size on opening.

    `entries` maps each tensor name to (shape, dtype, absolute byte offset), in the header's order.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        try:
            self._file = open(self.path, "rb", buffering=0)
        except OSError as e:
            raise UnreadableSafetensors(self.path, describe(e)) from e
        try:
            self.entries = self._read_header()
        except BaseException:
            self._file.close()
            raise

    def _read_header(self) -> dict[str, tuple[tuple[int, ...], np.dtype, int]]:
        size = os.fstat(self._file.fileno()).st_size
        try:
            header_len = int.from_bytes(bytes(self._read_at(0, 8)), "little")
            if not 0 < header_len <= min(size - 8, _MAX_HEADER_BYTES):
                raise ValueError(f"header length {header_len} does not fit a file of {size} bytes")
            header = json.loads(bytes(self._read_at(8, header_len)))
            if not isinstance(header, dict):
                raise ValueError("the header is not a json object")
        except (ValueError, OSError) as e:
            raise UnreadableSafetensors(self.path, str(e) or describe(e)) from e
        data_start = 8 + header_len
        entries = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            try:
                st_dtype, (begin, end) = entry["dtype"], entry["data_offsets"]
                shape = tuple(int(s) for s in entry["shape"])
            except (KeyError, TypeError, ValueError) as e:
                raise UnreadableSafetensors(self.path,
                                            f"malformed header entry for tensor {name!r}: {entry!r}") from e
            if st_dtype not in ST_TO_NP:
                raise UnreadableSafetensors(self.path, f"tensor {name!r} has unsupported dtype {st_dtype}")
            dtype = ST_TO_NP[st_dtype]
            if end - begin != nbytes(shape, dtype) or data_start + end > size or begin < 0:
                raise UnreadableSafetensors(self.path, f"tensor {name!r} has data_offsets {[begin, end]} that do "
                                            f"not fit its shape {list(shape)} {st_dtype} or the file ({size} bytes)")
            entries[name] = (shape, dtype, data_start + begin)
        return entries

    def _read_at(self, offset: int, count: int) -> np.ndarray:
        # positioned: several threads may read one file at once
        buf = np.empty(count, np.uint8)
        view = memoryview(buf)
        got = 0
        while got < count:
            n = os.preadv(self._file.fileno(), [view[got:]], offset + got)
            if not n:
                raise ValueError(f"unexpected end of file at byte {offset + got}")
            got += n
        return buf

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) along axis 0 of tensor `name` (the whole tensor for 0-d ones)."""
        shape, dtype, offset = self.entries[name]
        try:
            if not shape:
                return self._read_at(offset, dtype.itemsize).view(dtype).reshape(())
            row_bytes = nbytes(shape[1:], dtype)
            raw = self._read_at(offset + start * row_bytes, (stop - start) * row_bytes)
        except (ValueError, OSError) as e:
            raise UnreadableSafetensors(self.path, str(e) or describe(e), f" (tensor {name!r})") from e
        return raw.view(dtype).reshape((stop - start, *shape[1:]))

    def read(self, name: str, index: tuple | None = None) -> np.ndarray:
        """Tensor `name`, or its slice `index` (a tuple of contiguous slices, one per leading axis).

        Only the rows of the slice are read; a slice across the other axes is cut from row blocks of at most
        _READ_BLOCK_BYTES, so a device's shard of a large tensor never costs a whole tensor in memory.
        """
        shape = self.entries[name][0]
        if not shape:
            return self.read_rows(name, 0, 0)
        index = tuple(index or ())
        start, stop, step = (index[0] if index else slice(None)).indices(shape[0])
        if step != 1:
            raise ValueError(f"{self.path}: tensor {name!r}: only contiguous slices are read, got {index}")
        rest = (slice(None), *index[1:])
        if all(s == slice(None) for s in rest):
            return self.read_rows(name, start, stop)
        block = max(1, _READ_BLOCK_BYTES // max(1, nbytes(shape[1:], self.entries[name][1])))
        parts = [self.read_rows(name, a, min(stop, a + block))[rest] for a in range(start, stop, block)]
        return np.concatenate(parts) if parts else self.read_rows(name, start, start)[rest]

    def close(self) -> None:
        self._file.close()


class SafetensorsDir:
    """The tensors of a Hugging Face directory: model.safetensors, or the shards its index lists (without an
    index, every *.safetensors file). Every shard's header is opened and checked before any tensor is read.

    specs: {name: (shape, dtype)} in the order the tensors lie on disk (file order, then offset order).
    file_of: {name: shard file name}.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        index = self.path / INDEX_FILE
        weight_map = None
        if index.is_file():
            data = read_json(index)
            weight_map = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(weight_map, dict) or not weight_map:
                raise InputFileError(f"{index}: no weight_map {{tensor name: shard file}}")
            files = list(dict.fromkeys(weight_map.values()))
            for fname in files:  # every shard there, before any work
                if not (self.path / fname).is_file():
                    raise MissingShard(self.path, fname, next(k for k, v in weight_map.items() if v == fname))
        else:
            files = sorted(p.name for p in self.path.glob("*.safetensors"))
            if not files:
                bin_only = any(self.path.glob("*.bin"))
                hint = " (only pytorch .bin weights? convert them to safetensors)" if bin_only else ""
                raise FileNotFoundError(f"{self.path}: no *.safetensors files (and no {INDEX_FILE}){hint}")
        self._files: dict[str, SafetensorsFile] = {}
        self.file_of: dict[str, str] = {}
        self.specs: dict[str, Spec] = {}
        try:
            for fname in files:
                handle = self._files[fname] = SafetensorsFile(self.path / fname)
                for name, (shape, dtype, _) in sorted(handle.entries.items(), key=lambda item: item[1][2]):
                    if name in self.file_of:
                        raise InputFileError(f"{self.path}: tensor {name!r} is stored twice "
                                             f"({self.file_of[name]}, {fname})")
                    self.file_of[name] = fname
                    self.specs[name] = (shape, dtype)
            wrong = next((n for n, f in (weight_map or {}).items() if self.file_of.get(n) != f), None)
            if wrong is not None:
                raise InputFileError(f"{index}: tensor {wrong!r} is not in {weight_map[wrong]}")
        except BaseException:
            self.close()
            raise

    def names(self) -> list[str]:
        return sorted(self.file_of)

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        return self._files[self.file_of[name]].read_rows(name, start, stop)

    def get(self, name: str, index: tuple | None = None) -> np.ndarray:
        """Tensor `name`, or its slice `index` (see SafetensorsFile.read)."""
        if name not in self.file_of:
            raise KeyError(f"{self.path}: tensor {name!r} is missing")
        return self._files[self.file_of[name]].read(name, index)

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()
        self._files.clear()


# ============================================================================================= writing


class SafetensorsWriter:
    """Writes safetensors shards (and the index when there are several) tensor piece by tensor piece.

    specs: {name: (shape, dtype)} of every tensor, in the order they will be written; shards are cut in that
    order at `max_shard_bytes`. Each shard's header is known in advance, written first, and the bytes of each
    tensor are appended as `write` receives them (whole tensors or consecutive row blocks).
    """

    def __init__(self, out_dir: str | os.PathLike, specs: Mapping[str, Spec], max_shard_bytes: int = MAX_SHARD_BYTES):
        self.out_dir = pathlib.Path(out_dir)
        self.specs = {name: (tuple(shape), np.dtype(dtype)) for name, (shape, dtype) in specs.items()}
        self.shards: list[list[str]] = [[]]
        size = 0
        for name, spec in self.specs.items():
            if self.shards[-1] and size + nbytes(*spec) > max_shard_bytes:
                self.shards.append([])
                size = 0
            self.shards[-1].append(name)
            size += nbytes(*spec)
        n = len(self.shards)
        self.file_names = (["model.safetensors"] if n == 1 else
                           [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
        self.total_size = sum(nbytes(*spec) for spec in self.specs.values())
        self._order = [name for shard in self.shards for name in shard]
        self._shard_of = {name: i for i, shard in enumerate(self.shards) for name in shard}
        self._pos = 0  # index into _order of the tensor being written
        self._written = 0  # bytes of that tensor written so far
        self._file = None
        self._shard = -1

    def _open_shard(self, i: int) -> None:
        if self._file is not None:
            self._close_file()
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name in self.shards[i]:
            shape, dtype = self.specs[name]
            size = nbytes(shape, dtype)
            header[name] = {"dtype": NP_TO_ST[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # 8-byte aligned data, as the safetensors library writes it
        self._file = open(self.out_dir / self.file_names[i], "wb")
        self._file.write(len(blob).to_bytes(8, "little"))
        self._file.write(blob)
        self._shard = i

    def _close_file(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None

    def write(self, name: str, piece: np.ndarray) -> None:
        """Appends the next rows of tensor `name`; tensors and rows must come in the planned order."""
        if self._pos >= len(self._order) or name != self._order[self._pos]:
            expected = self._order[self._pos] if self._pos < len(self._order) else "nothing"
            raise RuntimeError(f"safetensors writer expected {expected!r}, got {name!r}")
        shape, dtype = self.specs[name]
        if piece.dtype != dtype:
            raise RuntimeError(f"tensor {name!r}: piece dtype {piece.dtype} != planned {dtype}")
        if self._shard != self._shard_of[name]:
            self._open_shard(self._shard_of[name])
        data = np.ascontiguousarray(piece).reshape(-1).view(np.uint8)
        self._file.write(memoryview(data))
        self._written += data.size
        total = nbytes(shape, dtype)
        if self._written > total:
            raise RuntimeError(f"tensor {name!r}: {self._written} bytes written, {total} planned")
        if self._written == total:
            self._pos += 1
            self._written = 0

    def close(self) -> None:
        """Finishes the last shard and writes the index (when sharded); checks every tensor was written."""
        if self._pos != len(self._order):
            raise RuntimeError(f"safetensors writer closed before tensor {self._order[self._pos]!r} was written")
        if self._file is not None:
            self._close_file()
        if len(self.file_names) > 1:
            weight_map = {name: self.file_names[i] for i, shard in enumerate(self.shards) for name in shard}
            checkpoint.write_json_atomic(self.out_dir / INDEX_FILE,
                                         {"metadata": {"total_size": self.total_size}, "weight_map": weight_map})

    def abort(self) -> None:
        """Closes the open shard without finishing it (the caller removes the directory)."""
        if self._file is not None:
            self._file.close()
            self._file = None
