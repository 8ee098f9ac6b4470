"""Flax NNX models in :func:`~jaxcifar.train.fit`, through NNX's functional API (``nnx.split`` / ``nnx.merge``).

``fit`` keeps a run's weights as plain pytrees (what optax, Orbax, ``vmap`` over runs and the checkpoints take)
and calls its model twice: ``init`` (fresh variables from a seed) and ``apply`` (logits, and the new batch
statistics in training). :class:`NnxModel` gives an NNX module those two calls. Each call builds the module's
abstract graph inside the trace (``nnx.eval_shape``: no arrays, no compilation), fills in the run's
``nnx.Param`` and ``nnx.BatchStat`` values, gives every RNG stream a key derived from the step's key, and
runs the module; the updated ``nnx.BatchStat`` values come back as the new statistics. So each run of a sweep
has its own initialization, dropout stream and batch statistics, vmapped or looped like a Linen module's.

An NNX module builds its arrays when constructed, so ``fit`` takes a constructor, ``make(rngs) -> module``
(the class itself, ``functools.partial(Net, width=32)`` or a lambda), called once per run with that run's
seed. Its state must be ``nnx.Param``, ``nnx.BatchStat`` and RNG streams only.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxcifar.errors import ConfigError
from jaxcifar.train.fingerprint import fingerprint

Constructor = Callable[[nnx.Rngs], nnx.Module]


class NnxModel:
    """An NNX module constructor behind the ``init`` / ``apply`` calls ``fit`` makes (see the module docstring).
    Two share compiled programs when they wrap the same constructor building the same graph."""

    def __init__(self, make: Constructor) -> None:
        self.make = make
        abstract = self._abstract()
        # the module's graph definition (structure, layer types and settings; no arrays) when wrapped: a
        # constructor that reads a changed global builds another graph, hence another program
        self.graph = nnx.split(abstract)[0]
        self.module_type = type(abstract)  # the class of the module the constructor builds

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NnxModel) and other.make is self.make and other.graph == self.graph

    def __hash__(self) -> int:
        return hash((NnxModel, id(self.make), self.graph))

    def __repr__(self) -> str:
        name = getattr(self.make, "__qualname__", type(self.make).__name__)
        return f"NnxModel({name}, {fingerprint(self.make)})"

    def init(self, rngs: dict[str, jax.Array], x: jax.Array, train: bool = False, **_: Any) -> dict[str, Any]:
        """Fresh ``{"params", "batch_stats"}`` from ``rngs["params"]`` (and ``rngs["dropout"]``)."""
        keys = {name: _typed(k) for name, k in rngs.items()}
        module = self.make(nnx.Rngs(**keys))
        return _variables(nnx.state(module, nnx.Param), nnx.state(module, nnx.BatchStat))

    def apply(self, variables: dict[str, Any], x: jax.Array, train: bool = False, rngs: dict | None = None,
              mutable: Any = False, **kwargs: Any) -> Any:
        """Logits of the module holding ``variables``; with ``mutable`` also ``{"batch_stats": new ones}``."""
        graph, params, stats, keys, counts = self._parts()
        nnx.replace_by_pure_dict(params, variables["params"])
        if variables.get("batch_stats"):
            nnx.replace_by_pure_dict(stats, variables["batch_stats"])
        key = _typed((rngs or {}).get("dropout", jax.random.key(0)))
        leaves, tree = jax.tree.flatten(keys)
        keys = jax.tree.unflatten(tree, [jax.random.fold_in(key, i) for i in range(len(leaves))])  # one per stream
        counts = jax.tree.map(lambda c: jnp.zeros(c.shape, c.dtype), counts)
        module = nnx.merge(graph, params, stats, keys, counts)
        out = module(x, train=train, **kwargs)
        if mutable:
            return out, {"batch_stats": _pure(nnx.state(module, nnx.BatchStat))}
        return out

    def _abstract(self) -> nnx.Module:
        try:
            module = nnx.eval_shape(lambda: self.make(nnx.Rngs(0)))
        except TypeError as e:
            raise ConfigError(f"model: calling the NNX constructor {self._name()} with rngs failed ({e}): pass a "
                              "class or function taking `rngs` (e.g. functools.partial(Net, width=32))") from e
        if not isinstance(module, nnx.Module):
            raise ConfigError(f"model: the constructor {self._name()} returned {type(module).__name__}, not an "
                              "nnx.Module")
        return module

    def _parts(self) -> tuple:
        """The abstract module split into its graph, parameters, statistics, RNG keys and counts; a clear error
        for any other state."""
        graph, params, stats, keys, counts, other = nnx.split(self._abstract(), nnx.Param, nnx.BatchStat, nnx.RngKey,
                                                              nnx.RngCount, ...)
        if jax.tree.leaves(other):
            kinds = sorted({type(v).__name__ for _, v in nnx.to_flat_state(other)})
            raise ConfigError(f"{self.module_type.__name__} keeps state of kinds {kinds}: fit trains nnx.Param and "
                              "keeps nnx.BatchStat (and RNG streams); make them one of these")
        return graph, params, stats, keys, counts

    def _name(self) -> str:
        return getattr(self.make, "__qualname__", repr(self.make))


def nnx_model(obj: Any) -> NnxModel | None:
    """``obj`` as an :class:`NnxModel` when it is an NNX module class or constructor; None for anything else
    (a Linen module). An NNX module *instance* is refused: its arrays exist already, so runs could not each
    have their own initialization."""
    if isinstance(obj, NnxModel):
        return NnxModel(obj.make)  # its graph as the constructor builds it now
    if isinstance(obj, nnx.Module):
        raise ConfigError(f"model: an nnx.Module instance ({type(obj).__name__}) has its weights already, so each "
                          f"run could not start from its own seed: pass its constructor, e.g. "
                          f"model=lambda rngs: {type(obj).__name__}(..., rngs=rngs)")
    target = obj.func if isinstance(obj, functools.partial) else obj
    if inspect.isclass(target) and issubclass(target, nnx.Module):
        return NnxModel(obj)
    if callable(obj) and not inspect.isclass(obj) and "rngs" in _parameters(obj):
        return NnxModel(obj)
    return None


def _parameters(fn: Callable) -> set[str]:
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()


def _typed(key: jax.Array) -> jax.Array:
    """A typed PRNG key (``fit`` splits raw uint32 keys)."""
    return key if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) else jax.random.wrap_key_data(key)


def _pure(state: nnx.State) -> dict[str, Any]:
    """A state as nested dicts with string keys (what Orbax and the parameter paths expect; NNX lists give int
    keys, which ``nnx.replace_by_pure_dict`` reads back from strings)."""
    def strings(tree: Any) -> Any:
        return {str(k): strings(v) for k, v in tree.items()} if isinstance(tree, dict) else tree

    return strings(nnx.to_pure_dict(state))


def _variables(params: nnx.State, stats: nnx.State) -> dict[str, Any]:
    stats = _pure(stats)
    return {"params": _pure(params), **({"batch_stats": stats} if stats else {})}
