"""Saved subjects, and the per-session folders a multi-user front end keeps them in.

A subject is what one personalization run produced, under a name: the method, the token and class
noun it answers to, the base it was trained on, where its weights and photos are. A `SubjectStore`
is a folder with one sub-folder per subject (`<name>/subject.json` beside the training output and
the photos). `SessionSpace` gives each browser session its own store and image folders, so two
people using the demo at once never see or load each other's subjects.

Every path a store or session hands out is checked to lie inside its folder: a name typed into a
form can never reach another file.

Example:
    >>> space = SessionSpace("out/app", new_session_id())
    >>> folder = space.store.create("my_star")
    >>> space.store.save(SavedSubject("my_star", "lora", "sks", "star", "tiny", "train/pytorch_lora_weights.safetensors"))
    >>> base, parts = subject_parts([(space.store.load("my_star"), 0.8)])
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from pimg.errors import InputError, ModelLoadError

#: What a subject's `method` may be: the trainer that produced it.
SUBJECT_METHODS = ("lora", "dreambooth", "ti")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,47}$")
_SESSION_ID = re.compile(r"^[0-9a-f]{32}$")


def check_subject_name(name: str) -> str:
    """`name` if it can name a subject (and a folder), else an InputError saying what is allowed."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise InputError(
            f"subject name {name!r} cannot be used: use 1-48 letters, digits, '_' or '-', starting with a "
            "letter or digit (e.g. 'my_star')."
        )
    return name


def inside(root: str | Path, path: str | Path) -> Path:
    """`path` resolved, if it lies inside `root`; otherwise an InputError (nothing outside is read or served)."""
    root, resolved = Path(root).resolve(), Path(root, path).resolve()
    if resolved != root and root not in resolved.parents:
        raise InputError(f"{path} lies outside {root}; only files inside the app's output folder are used.")
    return resolved


@dataclass
class SavedSubject:
    """One trained subject.

    Attributes:
        name: unique within its store (see `check_subject_name`).
        method: one of `SUBJECT_METHODS`.
        token: the word that calls the subject up in prompts.
        class_noun: what the subject is ("star", "dog").
        base: the base model it was trained on (for DreamBooth the result is a base of its own).
        weights: path relative to the subject's folder: the LoRA file, the embedding file, or the
            DreamBooth pipeline folder.
        embedding: path of a learned token embedding that goes with a LoRA (pivotal tuning), or None.
        photos: the training photos, relative to the subject's folder.
        steps: training steps.
        created: seconds since the epoch.
    """

    name: str
    method: str
    token: str
    class_noun: str
    base: str
    weights: str
    embedding: str | None = None
    photos: list[str] = field(default_factory=list)
    steps: int = 0
    created: float = field(default_factory=time.time)

    def __post_init__(self):
        check_subject_name(self.name)
        if self.method not in SUBJECT_METHODS:
            raise InputError(f"subject method {self.method!r} is not one of {', '.join(SUBJECT_METHODS)}.")

    @property
    def prompt(self) -> str:
        """The plain instance prompt, e.g. "a sks star"."""
        return f"a {self.token} {self.class_noun}"

    def label(self) -> str:
        """A one-line description for lists."""
        return f"{self.name} ({self.method}, '{self.token}' {self.class_noun}, {self.steps} steps)"


class SubjectStore:
    """A folder of saved subjects, one sub-folder each."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def folder(self, name: str) -> Path:
        """The folder of subject `name` (whether or not it exists yet)."""
        return inside(self.root, check_subject_name(name))

    def create(self, name: str) -> Path:
        """Make the folder for a new subject; refuses a name already taken."""
        folder = self.folder(name)
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            folder.mkdir()
        except FileExistsError:
            raise InputError(
                f"a subject named {name!r} already exists in this session; choose another name."
            ) from None
        return folder

    def discard(self, name: str) -> None:
        """Remove a subject's folder (e.g. after its training failed)."""
        shutil.rmtree(self.folder(name), ignore_errors=True)

    def save(self, subject: SavedSubject) -> Path:
        """Write `subject.json` in the subject's folder (atomically: a reader never sees half a file)."""
        folder = self.folder(subject.name)
        for rel in [subject.weights, subject.embedding, *subject.photos]:
            if rel is not None:
                inside(folder, rel)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / "subject.json.tmp"
        tmp.write_text(json.dumps(asdict(subject), indent=2))
        os.replace(tmp, folder / "subject.json")
        return folder / "subject.json"

    def names(self) -> list[str]:
        """Names of the saved subjects, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if (p / "subject.json").is_file()]
        return [p.name for p in sorted(found, key=lambda p: (p / "subject.json").stat().st_mtime)]

    def load(self, name: str) -> SavedSubject:
        """The saved subject `name`; an InputError listing the saved ones if there is none."""
        path = self.folder(name) / "subject.json"
        if not path.is_file():
            saved = ", ".join(self.names()) or "none yet (train one in the Personalize tab)"
            raise InputError(f"no saved subject named {name!r}; saved subjects: {saved}.")
        data = json.loads(path.read_text())
        known = {f.name for f in fields(SavedSubject)}
        return SavedSubject(**{k: v for k, v in data.items() if k in known})

    def path(self, subject: SavedSubject, rel: str) -> Path:
        """A path stored in `subject`, resolved inside its folder."""
        return inside(self.folder(subject.name), rel)

    def photo_paths(self, subject: SavedSubject) -> list[Path]:
        return [self.path(subject, p) for p in subject.photos]


def new_session_id() -> str:
    """A fresh random session id (32 hex digits): unguessable, and safe as a folder name."""
    return secrets.token_hex(16)


class SessionSpace:
    """One session's folder under an app's output folder: its subjects and its generated images.

    Layout: `<root>/sessions/<session id>/subjects/<name>/...` and `.../images/<run>/...`.
    """

    def __init__(self, root: str | Path, session_id: str):
        if not isinstance(session_id, str) or not _SESSION_ID.match(session_id):
            raise InputError(
                f"session id {session_id!r} is not valid; reload the page to start a new session."
            )
        self.root = Path(root)
        self.session_id = session_id
        self.folder = self.root / "sessions" / session_id
        self.store = SubjectStore(self.folder / "subjects")

    def new_folder(self, kind: str) -> Path:
        """A new, empty folder `<kind>/<NNNN>` for one run's files (numbered in order, never reused)."""
        parent = self.folder / check_subject_name(kind)
        parent.mkdir(parents=True, exist_ok=True)
        number = len(list(parent.iterdir()))
        while True:
            folder = parent / f"{number:04d}"
            try:
                folder.mkdir()
                return folder
            except FileExistsError:
                number += 1

    def owns(self, path: str | Path) -> Path:
        """`path` resolved, if it belongs to this session; otherwise an InputError."""
        return inside(self.folder, path)


