"""Policy specs: ``name`` or ``name:key=value;key=value`` (a policy with non-default parameters, as one string).

The same string names a policy on the command line (``ponder bench --policies``, ``--task embed`` too) and labels its
rows in ``results.jsonl``, so a variant such as ``self-speculative:drafter=lookup+layers`` is measured and reported
beside the default without colliding with it. Inside a comma-separated list, parameters are separated by ``;`` and
list values by ``/``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..errors import PonderError


def parse_value(v: str) -> Any:
    """ints, floats, true/false/none, comma lists (tuples), else the string itself."""
    if "," in v:
        return tuple(parse_value(x) for x in v.split(",") if x.strip())
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(v.lower(), v)


def parse_params(items: list[str] | None) -> dict[str, Any]:
    """``key=value`` items (``--param`` flags or the part of a spec after ':')."""
    out: dict[str, Any] = {}
    for it in items or []:
        if "=" not in it:
            raise PonderError(f"policy parameter {it!r} is not key=value (e.g. score=norm)")
        k, v = it.split("=", 1)
        out[k.strip().replace("-", "_")] = parse_value(v.strip())
    return out


def parse_policy(spec: str) -> tuple[str, dict[str, Any]]:
    """'token-prune:score=norm;layers=1/2' -> ('token-prune', {'score': 'norm', 'layers': (1, 2)})."""
    name, _, rest = spec.partition(":")
    items = [p.replace("/", ",") for p in rest.split(";") if p.strip()]
    return name.strip(), parse_params(items) if rest else {}


def parameters(cls: type) -> dict[str, Any]:
    """A policy class's settable parameters (name -> dataclass field): every init field but the budget knob and
    internal state (fields hidden from repr, such as fitted calibration)."""
    return {f.name: f for f in dataclasses.fields(cls) if f.init and f.repr and f.name != "budget"}


def build(cls: type, name: str, budget: float, params: dict[str, Any]) -> Any:
    """``cls(budget=budget, **params)`` with one-line errors for unknown parameters, and text restored where a
    field is a string (``kv_fill=none`` means the mode "none", not Python's None; ``drafter=1`` the text "1")."""
    fields = parameters(cls)
    bad = sorted(set(params) - set(fields))
    if bad:
        raise PonderError(f"policy {name} has no parameter {bad[0]!r}; its parameters: "
                          f"{', '.join(sorted(fields)) or 'none'}")
    out = dict(params)
    for k, v in params.items():
        kind = str(fields[k].type).replace(" ", "")
        if kind == "str" and not isinstance(v, str):
            out[k] = ("none" if v is None else str(v).lower() if isinstance(v, bool)
                      else ",".join(map(str, v)) if isinstance(v, tuple) else str(v))
            continue
        base, optional = kind.split("|")[0], "None" in kind.split("|")[1:]
        if v is None and optional:
            continue
        ok = {"int": lambda x: isinstance(x, int) and not isinstance(x, bool),
              "float": lambda x: isinstance(x, (int, float)) and not isinstance(x, bool),
              "bool": lambda x: isinstance(x, bool)}.get(base)
        if ok is not None and not ok(v):
            want = {"int": "an integer", "float": "a number", "bool": "true or false"}[base]
            raise PonderError(f"policy {name} parameter {k} must be {want}" + (" or none" if optional else "")
                              + f", not {v!r}")
        if base == "float" and isinstance(v, int):
            out[k] = float(v)
    return cls(budget=budget, **out)
