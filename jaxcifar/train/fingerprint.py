"""Stable fingerprints of a user's pieces (module, optimizer, loss, metrics, augmentation functions), the same
in every process, so that a checkpoint can tell whether it is resumed with the code that wrote it.

A function is fingerprinted by its qualified name, its bytecode and constants, its defaults and what its
closure holds, recursively: ``optax.adamw(2e-3)`` and ``optax.adamw(1e-2)`` differ (the learning rate sits in a
closure), as do ``optax.lion`` and ``optax.adamw`` (other code), while two processes building the same
transformation agree. Arrays count by shape, dtype and content; objects without a readable structure by their
type and ``repr`` (with memory addresses removed, which differ between processes). Bytecode changes with the
Python version, so a resume under another Python counts as a change (allowed with ``allow_changes``).
"""

from __future__ import annotations

import functools
import hashlib
import re
import types
from typing import Any

import jax
import numpy as np

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_MAX_DEPTH = 12  # deep enough for optax chains of wrapped transformations; cycles stop at the seen set


def fingerprint(obj: Any) -> str | None:
    """A 16-hex-digit digest of ``obj``'s structure (None for None)."""
    if obj is None:
        return None
    parts: list[str] = []
    _describe(obj, parts, set(), 0)
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:16]


def tree_signature(tree: Any) -> str:
    """A digest of a pytree's structure (container types and keys) and its leaves' shapes and dtypes: what
    must match for a saved optimizer state to be this optimizer's."""

    leaves, treedef = jax.tree.flatten(tree)
    text = str(treedef) + repr([(tuple(x.shape), str(x.dtype)) for x in leaves])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _describe(obj: Any, out: list[str], seen: set[int], depth: int) -> None:
    """Append ``obj``'s description to ``out`` (see the module docstring)."""
    if depth > _MAX_DEPTH or id(obj) in seen:
        out.append("...")
        return
    if obj is None or isinstance(obj, bool | int | float | complex | str | bytes):
        out.append(repr(obj))
        return
    if isinstance(obj, np.ndarray) or (type(obj).__module__.startswith("jax") and hasattr(obj, "dtype")):
        out.append(_array_digest(obj))
        return
    seen.add(id(obj))
    nested = functools.partial(_describe, out=out, seen=seen, depth=depth + 1)
    if isinstance(obj, functools.partial):
        out.append("partial")
        for part in (obj.func, obj.args, sorted(obj.keywords.items())):
            nested(part)
    elif isinstance(obj, types.FunctionType | types.MethodType):
        _describe_function(obj, out, nested)
    elif isinstance(obj, tuple | list):
        out.append(f"{type(obj).__qualname__}[{len(obj)}]")  # NamedTuples (optax's states, transformations) too
        for item in obj:
            nested(item)
    elif isinstance(obj, dict):
        out.append(f"dict[{len(obj)}]")
        for key in sorted(obj, key=repr):
            nested(key)
            nested(obj[key])
    elif isinstance(obj, type):
        out.append(f"class {obj.__module__}.{obj.__qualname__}")
    else:
        out.append(f"{type(obj).__module__}.{type(obj).__qualname__}:{_ADDRESS.sub('', repr(obj))}")


def _array_digest(x: Any) -> str:
    """An array by shape, dtype and content (a typed PRNG key by its key data)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    data = np.asarray(x)
    return f"array{data.shape}{data.dtype}:{hashlib.sha256(data.tobytes()).hexdigest()[:16]}"


def _describe_function(fn: Any, out: list[str], nested: Any) -> None:
    """A function's name, code, defaults and closure (a bound method: its function and its object)."""
    if isinstance(fn, types.MethodType):
        out.append("method")
        nested(fn.__self__)
        fn = fn.__func__
    code = fn.__code__
    out.append(f"def {fn.__module__}.{fn.__qualname__}:{_code_digest(code)}")
    nested(fn.__defaults__)
    nested(fn.__kwdefaults__)
    for cell in fn.__closure__ or ():
        try:
            nested(cell.cell_contents)
        except ValueError:  # an empty cell: a name not bound yet
            out.append("<empty>")


def _code_digest(code: types.CodeType) -> str:
    """A digest of a code object's bytecode, names and constants (nested functions' code included)."""
    h = hashlib.sha256(code.co_code)
    h.update(repr(code.co_names).encode())
    for const in code.co_consts:
        h.update((_code_digest(const) if isinstance(const, types.CodeType) else repr(const)).encode())
    return h.hexdigest()[:16]
