"""The DreamBench dataset (Ruiz et al., DreamBooth, CVPR 2023) and where generated images for it live.

Dataset layout (google/dreambooth `dataset/`): one folder of photos per subject and
`prompts_and_classes.txt`, which lists `subject_name,class` and two Python prompt lists, one for
objects and one for live subjects, each prompt `'a {0} {1} ...'.format(unique_token, class_token)`.
A third column `subject_name,class,token` is accepted for per-subject identifier tokens.

Generated images: `GENERATED/{subject}/{prompt_index:02d}_{k}.png` (jpg/webp too), or a
`manifest.jsonl` with one `{"subject", "prompt_index", "k", "file"}` object per line (`file`
relative to the manifest; `k` optional, counted per prompt in file order).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from pimg.errors import InputError
from pimg.metrics.images import IMAGE_SUFFIXES, image_files

CLASSES_FILE = "prompts_and_classes.txt"
MANIFEST_FILE = "manifest.jsonl"
#: DreamBooth's identifier; the dataset file's third column, when present, overrides it per subject.
DEFAULT_TOKEN = "sks"
#: Classes whose subjects take the live-subject prompts (DreamBooth: its 9 cats and dogs) ...
LIVE_CLASSES = ("cat", "dog", "person", "man", "woman", "boy", "girl", "child", "face")
#: ... and those scored for face identity as well.
FACE_CLASSES = ("person", "man", "woman", "boy", "girl", "child", "face")

_PROMPT_LINE = re.compile(r"""^\s*(['"])(.*)\1\s*\.format\(\s*unique_token\s*,\s*class_token\s*\)""")
_CLASS_LINE = re.compile(r"^\s*([\w.-]+)\s*,\s*([^,]+?)\s*(?:,\s*(\S+)\s*)?$")
_GENERATED_NAME = re.compile(r"^(\d+)_(\d+)$")


@dataclass(frozen=True)
class BenchSubject:
    """One DreamBench subject.

    Attributes:
        name: folder name, e.g. "dog6".
        class_noun: the class token, e.g. "dog".
        token: identifier token from the dataset file's third column, or None (use the default).
        live: takes the live-subject prompt list.
        face: also scored for face identity.
        references: its real photos.
    """

    name: str
    class_noun: str
    token: str | None
    live: bool
    face: bool
    references: tuple[Path, ...]


@dataclass(frozen=True)
class DreamBench:
    """The subjects and prompt templates of a DreamBench-layout dataset (`read_dreambench`)."""

    root: Path
    subjects: dict[str, BenchSubject]
    object_prompts: tuple[str, ...]
    live_prompts: tuple[str, ...]

    def templates(self, subject: BenchSubject) -> tuple[str, ...]:
        return self.live_prompts if subject.live else self.object_prompts

    def prompt(self, subject: BenchSubject, index: int, token: str | None = DEFAULT_TOKEN) -> str:
        """Prompt `index` of `subject`; `token=None` leaves the identifier out ("a dog in the snow")."""
        text = self.templates(subject)[index].format(token or "", subject.class_noun)
        return " ".join(text.split())


def read_dreambench(
    root: str | Path,
    *,
    live_classes: tuple[str, ...] = LIVE_CLASSES,
    face_classes: tuple[str, ...] = FACE_CLASSES,
) -> DreamBench:
    """Read `root/prompts_and_classes.txt` and each subject's photos.

    Raises:
        InputError: no such folder or file, no subjects or prompts in it, or a subject without photos.

    Example:
        >>> bench = read_dreambench("../shared/dreambench")
        >>> bench.prompt(bench.subjects["dog6"], 0)
        'a sks dog in the jungle'
    """
    root = Path(root)
    path = root / CLASSES_FILE
    if not path.is_file():
        raise InputError(f"--dataset {root} has no {CLASSES_FILE}; pass a folder in the DreamBench layout.")
    classes: list[tuple[str, str, str | None]] = []
    lists: dict[str, list[str]] = {"object": [], "live": []}
    section = "classes"
    for line in path.read_text().splitlines():
        lowered = line.strip().lower()
        if lowered == "object prompts":
            section = "object"
        elif lowered == "live subject prompts":
            section = "live"
        elif section in lists and (match := _PROMPT_LINE.match(line)):
            lists[section].append(match.group(2))
        elif section == "classes" and (match := _CLASS_LINE.match(line)) and match.group(1) != "subject_name":
            classes.append(match.groups())
    if not classes or not lists["object"] or not lists["live"]:
        raise InputError(
            f"{path} lists {len(classes)} subjects, {len(lists['object'])} object prompts and "
            f"{len(lists['live'])} live prompts; all three must be present (see google/dreambooth dataset/)."
        )
    subjects = {}
    for name, class_noun, token in classes:
        folder = root / name
        references = tuple(image_files(folder)) if folder.is_dir() else ()
        if not references:
            raise InputError(
                f"subject {name!r} has no photos in {folder}; every listed subject needs its photos."
            )
        live = class_noun in live_classes or class_noun in face_classes
        subjects[name] = BenchSubject(name, class_noun, token, live, class_noun in face_classes, references)
    return DreamBench(root, subjects, tuple(lists["object"]), tuple(lists["live"]))


@dataclass
class GeneratedImages:
    """Where each expected generated image is, and what does not fit the protocol.

    Attributes:
        found: (subject, prompt_index, k) -> file.
        missing: expected slots with no file.
        extra: files (or manifest lines) that fill no expected slot, each with the reason.
    """

    found: dict[tuple[str, int, int], Path] = field(default_factory=dict)
    missing: list[tuple[str, int, int]] = field(default_factory=list)
    extra: list[dict] = field(default_factory=list)


def index_generated(
    generated: str | Path, bench: DreamBench, subjects: list[str], images_per_prompt: int
) -> GeneratedImages:
    """Match generated files to the protocol's slots: `subjects` x their prompts x `images_per_prompt`.

    `generated` is a folder in the `{subject}/{prompt_index:02d}_{k}.png` layout, a folder holding
    `manifest.jsonl`, or the manifest file itself.
    """
    generated = Path(generated)
    manifest = generated if generated.is_file() else generated / MANIFEST_FILE
    if not generated.exists():
        raise InputError(f"--generated {generated} does not exist.")
    result = GeneratedImages()
    entries = (
        _manifest_entries(manifest, result)
        if manifest.is_file()
        else _folder_entries(generated, bench, result)
    )
    for subject, prompt_index, k, path in entries:
        reason = None
        if subject not in subjects:
            reason = (
                f"subject {subject!r} is not evaluated"
                if subject in bench.subjects
                else f"unknown subject {subject!r}"
            )
        elif not 0 <= prompt_index < len(bench.templates(bench.subjects[subject])):
            reason = f"prompt index {prompt_index} is outside 0-{len(bench.templates(bench.subjects[subject])) - 1}"
        elif not 0 <= k < images_per_prompt:
            reason = f"image index {k} is outside 0-{images_per_prompt - 1} (--images-per-prompt {images_per_prompt})"
        elif (subject, prompt_index, k) in result.found:
            reason = f"a second image for {subject} prompt {prompt_index} image {k}"
        if reason:
            result.extra.append({"file": str(path), "reason": reason})
        else:
            result.found[(subject, prompt_index, k)] = path
    for subject in subjects:
        for prompt_index in range(len(bench.templates(bench.subjects[subject]))):
            for k in range(images_per_prompt):
                if (subject, prompt_index, k) not in result.found:
                    result.missing.append((subject, prompt_index, k))
    return result


def _folder_entries(
    folder: Path, bench: DreamBench, result: GeneratedImages
) -> list[tuple[str, int, int, Path]]:
    entries = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for path in sorted(p for p in sub.iterdir() if p.is_file() and not p.name.startswith(".")):
            match = _GENERATED_NAME.match(path.stem)
            if path.suffix.lower() not in IMAGE_SUFFIXES or match is None:
                result.extra.append({"file": str(path), "reason": "name is not {prompt_index:02d}_{k}.png"})
                continue
            entries.append((sub.name, int(match.group(1)), int(match.group(2)), path))
    return entries


def _manifest_entries(manifest: Path, result: GeneratedImages) -> list[tuple[str, int, int, Path]]:
    entries = []
    counters: dict[tuple[str, int], int] = {}
    for number, line in enumerate(manifest.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            subject, prompt_index, file = str(record["subject"]), int(record["prompt_index"]), record["file"]
            k = int(record["k"]) if "k" in record else counters.get((subject, prompt_index), 0)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            result.extra.append({"file": f"{manifest}:{number}", "reason": f"bad manifest line ({exc})"})
            continue
        counters[(subject, prompt_index)] = k + 1
        entries.append((subject, prompt_index, k, manifest.parent / file))
    return entries
