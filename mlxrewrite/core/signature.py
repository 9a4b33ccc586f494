"""Input signatures (the cache key of a rewritten function) and captured state.

Arguments are pytrees (optree): array leaves are traced inputs; every other leaf is a static value of
an immutable scalar type (`STATIC_TYPES`), as with `mx.compile`. Other objects are refused: a hashable
one is usually hashed by identity, so a mutated one would replay a stale plan. A signature also holds each array's shape and dtype;
`describe_change` says why a retrace happened. Input strides are read when tracing, but not on every
call (that forces evaluation and, on CUDA, a synchronisation): only inputs that were not row-major when
traced are guarded per call (`Entry.layout_guards` in compiler.py).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import optree

from .graph import dtype_name


class SignatureError(TypeError):
    """An argument that cannot be traced nor used as a static value."""


# Static leaves are keyed by value, so they must be immutable values: mx.compile's constants, and dtypes.
STATIC_TYPES = (type(None), bool, int, float, complex, str, bytes, mx.Dtype)

ArrayFacts = tuple  # (shape, dtype): plain tuples keep the per-call key cheap


def facts_text(facts: ArrayFacts) -> str:
    shape, dtype = facts
    return f"{dtype_name(dtype)}[{','.join(map(str, shape))}]"


@dataclass(frozen=True)
class Signature:
    treespec: Any
    statics: tuple  # (leaf index, value) of non-array leaves
    arrays: tuple[ArrayFacts, ...]  # positional and keyword array leaves
    state: tuple[ArrayFacts, ...]  # leaves of inputs= state (shape and dtype only)
    layouts: tuple = ()  # input strides, only for signatures split off by a layout guard

    def describe_change(self, old: "Signature") -> str:
        """Why `old` does not serve this call (the first differences, in words)."""
        if self.treespec != old.treespec:
            return f"argument structure changed: {old.treespec} -> {self.treespec}"
        reasons = [f"static argument #{i} changed: {a!r} -> {b!r}"
                   for (i, a), (_, b) in zip(old.statics, self.statics) if a != b]
        for label, new_list, old_list in (("array argument", self.arrays, old.arrays),
                                          ("state array", self.state, old.state)):
            if len(new_list) != len(old_list):
                reasons.append(f"number of {label}s changed: {len(old_list)} -> {len(new_list)}")
                continue
            reasons += [f"{label} #{i}: {facts_text(a)} -> {facts_text(b)}"
                        for i, (a, b) in enumerate(zip(old_list, new_list)) if a != b]
        if self.layouts != old.layouts:
            reasons.append(f"input layout (strides) changed: {old.layouts or 'as traced'} -> {self.layouts}")
        return "; ".join(reasons[:4]) + (f" (+{len(reasons) - 4} more)" if len(reasons) > 4 else "")


def is_array(leaf: Any) -> bool:
    return isinstance(leaf, mx.array)


def flatten_call(args: tuple, kwargs: dict) -> tuple[list[mx.array], Any, tuple]:
    """(array leaves, treespec, static leaves) of a call's arguments."""
    leaves, treespec = optree.tree_flatten((args, kwargs), none_is_leaf=False)
    arrays, statics = [], []
    for index, leaf in enumerate(leaves):
        if is_array(leaf):
            arrays.append(leaf)
            continue
        if not isinstance(leaf, STATIC_TYPES):
            raise SignatureError(
                f"argument leaf #{index} of type {type(leaf).__name__} is neither an mx.array nor a hashable "
                "static value (None, bool, int, float, complex, str, bytes or mx.Dtype: other objects are "
                "keyed by identity and may change in place); pass arrays (or lists/tuples/dicts "
                "of them), and give captured state such as models or caches through inputs=/outputs= or a "
                "closure")
        statics.append((index, leaf))
    return arrays, treespec, tuple(statics)


def rebuild_call(treespec: Any, statics: tuple, arrays: list[mx.array]) -> tuple[tuple, dict]:
    """Inverse of `flatten_call`."""
    leaves: list[Any] = []
    fixed = dict(statics)
    it = iter(arrays)
    for index in range(treespec.num_leaves):
        leaves.append(fixed[index] if index in fixed else next(it))
    args, kwargs = optree.tree_unflatten(treespec, leaves)
    return args, kwargs


def state_facts(state: list[mx.array]) -> tuple[ArrayFacts, ...]:
    return tuple((a.shape, a.dtype) for a in state)


