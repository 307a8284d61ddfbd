"""Report files of a DreamBench evaluation: JSON, CSV, a markdown table and a bar chart (drawn with PIL)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

LABELS = {
    "dino": "DINO",
    "clip-i": "CLIP-I",
    "clip-t": "CLIP-T",
    "face-id": "ID",
    "toy-fidelity": "toy fidelity",
}
#: Bar colours per metric, in order (colour-blind-safe Okabe-Ito hues).
COLOURS = [(0, 114, 178), (230, 159, 0), (0, 158, 115), (204, 121, 167), (86, 180, 233), (213, 94, 0)]
MAX_LISTED = 20  # problems listed in report.md; report.json has all of them


def _fmt(value) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def write_reports(report: dict, rows: list[dict], names: list[str], out: Path) -> None:
    """report.json, per_image.csv, per_subject.csv, report.md and per_subject.png in `out`."""
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


def bar_chart(per_subject: dict, names: list[str], path: Path) -> None:
    """Horizontal grouped bars: one group per subject, one bar per metric, scale 0 to 1."""
    font = ImageFont.load_default(size=13)
    bar, gap, label_w, plot_w, margin = 9, 8, 170, 560, 20
    group_h = bar * len(names) + gap
    legend_h = 24
    height = margin * 2 + legend_h + 20 + max(1, len(per_subject)) * group_h
    image = Image.new("RGB", (label_w + plot_w + 70 + margin, height), "white")
    draw = ImageDraw.Draw(image)
    x0, y0 = label_w, margin + legend_h + 20
    for i, name in enumerate(names):  # legend
        lx = x0 + i * 110
        draw.rectangle([lx, margin, lx + 12, margin + 12], fill=COLOURS[i % len(COLOURS)])
        draw.text((lx + 16, margin - 1), LABELS.get(name, name), fill="black", font=font)
    for tick in range(0, 11, 2):  # grid at 0, 0.2, ..., 1
        x = x0 + plot_w * tick / 10
        draw.line([x, y0 - 4, x, height - margin], fill=(220, 220, 220))
        draw.text((x - 8, y0 - 20), f"{tick / 10:.1f}", fill="black", font=font)
    for row, (subject, values) in enumerate(per_subject.items()):
        top = y0 + row * group_h
        draw.text((margin, top + (group_h - gap) / 2 - 8), subject[:22], fill="black", font=font)
        for i, name in enumerate(names):
            value = values.get(name)
            if value is None:
                continue
            y = top + i * bar
            draw.rectangle(
                [x0, y, x0 + plot_w * min(1.0, max(0.0, value)), y + bar - 2], fill=COLOURS[i % len(COLOURS)]
            )
            draw.text(
                (x0 + plot_w + 6, y - 3),
                f"{value:.2f}",
                fill=(90, 90, 90),
                font=ImageFont.load_default(size=9),
            )
    image.save(path)


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
    print(f"reports: {out / 'report.md'}, report.json, per_image.csv, per_subject.csv, per_subject.png")
