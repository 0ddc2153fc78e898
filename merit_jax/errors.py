"""One form for a user file that cannot be read: the path, and the line or tensor where one exists.

Every reader of user files (Hugging Face directories and safetensors shards, merit_jax checkpoints, Orbax
training state, tokenizer and preprocessor files, task files, images, work-directory JSON) turns a missing,
truncated, corrupt or undecodable file into an `InputFileError`. It is a ValueError, so the command-line
entry points print it in their `error: ...` form (exit 2; the traceback only with MERIT_DEBUG=1).
"""

from __future__ import annotations

import contextlib
import os
import re
from typing import Iterator


class InputFileError(ValueError):
    """A user file that is missing, truncated, corrupt or undecodable; the message names it."""


class ConfigError(ValueError):
    """A configuration that cannot run; raised before any compute, naming the config keys involved."""


def describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@contextlib.contextmanager
def reading(path: str | os.PathLike, what: str, where: str = "") -> Iterator[None]:
    """Wraps a library call that reads `path`: whatever it raises becomes InputFileError("{path}{where}:
    cannot read this {what} (...)"). Errors of our own (already naming the file) pass through unchanged."""
    try:
        yield
    except PROGRAMMING_ERRORS:  # a bug or a broken install, not a damaged file: keep the traceback
        raise
    except Exception as e:  # noqa: BLE001: readers raise OSError, SafetensorError, Arrow, tensorstore, ...
        if _is_runtime_error(e):  # e.g. out of device memory while restoring
            raise
        raise InputFileError(f"{path}{where}: cannot read this {what} ({describe(e)}); "
                             "is it truncated or corrupt? Copy it again") from e


# Raised by our code or by a wrong call, never by damaged bytes: they pass through `reading` unchanged
# (InputFileError too, which already names its file).
PROGRAMMING_ERRORS = (InputFileError, TypeError, AttributeError, NameError, ImportError, AssertionError,
                      NotImplementedError, RecursionError, MemoryError)


def _is_runtime_error(e: Exception) -> bool:
    return type(e).__name__ in ("JaxRuntimeError", "XlaRuntimeError")


def utf8_line(raw: bytes, path: str | os.PathLike, lineno: int) -> str:
    """One line of a text file as str; non-UTF-8 bytes name the file, the line and the column."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputFileError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                             f"{e.start + 1})") from None


def utf8_text(raw: bytes, path: str | os.PathLike) -> str:
    """A whole text file as str; non-UTF-8 bytes name the file and the line."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise InputFileError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {column})") \
            from None


def regex_errors(key: str, patterns) -> list[str]:
    """One message per pattern of config key `key` that is not a valid regular expression."""
    errors = []
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as e:
            errors.append(f"{key}: invalid regex {pattern!r}: {e}")
    return errors