def _mentions(prompt: str, token: str) -> bool:
    return re.search(rf"(?<!\S){re.escape(token)}(?=[\s,.;:!?)]|$)", prompt) is not None


def check_prompt_tokens(prompt: str, subjects: list[SavedSubject]) -> None:
    """Refuse a prompt that leaves out a learned token, or uses a `<token>` no chosen subject defines.

    A Textual Inversion word (or a pivotal LoRA's) does nothing unless the prompt says it, and an
    unknown `<token>` is read as a few meaningless sub-words; both would silently give the base's image.

    Example:
        >>> check_prompt_tokens("a <cat> on grass", [saved_ti_subject_with_token_sks])
        InputError: the prompt uses <cat>, which none of the chosen subjects defines ...
    """
    for subject in subjects:
        learned = subject.method == "ti" or subject.embedding is not None
        if learned and not _mentions(prompt, subject.token):
            raise InputError(
                f"subject {subject.name!r} is the learned word {subject.token!r}, which the prompt does not "
                f"contain; write it into the prompt, e.g. '{subject.prompt} on a beach'."
            )
    known = {s.token for s in subjects}
    unknown = [t for t in re.findall(r"<[^<>\s]+>", prompt) if t not in known]
    if unknown:
        defined = ", ".join(sorted(known)) or "none (no subject chosen)"
        raise InputError(
            f"the prompt uses {unknown[0]}, which none of the chosen subjects defines (their tokens: "
            f"{defined}); choose the subject that answers to it, or remove it from the prompt."
        )


def subject_parts(chosen: list[tuple[SavedSubject, float]], store: SubjectStore) -> tuple[str | None, list]:
    """The base override and pipeline parts that apply the chosen subjects.

    A DreamBooth subject is a whole pipeline, so it replaces the base (at most one, at scale 1); LoRA
    and Textual Inversion subjects become `LoraPart`s / `EmbeddingPart`s on top of it.

    Args:
        chosen: (subject, scale) pairs; the scale weighs a LoRA (0 = off, 1 = as trained).
        store: the store the subjects live in (resolves their files).

    Returns:
        (the DreamBooth pipeline folder to use as base, or None; the parts to add, in order).
    """
    from pimg.inference.pipeline import EmbeddingPart, LoraPart

    names = [s.name for s, _ in chosen]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise InputError(f"subject {repeated[0]!r} is chosen twice; pick each subject once.")
    tokens: dict[str, str] = {}
    for subject, _ in chosen:
        if subject.token in tokens:
            raise InputError(
                f"subjects {tokens[subject.token]!r} and {subject.name!r} both answer to the token "
                f"{subject.token!r}, so a prompt cannot tell them apart; use one of them, or train one again "
                "with another token."
            )
        tokens[subject.token] = subject.name
    dreambooth = [(s, scale) for s, scale in chosen if s.method == "dreambooth"]
    if len(dreambooth) > 1:
        raise InputError(
            f"{len(dreambooth)} DreamBooth subjects chosen ({', '.join(s.name for s, _ in dreambooth)}); each is "
            "a whole model, so only one can be the base. Choose one, or use LoRA subjects to combine."
        )
    base = None
    if dreambooth:
        subject, scale = dreambooth[0]
        if scale != 1.0:
            raise InputError(
                f"{subject.name!r} is a DreamBooth subject (a whole model), which has no scale; set its scale to 1."
            )
        base = str(store.path(subject, subject.weights))
    parts = []
    for subject, scale in chosen:
        if not 0.0 <= scale <= 2.0:
            raise InputError(f"scale of {subject.name!r} must be between 0 and 2, got {scale}.")
        weights = store.path(subject, subject.weights)
        if not weights.exists():
            raise ModelLoadError(
                f"the weights of subject {subject.name!r} are missing ({weights}); train it again."
            )
        if subject.method == "lora":
            parts.append(LoraPart(weights, scale=scale, name=subject.name.replace("-", "_")))
            if subject.embedding is not None:
                parts.append(EmbeddingPart(store.path(subject, subject.embedding), token=subject.token))
        elif subject.method == "ti":
            parts.append(EmbeddingPart(weights, token=subject.token))
    return base, parts
