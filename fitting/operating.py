"""The OOD operating point, set by the line's risk rather than by a fixed quantile.

A line states how many of its good frames it can afford to send to review (the review budget, e.g. 5%) and,
optionally, the share of never-seen defects it wants caught. From pseudo-unknowns only (each known class held
out in turn, synthetic defects made from its own calibration frames, and real defective frames where the user
has some) the fit estimates the catch-versus-flag curve of the chosen heads, then sets the threshold:

- the good frames' flag rate is certified calibration-conditionally (Bates et al., "Testing for outliers with
  conformal p-values", 2023): flagging the k highest of n good calibration scores keeps a new good frame's flag
  probability at most r with probability 1 - delta when P(Bin(n, r) <= k) <= delta (the flag probability of the
  (k+1)-th largest score is Beta(k+1, n-k));
- within the budget it takes the highest estimated catch; where the real evidence (held-out classes, real
  defects) is caught as well at a lower rate, the lower rate (flagging more catches nothing more of what the
  line has shown). Synthetic defects never decide it: they are a stand-in where nothing better exists, easier
  than real defects in some ways and harder in others;
- with a target catch rate, the lowest rate within the budget whose estimate reaches it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bouncer.runtime.errors import BouncerError
from bouncer.runtime.gates.risk import binom_cdf, clopper_pearson_upper, frames_needed

# flag rates the curve is drawn at (and a target catch searched over): fixed before any data is seen
GRID = (0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5)
DEFAULT_BUDGET = 0.05
PLATEAU_TOL = 0.005  # a lower rate is "as good" when every trusted fold's catch is within this of the budget's
SYNTHETIC = "synthetic defects"
REAL = "real defects"


def check_budget(budget: float, target_catch: float | None) -> None:
    if not 0 < budget <= 0.5:
        raise BouncerError(
            f"--review-budget must be in (0, 0.5] (the share of good frames sent to review), got {budget}"
        )
    if target_catch is not None and not 0 < target_catch <= 1:
        raise BouncerError(f"--target-catch must be in (0, 1], got {target_catch}")


def certified_flags(n: int, rate: float, delta: float) -> int | None:
    """The most good calibration frames (of n) the threshold may flag so that a new good frame is flagged with
    probability at most `rate`, with probability 1 - delta; None when even flagging none cannot certify it."""
    if n <= 0 or binom_cdf(0, n, rate) > delta:
        return None
    k = 0
    while k + 1 < n and binom_cdf(k + 1, n, rate) <= delta:
        k += 1
    return k


def conformal_quantile(scores: np.ndarray, q: float) -> float:
    """The ceil((n+1) q)-th smallest score: a clean frame exceeds it with probability at most 1 - q."""
    s = np.sort(scores)
    k = min(len(s), math.ceil((len(s) + 1) * q))
    return float(s[k - 1])


def threshold_flagging(scores_good: np.ndarray, k: int) -> float:
    """The threshold that flags (score strictly above it) the k highest good calibration scores."""
    s = np.sort(np.asarray(scores_good, np.float64))[::-1]
    return float(s[min(k, len(s) - 1)])


@dataclass
class FoldScores:
    """Fused scores of one pseudo-unknown fold: its clean calibration frames and its pseudo-unknowns."""

    name: str
    calib: np.ndarray
    unknown: np.ndarray

    @property
    def basis(self) -> str:
        return self.name if self.name in (SYNTHETIC, REAL) else "held-out classes"

    def catch_at(self, rate: float) -> float:
        """Share of the fold's pseudo-unknowns above the threshold that flags `rate` of its calibration frames."""
        return float((self.unknown > conformal_quantile(self.calib, 1 - rate)).mean())


def _interval(hits: int, n: int, delta: float) -> tuple[float, float]:
    """Two-sided Clopper-Pearson interval at level 1 - delta."""
    hi = clopper_pearson_upper(hits, n, delta / 2)
    lo = 1 - clopper_pearson_upper(n - hits, n, delta / 2)
    return round(lo, 4), round(hi, 4)


def _estimate(folds: Sequence[FoldScores], rate: float, delta: float) -> dict[str, Any]:
    """Catch at a flag rate on the most trustworthy basis present: real defects, else held-out classes, else
    synthetic defects; pooled over that basis's folds with its interval, and the worst fold."""
    for basis in (REAL, "held-out classes", SYNTHETIC):
        fs = [f for f in folds if f.basis == basis]
        if fs:
            break
    hits = sum(round(f.catch_at(rate) * len(f.unknown)) for f in fs)
    n = sum(len(f.unknown) for f in fs)
    lo, hi = _interval(hits, n, delta)
    return {"basis": basis, "catch": round(hits / n, 4) if n else None, "catch_low": lo, "catch_high": hi,
            "worst_fold": round(min(f.catch_at(rate) for f in fs), 4), "frames": n}  # fmt: skip


@dataclass
class OperatingPoint:
    threshold: float
    rate: float  # the flag rate certified for good frames
    record: dict[str, Any]


