"""Policy names to factories, with parameter checking that names the bad parameter.

``build_policy(name, params, budget=B)`` returns a ready policy bounded by
budget ``B``. ``ensemble`` is not a stream policy but a sampling plan; use
``ensemble_params``. Routes name a policy in the routes file; a request may
override it with the ``stopgate`` field (see the README).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Container, Mapping
from typing import Any

from policies.base import PolicyError, StopPolicy
from policies.brake import BrakePolicy
from policies.budget import BudgetPolicy
from policies.compose import Bounded
from policies.confidence import ConfidencePolicy
from policies.convergence import ConvergencePolicy
from policies.cue import CuePolicy
from policies.ensemble import MAX_MEMBERS, EnsembleParams, Member
from policies.loop import LoopPolicy
from policies.marker import ALL_TRUSTED, MarkerPolicy
from policies.none import BudgetOnly, NoPolicy
from policies.static import StaticPolicy

STREAM_POLICIES: dict[str, type[Any]] = {
    "none": NoPolicy,
    "budget": BudgetOnly,  # the budget itself is the outer bound every policy gets
    "marker": MarkerPolicy,
    "cue": CuePolicy,
    "brake": BrakePolicy,
    "convergence": ConvergencePolicy,
    "confidence": ConfidencePolicy,
    "loop": LoopPolicy,
    "static": StaticPolicy,
}
NAMES = (*STREAM_POLICIES, "ensemble")

_TYPES: dict[str, Callable[[Any], bool]] = {
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "tuple[str, ...]": lambda v: isinstance(v, list | tuple) and all(isinstance(x, str) for x in v),
}


def construct(
    cls: type[Any], params: Mapping[str, Any], *, policy: str, private: Mapping[str, Any] | None = None
) -> Any:
    """Build dataclass ``cls`` from ``params``, refusing unknown names and wrong types.

    Fields whose names start with ``_`` are never parameters; ``private`` sets them (the gateway's own say).
    """
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")}
    unknown = sorted(set(params) - set(fields))
    if unknown:
        raise PolicyError(
            f"policy '{policy}' has no parameter {unknown[0]!r}; it takes {sorted(fields)}", param=unknown[0]
        )
    kwargs = dict(private or {})
    for key, value in params.items():
        check = _TYPES.get(str(fields[key].type))
        if check is not None and not check(value):
            raise PolicyError(
                f"policy '{policy}' parameter {key!r}: expected {fields[key].type}, got {value!r}", param=key
            )
        if str(fields[key].type) == "float":
            try:
                value = float(value)  # a huge int would overflow later, in the policy's own range checks
            except OverflowError as exc:
                raise PolicyError(f"policy '{policy}' parameter {key!r}: out of range", param=key) from exc
        kwargs[key] = tuple(value) if isinstance(value, list) else value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise PolicyError(f"policy '{policy}': {exc}") from exc
    except PolicyError as exc:
        param = exc.param or str(exc).partition(":")[0]
        raise PolicyError(f"policy '{policy}' parameter {exc}", param=param if param in fields else None) from exc


def build_policy(
    name: str, params: Mapping[str, Any], *, budget: int, trusted_patterns: Container[str] = ()
) -> StopPolicy:
    """The policy ``name`` bounded by ``budget``.

    ``trusted_patterns``: the regular expressions that come from the routes file (``marker`` runs them on
    Python's ``re``); any other pattern is a client's and runs on RE2 (``policies/marker.py``).
    """
    cls = STREAM_POLICIES.get(name)
    if cls is None:
        if name == "ensemble":
            raise PolicyError("'ensemble' is a sampling plan; build it with ensemble_params()")
        raise PolicyError(f"unknown policy {name!r}; known policies: {', '.join(NAMES)}")
    private: dict[str, Any] = {}
    if cls is MarkerPolicy and isinstance(params.get("pattern"), str) and params["pattern"] in trusted_patterns:
        private["_trusted"] = True
    inner: StopPolicy = construct(cls, params, policy=name, private=private)
    return Bounded(BudgetPolicy(budget), inner)


def ensemble_params(
    params: Mapping[str, Any], *, budget: int = 1, trusted_patterns: Container[str] = ()
) -> tuple[EnsembleParams, dict[str, Any]]:
    """The ensemble plan and its inner policy's parameters (``inner_params``), both checked."""
    inner_params = params.get("inner_params", {})
    if not isinstance(inner_params, Mapping):
        raise PolicyError("policy 'ensemble' parameter 'inner_params': expected a mapping", param="inner_params")
    plan: EnsembleParams = construct(
        EnsembleParams, {k: v for k, v in params.items() if k not in ("inner_params", "members")}, policy="ensemble"
    )
    try:
        build_policy(plan.inner, inner_params, budget=budget, trusted_patterns=trusted_patterns)
    except PolicyError as exc:
        raise PolicyError(str(exc), param=f"inner_params.{exc.param}" if exc.param else "inner_params") from exc
    if "members" in params:
        plan = dataclasses.replace(
            plan, members=members(params["members"], budget=budget, trusted_patterns=trusted_patterns)
        )
    return plan, dict(inner_params)


def members(raw: Any, *, budget: int, trusted_patterns: Container[str] = ()) -> tuple[Member, ...]:
    """The ensemble's ``members``: a list of ``{policy, params, budget, weight}``, each checked like a route's."""
    if not isinstance(raw, list | tuple) or not raw:
        raise PolicyError("policy 'ensemble' parameter 'members': expected a non-empty list")
    # Counted before any member is built: each build costs the gateway work the client chose.
    if len(raw) > MAX_MEMBERS:
        raise PolicyError(f"policy 'ensemble' parameter 'members': at most {MAX_MEMBERS}, got {len(raw)}")
    out = []
    for i, item in enumerate(raw):
        where = f"policy 'ensemble' parameter 'members[{i}]'"
        if not isinstance(item, Mapping) or not isinstance(item.get("policy"), str):
            raise PolicyError(f"{where}: expected an object with a 'policy' name")
        unknown = sorted(set(item) - {"policy", "params", "budget", "weight"})
        if unknown:
            raise PolicyError(f"{where}: unknown key {unknown[0]!r}")
        params, size, weight = item.get("params", {}), item.get("budget"), item.get("weight", 1.0)
        if not isinstance(params, Mapping):
            raise PolicyError(f"{where}: 'params' must be an object")
        if size is not None and (not isinstance(size, int) or isinstance(size, bool)):
            raise PolicyError(f"{where}: 'budget' must be an integer")
        if not isinstance(weight, int | float) or isinstance(weight, bool):
            raise PolicyError(f"{where}: 'weight' must be a number")
        try:
            weight = float(weight)  # a huge int overflows a float
        except (OverflowError, ValueError) as exc:
            raise PolicyError(f"{where}: 'weight' is out of range") from exc
        if not math.isfinite(weight) or weight <= 0:
            raise PolicyError(f"{where}: 'weight' must be a finite number > 0, got {weight}")
        try:
            member = Member(item["policy"], dict(params), size, weight)
            build_policy(
                member.policy, member.params, budget=member.budget or budget, trusted_patterns=trusted_patterns
            )
        except PolicyError as exc:
            raise PolicyError(f"{where}: {exc}") from exc
        out.append(member)
    return tuple(out)


def validate(name: str, params: Mapping[str, Any], *, budget: int = 1) -> None:
    """Raise PolicyError if ``name`` with ``params`` (from the routes file: trusted) would not build."""
    if name == "ensemble":
        ensemble_params(params, budget=budget, trusted_patterns=ALL_TRUSTED)
    else:
        build_policy(name, params, budget=budget, trusted_patterns=ALL_TRUSTED)
