"""Report files of a DreamBench evaluation: JSON, CSV, a markdown table and a bar chart (matplotlib)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

LABELS = {
    "dino": "DINO",
    "clip-i": "CLIP-I",
    "clip-t": "CLIP-T",
    "face-id": "ID",
    "toy-fidelity": "toy fidelity",
}
#: Bar colours per metric, in order (colour-blind-safe Okabe-Ito hues).
COLOURS = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00"]
MAX_LISTED = 20  # problems listed in report.md; report.json has all of them


def _fmt(value) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def write_reports(report: dict, rows: list[dict], names: list[str], out: Path) -> None:
    """report.json, per_image.csv, per_subject.csv, report.md and per_subject.png (matplotlib) in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    image_fields = [
        "subject",
        "class",
        "group",
        "prompt_index",
        "k",
        "file",
        "prompt",
        "clip_t_prompt",
        *names,
    ]
    _write_csv(out / "per_image.csv", image_fields, rows)
    subject_fields = ["subject", "class", "group", "n_images", *_columns(names)]
    _write_csv(
        out / "per_subject.csv",
        subject_fields,
        [{"subject": s, **v} for s, v in report["per_subject"].items()],
    )
    (out / "report.md").write_text(markdown(report, names))
    bar_chart(report["per_subject"], names, out / "per_subject.png")


def _columns(names: list[str]) -> list[str]:
    return names + (["face-id_no_face_rate"] if "face-id" in names else [])