def choose(
    good: np.ndarray,
    folds: Sequence[FoldScores],
    budget: float,
    target_catch: float | None,
    delta: float,
) -> OperatingPoint:
    """The OOD threshold on the fused scores of good calibration frames passing the quality gate (`good`)."""
    n = len(good)
    if certified_flags(n, budget, delta) is None:
        raise BouncerError(
            f"a review budget of {budget} at delta {delta} needs at least {frames_needed(budget, delta)} good "
            f"calibration frames passing the quality gate, have {n}: add calibration frames or raise --review-budget"
        )
    grid = sorted({r for r in GRID if r < budget and certified_flags(n, r, delta) is not None} | {budget})
    curve: list[dict[str, Any]] = []
    for r in grid:
        k = certified_flags(n, r, delta)
        assert k is not None
        expected = (k + 1) / (n + 1)  # a new good frame's flag probability at this threshold, on average
        row: dict[str, Any] = {"rate": r, "flagged_calibration": k, "expected_flag_rate": round(expected, 4)}
        if folds:
            row |= _estimate(folds, expected, delta)
            row["by_fold"] = {f.name: round(f.catch_at(expected), 4) for f in folds}
        curve.append(row)
    at_budget = curve[-1]
    rule = "the budget: highest catch within it"
    pick = at_budget
    trusted = [f for f in folds if f.basis != SYNTHETIC]
    if target_catch is not None and folds:
        reached = [row for row in curve if (row["catch"] or 0) >= target_catch]
        if reached:
            pick, rule = reached[0], f"the lowest flag rate whose estimated catch reaches {target_catch}"
        else:
            rule = f"target catch {target_catch} not reached within the budget: the budget"
    elif trusted:
        full = {f.name: f.catch_at(at_budget["expected_flag_rate"]) for f in trusted}
        for row in curve:
            if all(f.catch_at(row["expected_flag_rate"]) >= full[f.name] - PLATEAU_TOL for f in trusted):
                pick = row
                if row is not at_budget:
                    rule = "the lowest rate catching the held-out folds as well as the budget (more catches no more)"
                break
    threshold = threshold_flagging(good, int(pick["flagged_calibration"]))
    flagged = int((np.asarray(good) > threshold).sum())
    basis: str | None = pick.get("basis")
    note = {
        REAL: "real defective frames given at fit time",
        "held-out classes": "known classes held out in turn (new defect types may differ)",
        SYNTHETIC: "synthetic defects only: real escapes may be higher",
        None: "no pseudo-unknowns: catch not estimated",
    }[basis]
    record = {
        "budget": budget,
        "target_catch": target_catch,
        "delta": delta,
        "rule": rule,
        "rate": pick["rate"],
        "good_calibration_frames": n,
        "good_calibration_flagged": flagged,
        "flag_bound": round(clopper_pearson_upper(flagged, n, delta), 4),
        "threshold": threshold,
        "catch": pick.get("catch"),
        "catch_low": pick.get("catch_low"),
        "catch_high": pick.get("catch_high"),
        "basis": note,
        "folds": [{"name": f.name, "calibration": len(f.calib), "pseudo_unknown": len(f.unknown)} for f in folds],
        "curve": curve,
    }
    return OperatingPoint(threshold, pick["rate"], record)


def describe(record: dict[str, Any]) -> str:
    """One line for `bouncer fit` and the gate card."""
    catch = record.get("catch")
    est = (
        f"estimated catch of never-seen defects {catch:.1%} ({record['catch_low']:.1%}-{record['catch_high']:.1%}, "
        f"{record['basis']})"
        if catch is not None
        else "catch not estimated (no pseudo-unknowns)"
    )
    return (
        f"operating point: good frames flagged <= {record['rate']:.1%} with probability >= {1 - record['delta']:.2f} "
        f"(review budget {record['budget']:.1%}; {record['good_calibration_flagged']} of "
        f"{record['good_calibration_frames']} good calibration frames flagged); {est}"
    )


def curve_table(record: dict[str, Any]) -> list[str]:
    """The catch-versus-flag curve as a Markdown table (gate card)."""
    rows = record.get("curve") or []
    if not rows:
        return []
    out = ["| good frames flagged (certified) | expected | estimated catch | interval | worst fold | |",
           "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for row in rows:
        mark = "**operating point**" if row["rate"] == record["rate"] else ""
        c = row.get("catch")
        cell = "-" if c is None else f"{c:.1%}"
        iv = "-" if c is None else f"{row['catch_low']:.1%}-{row['catch_high']:.1%}"
        worst = "-" if c is None else f"{row['worst_fold']:.1%}"
        out.append(f"| <= {row['rate']:.1%} | {row['expected_flag_rate']:.1%} | {cell} | {iv} | {worst} | {mark} |")
    return out


def curve_plot(record: dict[str, Any], path: Any) -> Any:
    """The curve as a PNG: estimated catch (and its interval) against the good frames' flag rate; None where
    nothing estimated the catch."""
    from bouncer.fitting.plots import line_plot

    rows = [r for r in record.get("curve") or [] if r.get("catch") is not None]
    if not rows:  # no pseudo-unknowns (a detector gate): no catch to draw
        return None
    xs = [r["expected_flag_rate"] for r in rows]
    curves = {
        "estimated catch": (xs, [r["catch"] for r in rows]),
        "interval low": (xs, [r["catch_low"] for r in rows]),
        "interval high": (xs, [r["catch_high"] for r in rows]),
        "operating point": ([r["expected_flag_rate"] for r in rows if r["rate"] == record["rate"]] * 2, [0.0, 1.0]),
    }
    return line_plot(curves, path, f"catch vs good frames flagged ({record['basis']})", "good frames flagged", "catch")
