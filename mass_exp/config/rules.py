"""Range rules for config keys: small predicates with the sentence an error shows.

A rule is attached to a schema field with `key(default, rule)` (see `schema.py`); `validate` checks every rule of
the composed config in one pass. A rule returns None when the value is fine, else `(why, what to do)`.
"""

from __future__ import annotations

import math
from dataclasses import field
from typing import Any, Callable, Optional, Sequence, Tuple

Problem = Optional[Tuple[str, str]]
Rule = Callable[[Any], Problem]


def key(default: Any, rule: Rule | None = None, **kw: Any) -> Any:
    """A schema field with its range rule (`rule=None`: the type is the whole check)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"rule": rule}, **kw)
    return field(default=default, metadata={"rule": rule}, **kw)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def number(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False,
           nullable: bool = False, hint: str = "") -> Rule:
    """A finite number in [lo, hi] (each end open or closed, None = unbounded); `nullable`: None allowed."""
    lo_b = "-inf" if lo is None else f"{lo:g}"
    hi_b = "inf" if hi is None else f"{hi:g}"
    interval = f"{'(' if lo_open or lo is None else '['}{lo_b}, {hi_b}{')' if hi_open or hi is None else ']'}"
    want = f"must be a finite number in {interval}" + (" or null" if nullable else "")

    def check(v: Any) -> Problem:
        if v is None:
            return None if nullable else (want, hint or "set a number")
        if not _is_num(v) or not math.isfinite(v):
            return want, hint or f"set a number in {interval}"
        if lo is not None and (v < lo or (lo_open and v == lo)) or hi is not None and (v > hi or (hi_open and v == hi)):
            return want, hint or f"set a number in {interval}"
        return None

    return check


def integer(lo: int | None = None, hi: int | None = None, *, nullable: bool = False, hint: str = "") -> Rule:
    """An integer >= lo (and <= hi); `nullable`: None allowed (no cap)."""
    want = "must be an integer" + (f" >= {lo}" if lo is not None else "") + (f" and <= {hi}" if hi is not None else "")
    want += " or null" if nullable else ""

    def check(v: Any) -> Problem:
        if v is None:
            return None if nullable else (want, hint or "set an integer")
        if isinstance(v, bool) or not isinstance(v, int) or (lo is not None and v < lo) or (hi is not None and v > hi):
            return want, hint or (f"set an integer >= {lo}" if lo is not None else "set an integer") + \
                (" or null" if nullable else "")
        return None

    return check


def one_of(*choices: Any, nullable: bool = False) -> Rule:
    valid = ", ".join(str(c) for c in choices) + (", null" if nullable else "")

    def check(v: Any) -> Problem:
        if v is None and nullable or v in choices:
            return None
        return f"must be one of {valid}", f"pick one of {valid}"

    return check


def text(nonempty: bool = True, nullable: bool = False) -> Rule:
    def check(v: Any) -> Problem:
        if v is None:
            return None if nullable else ("must be set", "give a value")
        if nonempty and not str(v).strip():
            return "must not be empty", "give a value"
        return None

    return check


def number_list(item: Rule, *, nonempty: bool = True, nullable: bool = False) -> Rule:
    """A list whose items all pass `item` (a grid: non-empty unless `nonempty=False`)."""

    def check(v: Any) -> Problem:
        if v is None:
            return None if nullable else ("must be a list", "give a list, e.g. [0.1,0.2]")
        if not isinstance(v, (list, tuple)):
            return "must be a list", "give a list, e.g. [0.1,0.2]"
        if nonempty and not v:
            return "must not be empty", "give at least one value, e.g. [0.1,0.2]"
        for x in v:
            p = item(x)
            if p is not None:
                return f"every item {p[0]} (got {x!r})", p[1]
        return None

    return check


def either(*rules: Rule, why: str, todo: str) -> Rule:
    """The value passes at least one of `rules`."""

    def check(v: Any) -> Problem:
        return None if any(r(v) is None for r in rules) else (why, todo)

    return check


def unique_nonempty(v: Sequence[Any]) -> Problem:
    if not v:
        return "must not be empty", "list at least one task"
    dup = sorted({str(x) for x in v if list(v).count(x) > 1})
    if dup:
        return f"lists {', '.join(dup)} more than once", "list each task once"
    return None


def finite_coefficients(v: Any) -> Problem:
    """A mapping merger -> coefficient, or merger -> {backbone: coefficient}: every coefficient finite."""
    def bad(x: Any) -> bool:
        if isinstance(x, dict):
            return any(bad(y) for y in x.values())
        return not _is_num(x) or not math.isfinite(x)

    if v is not None and bad(dict(v)):
        return "every coefficient must be a finite number", "fix the coefficient (e.g. 0.3)"
    return None
