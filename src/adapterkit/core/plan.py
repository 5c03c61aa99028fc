"""Plans: what runs in a forward, as a small immutable tree over adapter names.

A plan is an adapter name (a leaf) or one of the blocks below, nested freely:

- ``Stack("lang", "task")``: applied in order; where a method has an output
  (bottleneck adapters) the output of one feeds the next, where it is an
  additive weight update (LoRA) the updates add up;
- ``Sum("a", "b")``: every part applied to the same input and the changes
  added -- a list of names, as ``set_active(model, ["a", "b"])`` takes, is a Sum;
- ``Average({"a": 0.7, "b": 0.3})``: the changes weighted (weights normalised
  to sum to 1 unless ``normalize=False``);
- ``Fuse("a", "b", "c", fusion="abc")``: AdapterFusion, a trained attention
  over several bottleneck adapters' outputs (see ``add_fusion``);
- ``Route(["a", None, Average(...)])``: one plan per example of the batch
  (``None``: the base model).

Plans compare and hash by value, print as the Python that builds them, and
round-trip through :meth:`Plan.to_dict` / :func:`plan_from_dict` (JSON/YAML
friendly). They hold names only: which model they run on is decided by the
call that uses them.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Mapping, Sequence, Union

from adapterkit.errors import UsageError

PlanLike = Union["Plan", str, Sequence[Any], None]


class Plan:
    """Base of the composition blocks; a plain ``str`` is the leaf."""

    __slots__ = ("_hash",)
    kind: str = ""

    def parts(self) -> tuple["Plan | str", ...]:
        """The direct children, in order."""
        raise NotImplementedError

    def names(self) -> tuple[str, ...]:
        """Every adapter name the plan mentions, in first-seen order."""
        return plan_names(self)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly form; :func:`plan_from_dict` reads it back."""
        raise NotImplementedError

    @staticmethod
    def from_dict(data: Any) -> "Plan | str":
        """The plan that :meth:`to_dict` wrote (the same as :func:`plan_from_dict`)."""
        return plan_from_dict(data)

    def _key(self) -> tuple:
        raise NotImplementedError

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other._key() == self._key()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        # Layers look plans up in a cache at every forward; a Route over a large
        # batch would otherwise be re-hashed by every layer.
        try:
            return self._hash
        except AttributeError:
            value = hash((type(self).__name__, self._key()))
            object.__setattr__(self, "_hash", value)
            return value

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} plans are immutable")

    def __reduce__(self) -> tuple:
        return (plan_from_dict, (self.to_dict(),))


def plan_names(plan: "Plan | str | None") -> tuple[str, ...]:
    """Every adapter name ``plan`` mentions, in first-seen order (a bare name is its own plan)."""
    return tuple(dict.fromkeys(_walk_names(plan)))


def _walk_names(plan: "Plan | str | None") -> Iterator[str]:
    if plan is None:
        return
    if isinstance(plan, str):
        yield plan
        return
    if isinstance(plan, Fuse) and plan.fusion is not None:
        yield plan.fusion
    for part in plan.parts():
        yield from _walk_names(part)


def as_plan(value: PlanLike) -> "Plan | str":
    """A plan from what users pass: a name, a list of names/plans (a Sum), None (the base), or a plan."""
    if isinstance(value, (Plan, str)):
        if isinstance(value, str):
            check_name(value)
        return value
    if value is None:
        return Sum()
    if isinstance(value, Mapping):
        raise UsageError(
            f"a plan must be an adapter name, a list of names or a plan block such as ak.Average({dict(value)!r}); "
            "got a dict (use ak.Average for weights, or plan_from_dict for a saved plan)"
        )
    if isinstance(value, Iterable):
        return Sum(*value)
    raise UsageError(
        f"a plan must be an adapter name, a list of names, None or a plan block (Stack, Sum, Average, Fuse, "
        f"Route); got {type(value).__name__} {value!r}"
    )


def check_name(name: object) -> str:
    """``name`` if it is a valid adapter name, else a clear error."""
    if not isinstance(name, str) or not name:
        raise UsageError(f"adapter names in a plan must be non-empty strings, got {name!r}")
    return name


def _child(value: PlanLike) -> "Plan | str":
    if value is None:
        raise UsageError("None (the base model) is allowed only as an entry of Route([...]); "
                         "leave the adapter out of the block instead")
    return as_plan(value)


