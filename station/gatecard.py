"""A gate card per version (like a model card, for the gate): classes, data, metrics against the previous
version, the guarantee, known limits, and the gate's audit trail so far."""

from __future__ import annotations

import datetime as dt
from typing import Any

from bouncer.fitting.operating import curve_table, describe
from bouncer.runtime.gates.bundle import GateBundle
from bouncer.runtime.gates.fit_report import FitReport

LIMITS = (
    "The accuracy guarantee holds for frames like the calibration set (exchangeable with it); a changed line "
    "voids it until the gate is refitted.",
    "Part types and defects never seen are caught by the OOD heads only as far as they look unlike every "
    "training frame; subtle new defects on a known part can pass.",
    "Frame-quality fences come from the training frames: a camera set up differently needs new training data.",
)


def _pct(x: Any) -> str:
    return "-" if x is None else f"{100 * float(x):.1f}%"


def _per_class(bundle: GateBundle) -> list[str]:
    """The guarantee is pooled over the calibration frames; a class with few of them rides on the others.
    Say, per class, how many more labelled calibration frames would let it stand on its own."""
    a, counts = bundle.acceptance, bundle.fit.calibration_class_counts
    if not counts:
        return []
    out = [
        f"Per class (the guarantee above is pooled; on its own a class needs {a.frames_needed} calibration frames "
        f"with no error for the same statement):",
        "",
        "| class | calibration frames | more needed on its own |",
        "| --- | --- | --- |",
    ]
    return out + [f"| {c} | {n} | {max(a.frames_needed - n, 0)} |" for c, n in counts.items()]


def _selection(bundle: GateBundle) -> list[str]:
    """How the heads were chosen: the rule, the winner and the runners-up with their held-out figures."""
    sel = bundle.selection
    out = [f"Heads {', '.join(f'`{n}`' for n in bundle.fusion.names)}, fusion `{bundle.fusion.method}`, threshold "
           f"{bundle.ood_threshold:.3f}.", ""]  # fmt: skip
    op = bundle.operating
    if op:
        out += [f"{describe(op)}. Chosen by {op['rule']}.", "", *curve_table(op), ""]
    if not sel.get("candidates"):
        return [*out, f"Chosen: {sel.get('rule', 'not recorded')}."]
    out += [f"Chosen on held-out known classes: {sel['rule']}.", ""]
    folds = [f["name"] for f in sel["folds"]]
    out += ["| heads | fusion | objective | mean catch | worst catch | mean AUROC | " + " | ".join(folds) + " |"]
    out += ["|" + " --- |" * (6 + len(folds))]
    for c in sel["candidates"][:5]:
        by = c["catch_by_fold"]
        out.append(
            f"| {', '.join(c['heads'])} | {c['fusion']} | {c['objective']:.3f} | {_pct(c['mean_catch'])} "
            f"| {_pct(c['worst_catch'])} | {c['mean_auroc']:.3f} | " + " | ".join(_pct(by.get(f)) for f in folds) + " |"
        )
    return out + [f"- {n}" for n in sel.get("notes") or []]


def gate_card(bundle: GateBundle, previous: GateBundle | None, audit: list[dict[str, Any]]) -> str:
    m, a = bundle.fit, bundle.acceptance
    prev = previous.fit if previous else FitReport()
    lines = [
        f"# Gate {bundle.version}",
        "",
        f"- created: {bundle.created}",
        f"- backbone: {bundle.backbone_name} (`{bundle.backbone_hash[:16]}`)",
        f"- classes: {', '.join(bundle.classes)}",
        f"- previous version: {previous.version if previous else 'none'}",
        "",
        "## Data",
        "",
        "| | this gate | previous |",
        "| --- | --- | --- |",
        f"| training frames | {m.train_images or '-'} | {prev.train_images or '-'} |",
        f"| calibration frames | {m.calibration_images or '-'} | {prev.calibration_images or '-'} |",
    ]
    for cls, n in m.class_counts.items():
        lines.append(f"| training frames of `{cls}` | {n} | {prev.class_counts.get(cls, '-')} |")
    retrain = m.retrain
    if retrain:
        lines.append(f"| operator labels used | {retrain.get('labelled_used', '-')} | |")
        lines.append(f"| new classes | {', '.join(retrain.get('new_classes') or []) or 'none'} | |")
        for cls, n in (retrain.get("labels_needed") or {}).items():
            lines.append(f"| more labels of `{cls}` for its own guarantee | {n} | |")
        for cls, pend in (retrain.get("pending_classes") or {}).items():
            lines.append(
                f"| `{cls}` left out (still flagged): {pend['why']} | about {pend['labels_needed']} more labels | |"
            )
    lines += [
        "",
        "## Metrics",
        "",
        "| metric (calibration set) | this gate | previous |",
        "| --- | --- | --- |",
    ]

    def ece(f: FitReport) -> str:
        return "-" if f.classifier is None else str(f.classifier.ece_after_scaling)

    lines.append(f"| accuracy | {_pct(m.calibration_accuracy)} | {_pct(prev.calibration_accuracy)} |")
    lines.append(f"| coverage (auto-accepted) | {_pct(m.calibration_coverage)} | {_pct(prev.calibration_coverage)} |")
    lines.append(f"| ECE after temperature scaling | {ece(m)} | {ece(prev)} |")
    if retrain.get("challenger", {}).get("frames"):
        ch, cp = retrain["challenger"], retrain["champion"]
        lines += [
            "",
            f"Held-out operator labels ({ch['frames']} frames), this gate vs the champion it challenged "
            f"({cp['version']}): accepted error {_pct(ch['accepted_error'])} vs {_pct(cp['accepted_error'])}, "
            f"coverage {_pct(ch['coverage'])} vs {_pct(cp['coverage'])}, correct accepts "
            f"{ch['accepted_correct']} vs {cp['accepted_correct']}.",
        ]
    lines += ["", "## OOD heads", "", *_selection(bundle)]
    guarantee = (
        f"accepted frames are at least {_pct(a.target_accuracy)} correct with probability {_pct(1 - a.delta)} "
        f"(Learn-then-Test, Clopper-Pearson; error bound {a.error_bound:.4f} from {a.n_errors} errors in "
        f"{a.n_accepted} accepted of {a.n_calibration} calibration frames)"
        if a.threshold is not None
        else f"none: no confidence threshold reaches {_pct(a.target_accuracy)}; this gate auto-accepts nothing"
    )
    lines += ["", "## Guarantee", "", guarantee, "", *_per_class(bundle), "", "## Known limits", ""]
    lines += [f"- {x}" for x in LIMITS]
    lines += ["", "## Audit trail", "", "| when (UTC) | event | by | details |", "| --- | --- | --- | --- |"]
    for r in audit:
        when = dt.datetime.fromtimestamp(r["ts"], dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
        detail = ", ".join(f"{k}={v}" for k, v in r["details"].items() if not isinstance(v, dict | list))[:200]
        lines.append(f"| {when} | {r['event']} | {r['actor']} | {detail} |")
    return "\n".join(lines) + "\n"
