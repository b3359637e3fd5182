"""The outcome of a verification: named checks with figures, as JSON and Markdown."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CheckResult", "VerifyReport"]


def _plain(v: Any) -> Any:
    """JSON-safe copy: non-finite floats become strings ("inf", "nan")."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


@dataclass
class CheckResult:
    """One check: its name, whether it passed, a one-line summary and its figures."""

    name: str
    passed: bool
    summary: str
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return _plain({"name": self.name, "passed": bool(self.passed), "summary": self.summary,
                       "details": self.details})


@dataclass
class VerifyReport:
    """All checks of one model; ``passed`` only when every check passed."""

    checks: list[CheckResult]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def __getitem__(self, name: str) -> CheckResult:
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(f"no check named {name!r}; checks: {[c.name for c in self.checks]}")

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "info": _plain(self.info),
                "checks": [c.to_dict() for c in self.checks]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_markdown(self) -> str:
        """A table of the checks (status, name, summary) and the run's information."""
        lines = [f"**verify: {'PASSED' if self.passed else 'FAILED'}**", "",
                 "| check | status | result |", "|---|---|---|"]
        lines += [f"| {c.name} | {'pass' if c.passed else '**FAIL**'} | {c.summary} |"
                  for c in self.checks]
        for c in self.checks:
            t = c.details.get("tightness") if isinstance(c.details, dict) else None
            if t and t.get("points"):
                keys = ("min", "q05", "q25", "median", "q75", "q95", "max")
                lines += ["", "Tightness: closest adversarial example found / certified radius "
                          f"({t['points']} certified points broken by some attack, "
                          f"{t['never_broken']} never broken)", "",
                          "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys),
                          "| " + " | ".join(f"{t[k]:.3g}" for k in keys) + " |"]
        if self.info:
            lines += ["", "| setting | value |", "|---|---|"]
            lines += [f"| {k} | {v} |" for k, v in _plain(self.info).items()]
        return "\n".join(lines)
