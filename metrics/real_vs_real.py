"""Checks of a backbone on real photos: same-subject vs different-subject similarity, face verification.

`real_vs_real` embeds every photo of a dataset of subject folders (DreamBench, or the face set) and
asks whether photos of one subject are closer to each other than to other subjects' photos: leave-
one-out retrieval accuracy and the gap between the two similarity distributions. A backbone with
real weights and the right preprocessing retrieves near 100%; a wiring or preprocessing bug drops
it toward chance. `face_verification` is the face-recognition form: same-person vs different-person
pairs by embedding distance, accuracy at the best single threshold.
"""

from __future__ import annotations

import csv
import itertools
from pathlib import Path

import numpy as np
import torch

from pimg.errors import InputError
from pimg.metrics.images import image_files

#: identities.csv label of photos that show several people (kept out of identity pairs).
MULTIPLE = "multiple"


def photo_groups(dataset: str | Path) -> dict[str, list[Path]]:
    """Subject -> photos: from `identities.csv` (file,identity) when present, else one group per subfolder.

    Raises:
        InputError: no folder, or no subject with photos.
    """
    root = Path(dataset)
    if not root.is_dir():
        raise InputError(f"--dataset {root} is not a folder of subject folders.")
    groups: dict[str, list[Path]] = {}
    table = root / "identities.csv"
    if table.is_file():
        with table.open() as f:
            for row in csv.DictReader(f):
                groups.setdefault(row["identity"], []).append(root / row["file"])
    else:
        for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if files := image_files(folder):
                groups[folder.name] = files
    if not groups:
        raise InputError(f"--dataset {root} has no subject folders with photos (and no identities.csv).")
    return groups


def _stats(values: torch.Tensor) -> dict:
    if values.numel() == 0:
        return {"n": 0}
    v = values.double()
    return {
        "n": int(v.numel()),
        "mean": float(v.mean()),
        "std": float(v.std()) if v.numel() > 1 else 0.0,
        "min": float(v.min()),
        "max": float(v.max()),
    }


def real_vs_real(dataset: str | Path, embedder) -> dict:
    """Same-subject vs different-subject similarity of real photos under one backbone.

    Args:
        dataset: folder of subject folders (or with identities.csv); groups labelled "multiple" are left out.
        embedder: a backbone from `pimg.metrics.load_embedder` (features + similarity).
    Returns:
        nearest-neighbour top-1 (is the most similar other photo of the same subject?), subject top-1
        (is the subject whose other photos are most similar on average the right one?), their chance
        levels, the same/different similarity statistics and their gap, per-subject top-1.

    Example:
        >>> real_vs_real("../shared/dreambench", load_embedder("clip-i", "toy", "tiny"))["subject_top1"]
    """
    groups = {k: v for k, v in photo_groups(dataset).items() if k != MULTIPLE}
    paths = [p for files in groups.values() for p in files]
    labels = np.array([name for name, files in groups.items() for _ in files])
    features = embedder.features(paths)
    valid = ~torch.isnan(features).any(dim=1).numpy()
    sim = embedder.similarity(features, features).numpy().astype(np.float64)
    names = sorted(set(labels[valid]))
    nn_hits, subject_hits, nn_chance, per_subject = [], [], [], {n: [] for n in names}
    for i in np.flatnonzero(valid):
        others = valid.copy()
        others[i] = False
        same = others & (labels == labels[i])
        if not same.any():  # a subject's only photo can be a distractor, never a query
            continue
        candidates = np.flatnonzero(others)
        nn_hits.append(labels[candidates[np.argmax(sim[i, candidates])]] == labels[i])
        nn_chance.append(same.sum() / others.sum())
        means = {n: sim[i, others & (labels == n)].mean() for n in names if (others & (labels == n)).any()}
        hit = max(means, key=means.get) == labels[i]
        subject_hits.append(hit)
        per_subject[labels[i]].append(hit)
    upper = np.triu(np.ones_like(sim, dtype=bool), k=1) & valid[:, None] & valid[None, :]
    same_pair = labels[:, None] == labels[None, :]
    same = torch.from_numpy(sim[upper & same_pair])
    different = torch.from_numpy(sim[upper & ~same_pair])
    if not nn_hits:
        raise InputError(f"{dataset}: no subject has two photos that could be embedded; nothing to retrieve.")
    return {
        "dataset": str(dataset),
        "backbone": embedder.description,
        "n_images": len(paths),
        "n_subjects": len(names),
        "not_embedded": [str(p) for p, ok in zip(paths, valid, strict=True) if not ok],
        "queries": len(nn_hits),
        "nearest_neighbour_top1": float(np.mean(nn_hits)),
        "nearest_neighbour_chance": float(np.mean(nn_chance)),
        "subject_top1": float(np.mean(subject_hits)),
        "subject_chance": 1.0 / len(names),
        "same_subject": _stats(same),
        "different_subject": _stats(different),
        "gap": float(same.mean() - different.mean()),
        "per_subject_top1": {n: float(np.mean(h)) for n, h in per_subject.items() if h},
    }


