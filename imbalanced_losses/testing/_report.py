"""What a DDP exactness check reports, and how its errors are measured.

A :class:`Check` is one comparison at one step; a :class:`DdpReport` collects them. Errors are
the largest absolute difference over every tensor of nested dicts/lists (NaN matches NaN, a
shape or structure mismatch is infinite), optionally relative to the oracle's magnitude.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "Check",
    "DdpMismatch",
    "DdpReport",
    "NotChecked",
    "diff",
    "magnitude",
    "relative_diff",
]


@dataclass(frozen=True)
class Check:
    """One comparison at one step: relative ``error`` vs ``limit`` (a limit of 0: bit-exact)."""

    step: int
    world_size: int
    name: str
    error: float
    limit: float
    scale: float = 0.0  # largest magnitude among the compared values: 0 proves nothing

    @property
    def ok(self) -> bool:
        """Within the limit (a NaN error never is)."""
        return self.error <= self.limit


@dataclass(frozen=True)
class NotChecked:
    """A check that could not run, and why: a report never passes over it in silence."""

    name: str
    reason: str


class DdpMismatch(AssertionError):
    """Raised by :meth:`DdpReport.raise_if_failed`; the message is the report."""


@dataclass
class DdpReport:
    """Every check of a run; ``str(report)`` summarises per check, :meth:`table` lists per step."""

    checks: list[Check]
    final_state: dict[str, Any] = field(default_factory=dict, repr=False)
    not_checked: list[NotChecked] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # options that changed what was compared

    @property
    def ok(self) -> bool:
        """True when every check passed."""
        return all(c.ok for c in self.checks)

    def failures(self) -> list[Check]:
        """The checks that did not pass."""
        return [c for c in self.checks if not c.ok]

    def __str__(self) -> str:
        skipped = (
            f", {len(self.not_checked)} not checked (listed below)" if self.not_checked else ""
        )
        verdict = "PASS" if self.ok else "FAIL"
        lines = [f"DDP exactness: {verdict} ({len(self.checks)} checks{skipped})"]
        for name in dict.fromkeys(c.name for c in self.checks):
            group = [c for c in self.checks if c.name == name]
            bad = [c for c in group if not c.ok]
            worst = max((c.error for c in group), key=lambda e: (e != e, e))
            lines.append(
                f"  {'FAIL' if bad else 'ok  '} {name:<38} max error {worst:.3g} "
                f"(limit {group[0].limit:g}) over {len(group)} steps"
                + (f"; fails at steps {[c.step for c in bad][:10]}" if bad else "")
            )
        lines += [f"  not checked: {n.name}, because {n.reason}" for n in self.not_checked]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)

    def table(self) -> str:
        """Every check of every step, one per line."""
        return "\n".join(
            f"step {c.step:3d} ws={c.world_size} {'ok  ' if c.ok else 'FAIL'} "
            f"{c.name:<38} {c.error:.3g} (limit {c.limit:g})" + f" magnitude {c.scale:.3g}"
            for c in self.checks
        )

    def raise_if_failed(self) -> None:
        """Raise :class:`DdpMismatch` listing every failed check (for use in tests)."""
        if not self.ok:
            failing = "\n".join(
                f"  step {c.step} ws={c.world_size}: {c.name}: error {c.error:.3g} > {c.limit:g}"
                for c in self.failures()[:20]
            )
            raise DdpMismatch(f"{self}\nfirst failures:\n{failing}")


def _flat(obj: Any) -> list:
    if isinstance(obj, dict):  # keys count too: a state with other entries is another state
        return [v for k in sorted(obj, key=str) for v in (str(k), *_flat(obj[k]))]
    if isinstance(obj, (list, tuple)):
        return [v for item in obj for v in _flat(item)]
    return [obj]


def diff(a: Any, b: Any) -> float:
    """Largest absolute difference (NaN matches NaN; a shape or structure mismatch is inf)."""
    fa, fb = _flat(a), _flat(b)
    if len(fa) != len(fb):
        return float("inf")
    worst = 0.0
    for x, y in zip(fa, fb):
        if isinstance(x, Tensor) and isinstance(y, Tensor):
            if x.shape != y.shape:
                return float("inf")
            if x.numel():
                x, y = x.double(), y.double()
                same = (x == y) | (torch.isnan(x) & torch.isnan(y))
                gap = torch.where(same, 0.0, (x - y).abs().nan_to_num(float("inf")))
                worst = max(worst, float(gap.max()))
        elif x != y:
            worst = max(worst, abs(float(x) - float(y)) if _numeric(x, y) else float("inf"))
    return worst


def magnitude(obj: Any) -> float:
    """Largest absolute value over every tensor and number in ``obj`` (NaN counts as 0)."""
    worst = 0.0
    for item in _flat(obj):
        if isinstance(item, Tensor) and item.numel():
            worst = max(worst, float(item.double().nan_to_num(0).abs().max()))
        elif isinstance(item, (int, float)) and item == item:
            worst = max(worst, abs(float(item)))
    return worst


def relative_diff(a: Any, b: Any) -> float:
    """``diff`` relative to the oracle's magnitude (floored so that exact zeros compare)."""
    return diff(a, b) / max(magnitude(b), 1e-8)


def _numeric(x: Any, y: Any) -> bool:
    return isinstance(x, (int, float)) and isinstance(y, (int, float))