class _Parts(Plan):
    """A block over an ordered list of parts (Stack and Sum differ only in meaning)."""

    __slots__ = ("items",)

    def __init__(self, *items: PlanLike) -> None:
        object.__setattr__(self, "items", tuple(_child(i) for i in _flat_args(items)))

    def parts(self) -> tuple["Plan | str", ...]:
        return self.items

    def to_dict(self) -> dict[str, Any]:
        return {self.kind: [_part_dict(p) for p in self.items]}

    def _key(self) -> tuple:
        return self.items

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(map(repr, self.items))})"


class Stack(_Parts):
    """Parts applied in order, each on the result of the previous one."""

    __slots__ = ()
    kind = "stack"


class Sum(_Parts):
    """Parts applied to the same input, their changes added. ``Sum()`` is the base model."""

    __slots__ = ()
    kind = "sum"


class Average(Plan):
    """Parts' changes weighted; weights normalised to sum to 1 unless ``normalize=False``.

    ``Average({"a": 0.7, "b": 0.3})`` over names, or ``Average([(plan, w), ...])``
    when a part is itself a plan.
    """

    __slots__ = ("items", "raw_weights", "normalize")
    kind = "average"

    def __init__(self, weights: Mapping[str, float] | Sequence[tuple[PlanLike, float]],
                 normalize: bool = True) -> None:
        pairs = list(weights.items()) if isinstance(weights, Mapping) else list(weights)
        if not pairs:
            raise UsageError("Average needs at least one (adapter, weight) pair")
        items, raw = [], []
        for pair in pairs:
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise UsageError(f"Average takes {{name: weight}} or [(plan, weight), ...]; got entry {pair!r}")
            part, weight = pair
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight != weight:
                raise UsageError(f"Average weight for {part!r} must be a number, got {weight!r}")
            items.append(_child(part))
            raw.append(float(weight))
        if normalize and sum(raw) == 0:
            raise UsageError(f"Average weights {raw} sum to 0 and cannot be normalised; pass normalize=False")
        object.__setattr__(self, "items", tuple(items))
        object.__setattr__(self, "raw_weights", tuple(raw))
        object.__setattr__(self, "normalize", bool(normalize))

    @property
    def weights(self) -> tuple[float, ...]:
        """The weights applied: the given ones, divided by their sum when normalising."""
        if not self.normalize:
            return self.raw_weights
        total = sum(self.raw_weights)
        return tuple(w / total for w in self.raw_weights)

    def parts(self) -> tuple["Plan | str", ...]:
        return self.items

    def to_dict(self) -> dict[str, Any]:
        return {"average": [[_part_dict(p), w] for p, w in zip(self.items, self.raw_weights)],
                "normalize": self.normalize}

    def _key(self) -> tuple:
        return (self.items, self.raw_weights, self.normalize)

    def __repr__(self) -> str:
        if all(isinstance(p, str) for p in self.items) and len(set(self.items)) == len(self.items):
            body = repr(dict(zip(self.items, self.raw_weights)))
        else:
            body = repr(list(zip(self.items, self.raw_weights)))
        return f"Average({body}{'' if self.normalize else ', normalize=False'})"


class Fuse(Plan):
    """AdapterFusion over bottleneck adapters; ``fusion`` names the trained fusion layer.

    ``fusion`` may be left out when the model holds exactly one fusion over
    these adapters (``add_fusion`` names it); naming the fusion adapter alone
    (``set_active(model, "abc")``) means the same.
    """

    __slots__ = ("items", "fusion")
    kind = "fuse"

    def __init__(self, *adapters: str, fusion: str | None = None) -> None:
        names = tuple(check_name(a) for a in _flat_args(adapters))
        if len(names) < 2 or len(set(names)) != len(names):
            raise UsageError(f"Fuse needs two or more distinct adapter names, got {list(names)}")
        object.__setattr__(self, "items", names)
        object.__setattr__(self, "fusion", None if fusion is None else check_name(fusion))

    def parts(self) -> tuple["Plan | str", ...]:
        return self.items

    def to_dict(self) -> dict[str, Any]:
        return {"fuse": list(self.items), "fusion": self.fusion}

    def _key(self) -> tuple:
        return (self.items, self.fusion)

    def __repr__(self) -> str:
        tail = f", fusion={self.fusion!r}" if self.fusion is not None else ""
        return f"Fuse({', '.join(map(repr, self.items))}{tail})"