def best_threshold(same: np.ndarray, different: np.ndarray) -> dict:
    """The distance threshold (same if <= t) with the best balanced accuracy, and its accuracies.

    Candidates are midpoints between consecutive sorted distances, so the threshold separates pairs
    as cleanly as the data allow.
    """
    values = np.sort(np.concatenate([same, different]))
    candidates = np.concatenate([[values[0] - 1e-6], (values[1:] + values[:-1]) / 2, [values[-1] + 1e-6]])
    best = None
    for t in candidates:
        result = threshold_accuracy(same, different, float(t))
        key = (result["balanced_accuracy"], result["pair_accuracy"])
        if best is None or key > best[0]:
            best = (key, result)
    return best[1]


def threshold_accuracy(same: np.ndarray, different: np.ndarray, threshold: float) -> dict:
    """Accuracies when pairs at distance <= threshold are called "same person"."""
    same_ok, different_ok = (same <= threshold), (different > threshold)
    return {
        "threshold": threshold,
        "same_person_accuracy": float(same_ok.mean()),
        "different_person_accuracy": float(different_ok.mean()),
        "balanced_accuracy": float((same_ok.mean() + different_ok.mean()) / 2),
        "pair_accuracy": float((same_ok.sum() + different_ok.sum()) / (same.size + different.size)),
    }


#: Each face backend's native distance and its published same-person threshold.
NATIVE_DISTANCE = {"dlib": ("euclidean", 0.6), "insightface": ("cosine", 0.6)}


def face_verification(dataset: str | Path, backend) -> dict:
    """Same-person vs different-person verification over every pair of single-person photos.

    Args:
        dataset: photos grouped by person (identities.csv or one folder per person).
        backend: a face backend (`DlibFaceBackend`, `InsightFaceBackend`).
    Returns:
        faces found per photo, the no-face rate, both distance distributions (Euclidean and
        cosine distance), the best-threshold accuracies and those at the backend's standard threshold.

    Example:
        >>> face_verification("../shared/faces", DlibFaceBackend())["euclidean"]["best"]["same_person_accuracy"]
    """
    groups = photo_groups(dataset)
    detections = {str(p): len(backend.detect(p)) for p in groups.get(MULTIPLE, [])}
    people = {k: v for k, v in groups.items() if k != MULTIPLE}
    paths = [p for files in people.values() for p in files]
    labels = [name for name, files in people.items() for _ in files]
    embeddings, kept = [], []
    for path, label in zip(paths, labels, strict=True):
        faces = backend.detect(path)
        detections[str(path)] = len(faces)
        if faces:
            embeddings.append(faces[0].embedding.astype(np.float64))
            kept.append(label)
    if len(embeddings) < 2:
        raise InputError(
            f"{dataset}: faces were found in {len(embeddings)} photos; verification needs pairs."
        )
    e = np.stack(embeddings)
    unit = e / np.linalg.norm(e, axis=1, keepdims=True)
    pairs = list(itertools.combinations(range(len(kept)), 2))
    is_same = np.array([kept[i] == kept[j] for i, j in pairs])
    distances = {
        "euclidean": np.array([np.linalg.norm(e[i] - e[j]) for i, j in pairs]),
        "cosine": np.array([1.0 - unit[i] @ unit[j] for i, j in pairs]),
    }
    native, standard = NATIVE_DISTANCE.get(backend.description["backend"], ("cosine", 0.6))
    report = {
        "dataset": str(dataset),
        "backbone": backend.description,
        "photos": len(paths),
        "no_face_rate": sum(detections[str(p)] == 0 for p in paths) / len(paths),
        "faces_per_photo": detections,
        "same_pairs": int(is_same.sum()),
        "different_pairs": int((~is_same).sum()),
        "native_distance": native,
    }
    for name, d in distances.items():
        report[name] = {
            "same_person": _stats(torch.from_numpy(d[is_same])),
            "different_person": _stats(torch.from_numpy(d[~is_same])),
            "best": best_threshold(d[is_same], d[~is_same]),
            "same_values": sorted(float(v) for v in d[is_same]),
            "different_values": sorted(float(v) for v in d[~is_same]),
        }
        if name == native:
            report[name]["standard"] = threshold_accuracy(d[is_same], d[~is_same], standard)
    return report


