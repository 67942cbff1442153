"""Forget requests: what is to be forgotten, in three kinds.

* :class:`RandomForget` - a random fraction of the training set;
* :class:`ClassForget` - every sample of one class;
* :class:`SubclassForget` - a random fraction of one class.

:func:`split_forget` turns a request into ``(forget, retain)`` sample sets, reproducibly from a seed.
:func:`parse_request` reads the CLI form ``random:0.1``, ``class:3``, ``subclass:3:0.5``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sisa_ray.core.data import SampleSet

KINDS = ("random", "class", "subclass")


def _check_fraction(owner: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(
            f"The 'fraction' parameter of {owner} must be a number in (0, 1). Got {value!r} instead."
        )


def _check_label(owner: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(
            f"The 'label' parameter of {owner} must be an int >= 0. Got {value!r} instead."
        )


@dataclass(frozen=True, kw_only=True)
class RandomForget:
    fraction: float = 0.1
    kind = "random"

    def __post_init__(self) -> None:
        _check_fraction("RandomForget", self.fraction)

    def __str__(self) -> str:
        return f"random:{self.fraction:g}"


@dataclass(frozen=True, kw_only=True)
class ClassForget:
    label: int
    kind = "class"

    def __post_init__(self) -> None:
        _check_label("ClassForget", self.label)

    def __str__(self) -> str:
        return f"class:{self.label}"


@dataclass(frozen=True, kw_only=True)
class SubclassForget:
    label: int
    fraction: float = 0.5
    kind = "subclass"

    def __post_init__(self) -> None:
        _check_label("SubclassForget", self.label)
        _check_fraction("SubclassForget", self.fraction)

    def __str__(self) -> str:
        return f"subclass:{self.label}:{self.fraction:g}"


@dataclass(frozen=True, kw_only=True)
class IdsForget:
    """An explicit list of sample ids (an arbitrary subset: methods treat it as ``random``)."""

    ids: tuple[int, ...]
    kind = "random"

    def __post_init__(self) -> None:
        if not self.ids:
            raise ValueError("IdsForget needs at least one id.")

    def __str__(self) -> str:
        return f"ids:{len(self.ids)}"


ForgetRequest = RandomForget | ClassForget | SubclassForget | IdsForget


def parse_request(text: str) -> ForgetRequest:
    """``random:FRACTION`` | ``class:LABEL`` | ``subclass:LABEL:FRACTION`` | ``ids:FILE``
    (a file of integer ids separated by whitespace or commas)."""
    parts = str(text).split(":")
    if parts[0] == "ids" and len(parts) >= 2:
        path = ":".join(parts[1:])
        try:
            with open(path) as f:
                toks = f.read().replace(",", " ").split()
        except FileNotFoundError as e:
            raise ValueError(f"Forget ids file {path} does not exist.") from e
        try:
            return IdsForget(ids=tuple(int(t) for t in toks))
        except ValueError as e:
            raise ValueError(f"Forget ids file {path} must hold integer ids ({e}).") from e
    try:
        if parts[0] == "random" and len(parts) == 2:
            return RandomForget(fraction=float(parts[1]))
        if parts[0] == "class" and len(parts) == 2:
            return ClassForget(label=int(parts[1]))
        if parts[0] == "subclass" and len(parts) == 3:
            return SubclassForget(label=int(parts[1]), fraction=float(parts[2]))
    except ValueError as e:
        if "parameter" in str(e):
            raise
        raise ValueError(f"Cannot parse forget request {text!r}: {e}.") from e
    raise ValueError(
        f"Unknown forget request {text!r}. Use random:FRACTION, class:LABEL, "
        "subclass:LABEL:FRACTION (or ids:FILE on the CLI)."
    )


def forget_ids(data: SampleSet, request: ForgetRequest, seed: int) -> np.ndarray:
    """The ids a request selects from ``data`` (sorted)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xF0]))
    if isinstance(request, IdsForget):
        ids = np.unique(np.asarray(request.ids, dtype=np.int64))
        unknown = ids[~np.isin(ids, data.ids)]
        if unknown.size:
            raise ValueError(f"{unknown.size} forget id(s) are not in the training set: "
                             f"{unknown[:20].tolist()}. Remove them from the ids file.")
        return ids
    if isinstance(request, RandomForget):
        n = max(1, int(round(request.fraction * len(data))))
        return np.sort(rng.choice(data.ids, size=n, replace=False))
    if request.label >= data.n_classes:
        raise ValueError(
            f"{request}: label {request.label} does not exist; the data has classes "
            f"0..{data.n_classes - 1}."
        )
    in_class = data.ids[data.labels == request.label]
    if in_class.size == 0:
        raise ValueError(f"{request}: no training sample has label {request.label}.")
    if isinstance(request, ClassForget):
        return np.sort(in_class)
    n = max(1, int(round(request.fraction * in_class.size)))
    return np.sort(rng.choice(in_class, size=n, replace=False))


def split_forget(
    data: SampleSet, request: ForgetRequest, seed: int
) -> tuple[SampleSet, SampleSet]:
    """``(forget, retain)`` for a request."""
    ids = forget_ids(data, request, seed)
    return data.select_ids(ids), data.without_ids(ids)