class Route(Plan):
    """One plan per example of the batch: entry ``i`` (a name, a plan or None) for row ``i``.

    ``weights_fixed`` is a promise from the caller, not part of the plan (it
    takes no part in equality or the saved form): while this route is in use,
    adapter weights change only through adapterkit calls (adding, deleting,
    loading, merging, moving the model), never in place. Routed LoRA layers
    then trust their cached weight stacks without reading every adapter's
    weights at each call, which on a decoding step over 64 adapters is a
    tenth of the step. The server makes that promise; the default checks.
    """

    __slots__ = ("entries", "weights_fixed", "_names_only")
    kind = "route"

    def __init__(self, entries: Sequence[PlanLike], weights_fixed: bool = False) -> None:
        if isinstance(entries, (str, Plan)) or not isinstance(entries, Iterable):
            raise UsageError(f"Route takes a list with one adapter name, plan or None per example; got {entries!r}")
        values = tuple(None if e is None else as_plan(e) for e in entries)
        if not values:
            raise UsageError("Route needs one entry per example; got an empty list")
        if any(isinstance(e, Route) for e in values):
            raise UsageError("a Route entry cannot itself be a Route (each entry is one example's plan)")
        object.__setattr__(self, "entries", values)
        object.__setattr__(self, "weights_fixed", bool(weights_fixed))

    def parts(self) -> tuple["Plan | str", ...]:
        return tuple(e for e in self.entries if e is not None)

    @property
    def names_only(self) -> bool:
        """True when every entry is an adapter name or None (no per-example plans); computed once."""
        try:
            return self._names_only
        except AttributeError:
            value = all(e is None or isinstance(e, str) for e in self.entries)
            object.__setattr__(self, "_names_only", value)
            return value

    def with_entries(self, entries: Sequence[PlanLike]) -> "Route":
        """A route over ``entries`` (resolved, narrowed to some rows, ...) that keeps this one's promise."""
        return Route(entries, weights_fixed=self.weights_fixed)

    def to_dict(self) -> dict[str, Any]:
        return {"route": [None if e is None else _part_dict(e) for e in self.entries]}

    def _key(self) -> tuple:
        return self.entries

    def __repr__(self) -> str:
        return f"Route({list(self.entries)!r})"


def _flat_args(items: tuple) -> tuple:
    """``Stack(["a", "b"])`` means ``Stack("a", "b")``."""
    if len(items) == 1 and isinstance(items[0], (list, tuple)):
        return tuple(items[0])
    return items


def _part_dict(part: "Plan | str") -> Any:
    return part if isinstance(part, str) else part.to_dict()


def plan_from_dict(data: Any) -> "Plan | str":
    """The plan that :meth:`Plan.to_dict` wrote (also accepts a bare name or list of names)."""
    if isinstance(data, str):
        return check_name(data)
    if isinstance(data, list):
        return Sum(*(plan_from_dict(d) for d in data))
    if not isinstance(data, Mapping):
        raise UsageError(f"a saved plan is a name, a list or a mapping such as {{'stack': [...]}}; got {data!r}")
    keys = set(data) - {"normalize", "fusion"}
    if len(keys) != 1:
        raise UsageError(
            f"a saved plan mapping has exactly one of stack, sum, average, fuse, route; got keys {sorted(data)}"
        )
    kind = keys.pop()
    body = data[kind]
    if kind in ("stack", "sum") and isinstance(body, list):
        parts = [plan_from_dict(d) for d in body]
        return Stack(*parts) if kind == "stack" else Sum(*parts)
    if kind == "average" and isinstance(body, (list, Mapping)):
        pairs = list(body.items()) if isinstance(body, Mapping) else body
        if not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in pairs):
            raise UsageError(f"'average' holds [plan, weight] pairs or {{name: weight}}; got {body!r}")
        return Average([(plan_from_dict(p), w) for p, w in pairs], normalize=bool(data.get("normalize", True)))
    if kind == "fuse" and isinstance(body, list):
        return Fuse(*body, fusion=data.get("fusion"))
    if kind == "route" and isinstance(body, list):
        return Route([None if e is None else plan_from_dict(e) for e in body])
    raise UsageError(f"a saved plan's {kind!r} entry has the wrong shape: {body!r}")


def describe(plan: "Plan | str") -> str:
    """A readable one-line form of ``plan`` (its constructor call; a name as itself)."""
    return plan if isinstance(plan, str) else repr(plan)


__all__ = ["Plan", "Stack", "Sum", "Average", "Fuse", "Route", "as_plan", "plan_from_dict", "describe"]