def text_histogram(
    same: list[float], different: list[float], bin_width: float = 0.05, width: int = 40
) -> str:
    """Two distance distributions side by side as rows of '#' (same) and '.' (different)."""
    low = np.floor(min(min(same), min(different)) / bin_width) * bin_width
    top = max(max(same), max(different))
    bins = np.arange(low, top + bin_width, bin_width)
    hs, _ = np.histogram(same, bins=bins)
    hd, _ = np.histogram(different, bins=bins)
    scale = width / max(1, hs.max(), hd.max())
    lines = [f"{'distance':>11s}  {'same':>4s} {'diff':>4s}"]
    for lo, a, b in zip(bins[:-1], hs, hd, strict=True):
        lines.append(
            f"{lo:5.2f}-{lo + bin_width:4.2f}  {a:4d} {b:4d}  {'#' * round(a * scale)}{'.' * round(b * scale)}"
        )
    return "\n".join(lines)


def format_real_vs_real(report: dict) -> str:
    """The real-vs-real figures as plain text."""
    same, diff = report["same_subject"], report["different_subject"]
    backbone = ", ".join(f"{k}={v}" for k, v in report["backbone"].items() if k != "preprocess")
    lines = [
        f"backbone: {backbone}",
        f"{report['n_images']} photos of {report['n_subjects']} subjects ({report['queries']} queries; "
        f"{len(report['not_embedded'])} not embedded)",
        f"nearest-neighbour top-1: {100 * report['nearest_neighbour_top1']:.1f}% "
        f"(chance {100 * report['nearest_neighbour_chance']:.1f}%)",
        f"subject top-1 (mean similarity): {100 * report['subject_top1']:.1f}% (chance {100 * report['subject_chance']:.1f}%)",
        f"same-subject similarity {same['mean']:.3f} +- {same['std']:.3f} (n={same['n']}), "
        f"different-subject {diff['mean']:.3f} +- {diff['std']:.3f} (n={diff['n']}), gap {report['gap']:.3f}",
    ]
    return "\n".join(lines)


def format_face_verification(report: dict) -> str:
    """Verification accuracies and the two distance distributions as plain text."""
    native = report["native_distance"]
    lines = [
        f"{report['photos']} single-person photos, {report['same_pairs']} same-person and "
        f"{report['different_pairs']} different-person pairs; no-face rate {100 * report['no_face_rate']:.1f}%",
    ]
    multi = {k: v for k, v in report["faces_per_photo"].items() if v != 1}
    if multi:
        lines.append(
            "photos with other than one face: " + ", ".join(f"{Path(k).name}: {v}" for k, v in multi.items())
        )
    for name in (native, *(n for n in ("euclidean", "cosine") if n != native)):
        r = report[name]
        s, d, best = r["same_person"], r["different_person"], r["best"]
        lines += [
            "",
            f"{name} distance: same person {s['min']:.3f}-{s['max']:.3f} (mean {s['mean']:.3f}), "
            f"different people {d['min']:.3f}-{d['max']:.3f} (mean {d['mean']:.3f})",
            f"  best threshold {best['threshold']:.3f}: same-person accuracy {100 * best['same_person_accuracy']:.1f}%, "
            f"different-person {100 * best['different_person_accuracy']:.1f}%, all pairs {100 * best['pair_accuracy']:.1f}%",
        ]
        if "standard" in r:
            std = r["standard"]
            lines.append(
                f"  standard threshold {std['threshold']:.2f}: same-person {100 * std['same_person_accuracy']:.1f}%, "
                f"different-person {100 * std['different_person_accuracy']:.1f}%, all pairs {100 * std['pair_accuracy']:.1f}%"
            )
        if name == native:
            lines += ["", text_histogram(r["same_values"], r["different_values"])]
    return "\n".join(lines)


def run_real_vs_real(
    dataset: str,
    metric: str = "clip-i",
    backend: str | None = None,
    model: str | None = None,
    *,
    pretrained: str | None = None,
    device: str = "cpu",
    batch_size: int = 32,
    out: str | None = None,
) -> dict:
    """`pimg eval real-vs-real`: load the backbone of `metric`, print the figures, optionally save JSON."""
    from pimg.metrics.registry import METRICS, load_embedder

    if METRICS.get(metric) is not None and METRICS[metric].kind == "text":
        raise InputError(
            f"--metric {metric} compares images with prompts; real-vs-real needs an image metric."
        )
    embedder = load_embedder(
        metric, backend, model, pretrained=pretrained, device=device, batch_size=batch_size
    )
    report = real_vs_real(dataset, embedder) | {"metric": metric}
    print(format_real_vs_real(report))
    _save(report, out)
    return report


def run_face_verification(
    dataset: str, backend: str = "dlib", model: str | None = None, out: str | None = None
) -> dict:
    """`pimg eval faces`: verification accuracy and distance distributions; optionally save JSON."""
    from pimg.metrics.registry import load_embedder

    report = face_verification(dataset, load_embedder("face-id", backend, model))
    print(format_face_verification(report))
    _save(report, out)
    return report


def _save(report: dict, out: str | None) -> None:
    if out:
        import json

        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2))
        print(f"report: {path}")