def make_signature(arrays: list[mx.array], treespec: Any, statics: tuple, state: list[mx.array],
                   shapeless: bool = False) -> Signature:
    if shapeless:
        facts = tuple(((-1,) * a.ndim, a.dtype) for a in arrays)
    else:
        facts = tuple((a.shape, a.dtype) for a in arrays)
    return Signature(treespec, statics, facts, state_facts(state))


# ---- captured state (inputs= / outputs=), replaced in place like mx.compile does -----------------

Slot = tuple[Any, Any]  # (container, key)
_CONTAINERS = (dict, list, tuple)  # nn.Module is a dict
_ARRAY_TYPE = frozenset({mx.array})


@dataclass(frozen=True, eq=False)
class StateTree:
    """One walk of a state tree: where its arrays live, and what else it held, to tell cheaply whether it changed.

    Walking a model's state in Python costs hundreds of microseconds per call (16 layers: ~150 arrays in
    ~230 containers), more than `mx.compile` spends on the whole call. `arrays()` replaces that walk with
    a few C-level passes over what the walk saw. The arrays themselves are not compared: `mx.compile`
    writes `outputs=` state back as new array objects on every call, and `model.update` swaps them too;
    their shapes and dtypes are checked by `mx.compile`, which retraces when they change (the runner then
    checks them against its signature, in compiler.py).
    """

    holders: tuple  # the container of each array, depth first
    keys: tuple  # its key there
    containers: tuple  # every dict / list / tuple visited
    lengths: tuple[int, ...]  # their lengths when walked
    parents: tuple  # the container of every non-array child (sub-containers, other leaves)
    places: tuple  # its key there
    children: tuple  # the child itself

    @classmethod
    def walk(cls, tree: Any) -> "StateTree":
        arrays: list[Slot] = []
        others: list[tuple[Any, Any, Any]] = []
        containers: list = []

        def visit(node: Any) -> None:
            containers.append(node)
            for key, child in node.items() if isinstance(node, dict) else enumerate(node):
                if is_array(child):
                    if isinstance(node, tuple):
                        raise SignatureError("state arrays inside a tuple cannot be updated in place; use a list")
                    arrays.append((node, key))
                    continue
                others.append((node, key, child))
                if isinstance(child, _CONTAINERS):
                    visit(child)

        if isinstance(tree, _CONTAINERS):
            visit(tree)
        holders, keys = zip(*arrays) if arrays else ((), ())
        parents, places, children = zip(*others) if others else ((), (), ())
        return cls(holders, keys, tuple(containers), tuple(map(len, containers)), parents, places, children)

    @property
    def slots(self) -> list[Slot]:
        return list(zip(self.holders, self.keys))

    def arrays(self) -> list[mx.array] | None:
        """The state arrays, or None when the tree is no longer as walked (a key or layer added or removed,
        a sub-container or an array slot replaced by something else): then it must be walked again."""
        try:
            if tuple(map(len, self.containers)) != self.lengths:
                return None
            if not all(map(operator.is_, map(operator.getitem, self.parents, self.places), self.children)):
                return None
            arrays = list(map(operator.getitem, self.holders, self.keys))
        except (KeyError, IndexError):
            return None
        return arrays if _ARRAY_TYPE.issuperset(map(type, arrays)) else None  # not an array now: walk again


    def restore(self, arrays: list[mx.array]) -> None:
        """Put the tree back as walked, holding `arrays`: drop keys and items that were added since (a
        function that grows its state leaves tracers there when traced), put back replaced children."""
        contents: dict[int, dict] = {id(c): {} for c in self.containers}
        for container, key, child in zip(self.holders + self.parents, self.keys + self.places,
                                         tuple(arrays) + self.children):
            contents[id(container)][key] = child
        for container in self.containers:
            items = contents[id(container)]
            if isinstance(container, dict):
                for key in [k for k in container if k not in items]:
                    del container[key]
                dict.update(container, items)  # not nn.Module.update, which takes parameters only
            elif isinstance(container, list):
                container[:] = [items[i] for i in range(len(items))]


def state_slots(tree: Any) -> list[Slot]:
    """Mutable places holding arrays in dicts/lists (nn.Module is a dict), depth first."""
    return StateTree.walk(tree).slots


def read_slots(slots: list[Slot]) -> list[mx.array]:
    return [container[key] for container, key in slots]


def write_slots(slots: list[Slot], values: list[mx.array]) -> None:
    for (container, key), value in zip(slots, values):
        container[key] = value
