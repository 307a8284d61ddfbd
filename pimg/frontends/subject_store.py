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
    >>> space.store.save(SavedSubject("my_star", "lora", "sks", "star", "tiny", "train"))
    >>> base, parts = subject_parts(load_subjects([(space.store.load("my_star"), 0.8)], space.store))
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
from pimg.methods import SubjectResult, get_method, load_result

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
        method: a registered method's name (`pimg.methods`): the trainer that produced it.
        token: the word that calls the subject up in prompts.
        class_noun: what the subject is ("star", "dog").
        base: the base model it was trained on (for DreamBooth the result is a base of its own).
        weights: path relative to the subject's folder of the training result (its folder, or a
            weights file in it); `pimg.methods.load_result` turns it into parts.
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
    photos: list[str] = field(default_factory=list)
    steps: int = 0
    created: float = field(default_factory=time.time)

    def __post_init__(self):
        check_subject_name(self.name)
        get_method(self.method)  # an InputError naming the registered methods

    @property
    def prompt(self) -> str:
        """The plain instance prompt, e.g. "a sks star" ("a star" for a subject with no word: an ID adapter's)."""
        return " ".join(w for w in ("a", self.token, self.class_noun) if w)

    def label(self) -> str:
        """A one-line description for lists."""
        if not self.token:  # made without training (an ID adapter's embedding of the photos)
            return f"{self.name} ({self.method}, {self.class_noun}, no training)"
        if not self.steps:  # predicted without training (a hypernetwork's LoRA)
            return f"{self.name} ({self.method}, '{self.token}' {self.class_noun}, no training)"
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
        for rel in [subject.weights, *subject.photos]:
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


def load_subjects(
    chosen: list[tuple[SavedSubject, float]], store: SubjectStore
) -> list[tuple[SavedSubject, SubjectResult]]:
    """The chosen subjects' results, loaded (`pimg.methods.load_result`), after checking the choice.

    Refused: a subject chosen twice, two subjects with one token (a prompt could not tell them
    apart), more than one whole-model subject (only one can be the base), a scale outside 0-2, and
    missing weights.

    Args:
        chosen: (subject, scale) pairs; the scale weighs a LoRA (0 = off, 1 = as trained).
        store: the store the subjects live in (resolves their files).
    """
    names = [s.name for s, _ in chosen]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise InputError(f"subject {repeated[0]!r} is chosen twice; pick each subject once.")
    tokens: dict[str, str] = {}
    for subject, _ in chosen:
        if subject.token and subject.token in tokens:
            raise InputError(
                f"subjects {tokens[subject.token]!r} and {subject.name!r} both answer to the token "
                f"{subject.token!r}, so a prompt cannot tell them apart; use one of them, or train one again "
                "with another token."
            )
        tokens[subject.token] = subject.name
    whole = [s.name for s, _ in chosen if get_method(s.method).whole_model]
    if len(whole) > 1:
        raise InputError(
            f"{len(whole)} whole-model subjects chosen ({', '.join(whole)}); each is a whole model (e.g. "
            "DreamBooth), so only one can be the base. Choose one, or use LoRA subjects to combine."
        )
    for subject, scale in chosen:
        if not 0.0 <= scale <= 2.0:
            raise InputError(f"scale of {subject.name!r} must be between 0 and 2, got {scale}.")
    loaded = []
    for subject, scale in chosen:
        weights = store.path(subject, subject.weights)
        if not weights.exists():
            raise ModelLoadError(
                f"the weights of subject {subject.name!r} are missing ({weights}); train it again."
            )
        try:
            result = load_result(
                weights, scale=scale, name=subject.name.replace("-", "_"), token=subject.token
            )
        except InputError as exc:
            raise InputError(f"subject {subject.name!r}: {exc}") from None
        loaded.append((subject, result))
    return loaded


def subject_parts(loaded: list[tuple[SavedSubject, SubjectResult]]) -> tuple[str | None, list]:
    """(the whole-model subject's folder to use as base, or None; the parts to add, in order)."""
    base = next((r.base for _, r in loaded if r.base is not None), None)
    return base, [part for _, result in loaded for part in result.parts]


def check_prompt_tokens(prompt: str, loaded: list[tuple[SavedSubject, SubjectResult]]) -> None:
    """Refuse a prompt that leaves out a learned token, or uses a `<token>` no chosen subject defines.

    A Textual Inversion word (or a pivotal LoRA's) does nothing unless the prompt says it, and an
    unknown `<token>` is read as a few meaningless sub-words; both would silently give the base's image.

    Example:
        >>> check_prompt_tokens("a <cat> on grass", load_subjects([(ti_subject_with_token_sks, 1.0)], store))
        InputError: the prompt uses <cat>, which none of the chosen subjects defines ...
    """
    for subject, result in loaded:
        if result.learned_token is not None and not _mentions(prompt, subject.token):
            raise InputError(
                f"subject {subject.name!r} is the learned word {subject.token!r}, which the prompt does not "
                f"contain; write it into the prompt, e.g. '{subject.prompt} on a beach'."
            )
    known = {s.token for s, _ in loaded}
    unknown = [t for t in re.findall(r"<[^<>\s]+>", prompt) if t not in known]
    if unknown:
        defined = ", ".join(sorted(known)) or "none (no subject chosen)"
        raise InputError(
            f"the prompt uses {unknown[0]}, which none of the chosen subjects defines (their tokens: "
            f"{defined}); choose the subject that answers to it, or remove it from the prompt."
        )