def _write_csv(path: Path, fields: list[str], rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def markdown(report: dict, names: list[str]) -> str:
    """The report as markdown: protocol, overall/group means, per subject, per prompt, problems."""
    protocol, config = report["protocol"], report["protocol"]["config"]
    columns = _columns(names)
    heads = [LABELS.get(c, c) if c in LABELS else "no-face rate" for c in columns]
    settings = [
        ["dataset", config["dataset"]],
        ["generated", config["generated"]],
        ["images per prompt", str(config["images_per_prompt"])],
        ["CLIP-T prompt", protocol["clip_t_prompt"]],
        ["image score", protocol["image_score"]],
        ["aggregation", protocol["aggregation"]],
    ]
    for name, backbone in protocol["backbones"].items():
        settings.append([f"{LABELS.get(name, name)} backbone", _describe(backbone)])
    for name, reason in protocol.get("not_computed", {}).items():
        settings.append([f"{LABELS.get(name, name)}", f"not computed: {reason}"])
    lines = ["# DreamBench evaluation", "", "## Protocol", ""] + _table(["setting", "value"], settings)
    summary = [
        ["all", str(report["overall"]["n_images"])] + [_fmt(report["overall"].get(c)) for c in columns]
    ]
    for group, values in report["groups"].items():
        summary.append([group, str(values["n_images"])] + [_fmt(values.get(c)) for c in columns])
    lines += ["", "## Overall", ""] + _table(["images", "n", *heads], summary)
    per_subject = [
        [s, v["class"], v["group"], str(v["n_images"])] + [_fmt(v.get(c)) for c in columns]
        for s, v in report["per_subject"].items()
    ]
    lines += ["", "## Per subject", ""] + _table(["subject", "class", "group", "n", *heads], per_subject)
    per_prompt = [
        [p["group"], str(p["prompt_index"]), p["template"], str(p["n_images"])]
        + [_fmt(p.get(c)) for c in columns]
        for p in report["per_prompt"]
    ]
    lines += ["", "## Per prompt (over subjects)", ""] + _table(
        ["group", "#", "prompt", "n", *heads], per_prompt
    )
    lines += ["", "## Problems", ""]
    for kind, items in report["problems"].items():
        lines.append(f"- {kind}: {len(items)}")
        if kind == "missing" and items:
            lines += _missing_by_subject(items)
            continue
        lines += [f"  - {json.dumps(item)}" for item in items[:MAX_LISTED]]
        if len(items) > MAX_LISTED:
            lines.append(f"  - ... {len(items) - MAX_LISTED} more in report.json")
    return "\n".join(lines) + "\n"


def _missing_by_subject(items: list[dict]) -> list[str]:
    counts: dict[str, int] = {}
    for item in items:
        counts[item["subject"]] = counts.get(item["subject"], 0) + 1
    return [f"  - {subject}: {n} missing" for subject, n in counts.items()]


def _describe(backbone: dict) -> str:
    parts = [f"{k}={v}" for k, v in backbone.items() if k != "preprocess"]
    if "preprocess" in backbone:
        p = backbone["preprocess"]
        parts.append(
            f"resize {p['resize']} {p['interpolation']} ({p['resize_mode']}), crop {p['crop']}, "
            f"mean {tuple(round(m, 4) for m in p['mean'])}, std {tuple(round(s, 4) for s in p['std'])}"
        )
    return "; ".join(parts)


def bar_chart(per_subject: dict, names: list[str], path: Path) -> Path | None:
    """Horizontal grouped bars: one group per subject, one bar per metric, scale 0 to 1.

    Drawn with matplotlib (the `plot` extra). Without it the chart is skipped with a one-line message,
    and a chart an earlier run left at `path` is removed, since it would not match this report.

    Args:
        per_subject: subject -> {metric name: value or None}, as `report["per_subject"]`.
        names: the metrics to draw, in legend order.
        path: the PNG to write.
    Returns:
        `path`, or None when matplotlib is missing.

    Example:
        >>> bar_chart(report["per_subject"], ["dino", "clip-i"], out / "per_subject.png")
    """
    try:
        # The object API on the Agg canvas: no pyplot, so no GUI backend and no process-wide figure state.
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        path.unlink(missing_ok=True)
        print(f"skipped {path.name}: the bar chart needs matplotlib; pip install 'pimg[plot]'")
        return None

    subjects = list(per_subject)
    bar = 0.8 / max(1, len(names))  # each subject's group spans 0.8 of a row
    height = 1.0 + 0.13 * max(1, len(subjects)) * (len(names) + 1)
    figure = Figure(figsize=(8.2, height), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for i, name in enumerate(names):
        shown = [
            (row + i * bar, value)
            for row, subject in enumerate(subjects)
            if (value := per_subject[subject].get(name)) is not None and not math.isnan(value)
        ]
        bars = axes.barh(
            [y for y, _ in shown],
            [min(1.0, max(0.0, value)) for _, value in shown],
            height=bar * 0.85,
            color=COLOURS[i % len(COLOURS)],
            label=LABELS.get(name, name),
        )
        axes.bar_label(bars, [f"{value:.2f}" for _, value in shown], padding=2, fontsize=6, color="0.35")
    axes.set_yticks([row + bar * (len(names) - 1) / 2 for row in range(len(subjects))])
    axes.set_yticklabels([subject[:22] for subject in subjects], fontsize=8)
    axes.set_ylim(len(subjects) - 0.1, -0.1 - bar)  # first subject on top
    axes.set_xlim(0.0, 1.0)
    axes.set_xticks([tick / 10 for tick in range(0, 11, 2)])
    axes.xaxis.tick_top()
    axes.grid(axis="x", color="0.86")
    axes.set_axisbelow(True)
    axes.legend(loc="lower left", bbox_to_anchor=(0.0, 1.06), ncols=max(1, len(names)), frameon=False)
    figure.savefig(path, bbox_inches="tight")
    return path


def print_summary(report: dict, names: list[str], out: Path) -> None:
    """Overall figures and problem counts, for the terminal."""
    counts = report["counts"]
    print(
        f"scored {counts['scored_images']} of {counts['expected_images']} expected images "
        f"({counts['missing']} missing, {counts['extra']} extra, {counts['unreadable']} unreadable)"
    )
    for scope, values in [("all", report["overall"]), *report["groups"].items()]:
        cells = ", ".join(f"{LABELS.get(c, c)} {_fmt(values.get(c))}" for c in _columns(names))
        print(f"{scope:7s} n={values['n_images']:5d}  {cells}")
    chart = ", per_subject.png" if (out / "per_subject.png").is_file() else ""  # needs matplotlib
    print(f"reports: {out / 'report.md'}, report.json, per_image.csv, per_subject.csv{chart}")
