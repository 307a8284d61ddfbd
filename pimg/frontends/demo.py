"""The web demo's logic on plain values: sessions, training, generation, composition and evaluation.

`app.py` lays out the page and turns these values into components; everything else is here, so it
can be tested without a browser. Like `pimg.frontends.cli`, this module sits on top of the library: it reaches
the trainers and metrics through lazy imports, and loads no model before first use.

Sessions run in threads of one process. Each has its own folder (`pimg.frontends.subject_store.SessionSpace`):
its uploads, subjects and images are never visible to another session. Torch modules are built under
one process-wide lock (`BUILD_LOCK`, see there); training loops and denoising run side by side.

Nobody needs to log in, so nothing a session writes may stay for good: a session's folder is removed
when its page closes (`end_session`, once its running job is done) or after `max_idle_seconds` unused
(`remove_idle_sessions`, also for folders left by an earlier run), and the photos kept are held to a
per-session and a total quota (`UploadLimits.max_session_bytes`, `.max_total_bytes`).

Example:
    >>> backend = DemoBackend("tiny", "out/app")
    >>> session = backend.new_session()
    >>> *_, done = backend.personalize(session, ["a.png", "b.png"], "LoRA", "sks", "star", 50)
    >>> images = backend.generate(session, BASE_CHOICE, [(done.subject.name, 1.0)], "a sks star")
    >>> backend.evaluate(session, done.subject.name, images).means
    {'clip-i': 0.87, 'clip-t': 0.04, 'toy-fidelity': 0.31}
    >>> backend.compose(session, [Placement("star_lora_1", "left"), Placement("circle_lora_1", "right")],
    ...                 "a sks star at the left and a sks circle at the right").images
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pimg.errors import InputError, ModelLoadError, PimgError
from pimg.frontends.subject_store import (
    SavedSubject,
    SessionSpace,
    check_prompt_tokens,
    load_subjects,
    new_session_id,
    subject_parts,
)
from pimg.frontends.uploads import UploadLimits, check_quota, check_uploads, copy_uploads
from pimg.methods import get_method, list_methods

if TYPE_CHECKING:
    import numpy as np

#: Per-photo upload limits (the same size limit is given to Gradio's upload route).
UPLOAD_LIMITS = UploadLimits(min_files=1, max_files=10, max_bytes=20 * 2**20)
MAX_TRAIN_STEPS = 5000
MAX_IMAGES = 8
MAX_GUIDANCE = 30.0
#: A session unused this long is removed (its page went away without saying so, e.g. a closed laptop).
MAX_IDLE_SECONDS = 6 * 3600
# Value of the "base" choice in the Generate tab; ':' can never occur in a subject name.
BASE_CHOICE = ":base"
#: How many saved subjects one Compose image places (`pimg.fusion`).
MIN_COMPOSE_SUBJECTS, MAX_COMPOSE_SUBJECTS = 2, 4
#: The Compose tab's preset regions (names of `pimg.fusion.regions.NAMED_REGIONS`), and its drawn-mask choice.
#: Only these: `parse_region` would also read a mask image from a path, and no path typed into a form is read.
COMPOSE_REGIONS = (
    "left",
    "right",
    "top",
    "bottom",
    "center",
    "top-left",
    "top-right",
    "bottom-left",
    "bottom-right",
)
DRAWN_MASK = "draw mask"
# Held wherever torch modules are built: loading a model (diffusers' low-memory loading patches
# `torch.nn.Module.register_parameter` for the whole process while it runs, so a module built in
# another thread at that moment gets weights on the "meta" device), setting up a training method,
# attaching a LoRA, loading a metric. Sessions run in threads of one process, so they take turns here;
# training loops and denoising run outside it, side by side. Re-entrant: loads nest.
BUILD_LOCK = threading.RLock()


@dataclass
class TrainUpdate:
    """What a training run shows while it goes: a status line, the latest samples, the result at the end."""

    status: str
    samples: list[str] = field(default_factory=list)
    subject: SavedSubject | None = None


@dataclass
class Generation:
    """One Generate (or Compose) click: the images (inside the session folder), their settings, what made
    them, and notes on what the library changed (a resized mask, overlapping regions)."""

    images: list[str]
    settings: list[dict]
    prompt: str
    subjects: list[str]
    tokens: list[str]
    notes: list[str] = field(default_factory=list)


@dataclass
class Placement:
    """One subject of a Compose image: which saved subject, where, and its region's own prompt.

    Attributes:
        subject: a saved subject's name; None or empty: an empty slot (skipped).
        region: one of `COMPOSE_REGIONS`, or `DRAWN_MASK` with `mask` given.
        prompt: the region's own prompt; empty: the image's prompt.
        mask: with `DRAWN_MASK`, weights [H, W] in [0, 1] (`drawn_mask` reads them off the page's sketch);
            None: nothing was drawn.
    """

    subject: str | None
    region: str
    prompt: str = ""
    mask: np.ndarray | None = None


@dataclass
class Evaluation:
    """Scores of one generation: a row per image (plus means), and notes on metrics that could not run."""

    rows: list[dict]
    means: dict[str, float]
    notes: list[str]


def strip_tokens(prompt: str, tokens: list[str]) -> str:
    """`prompt` without the subjects' identifier tokens, as CLIP-T reads it.

    The token means nothing to CLIP, so it is removed (DreamBench's default, `clip_t_token="strip"`).

    Example:
        >>> strip_tokens("a sks star on grass", ["sks"])
        'a star on grass'
    """
    for token in tokens:
        prompt = re.sub(rf"(?<!\S){re.escape(token)}(?!\S)", " ", prompt)
    return " ".join(prompt.split())


def _number(name: str, value, low: float, high: float, integer: bool = True):
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number, got {value!r}.") from None
    if integer and number != int(number):
        raise InputError(f"{name} must be a whole number, got {value!r}.")
    if not low <= number <= high:  # also refuses nan
        raise InputError(f"{name} must be between {low:g} and {high:g}, got {value!r}.")
    return int(number) if integer else number


def _guidance(value) -> float | None:
    """The Generate tab's guidance: None when the field is empty (the subjects' own, else the base's)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return _number("guidance", value.strip() if isinstance(value, str) else value, 0, MAX_GUIDANCE, False)


def drawn_mask(value) -> np.ndarray | None:
    """The region a person painted on a sketchpad, as weights [H, W] in [0, 1]; None when nothing is painted.

    Args:
        value: a `gr.Sketchpad` / `gr.ImageEditor` value with numpy RGBA images (`{"background", "layers",
            "composite"}`), or None. Paint is wherever a layer is opaque, whatever its colour; the eraser
            makes it transparent again.

    Example:
        >>> drawn_mask({"background": None, "layers": [rgba], "composite": None}).shape
        (256, 256)
    """
    import numpy as np

    layers = [np.asarray(layer) for layer in (value or {}).get("layers") or [] if layer is not None]
    if not layers:
        return None
    for layer in layers:
        if layer.ndim != 3 or layer.shape[-1] != 4:
            raise InputError(f"the drawn mask must be an RGBA image, got an array of shape {layer.shape}.")
    alpha = np.max(np.stack([layer[..., 3] for layer in layers]), axis=0).astype(np.float32) / 255.0
    return alpha if float(alpha.max()) > 0 else None


def _photo_bytes(folder: Path) -> int:
    """Bytes of the subjects' photos under a session folder."""
    return _bytes(folder.glob("subjects/*/photos/*"))


def _bytes(paths) -> int:
    total = 0
    for path in paths:
        with contextlib.suppress(OSError):  # removed meanwhile by a session that ended
            total += path.stat().st_size
    return total


def _newest_change(folder: Path) -> float:
    """The newest modification time of `folder` and everything in it (0 when it is gone)."""
    newest = 0.0
    for path in [folder, *folder.rglob("*")]:
        with contextlib.suppress(OSError):
            newest = max(newest, path.stat().st_mtime)
    return newest


class DemoBackend:
    """The demo's logic, on plain values: sessions, training, generation, composition, evaluation.

    Args:
        base: the base model (built-in name, diffusers folder, single file or hub id).
        output_dir: everything the demo writes goes here (one sub-folder per session).
        device: "auto" (CUDA with bf16/fp16 when present, else CPU fp32), "cpu" or "cuda[:N]".
        train_settings: per method name (`pimg.methods`), config keys to set on every run,
            e.g. `{"<method>": {"loop.steps": 50}}` (dotted keys as in `pimg train --set`).
        upload_limits: what one upload, one session and all sessions may hold (`UploadLimits`).
        max_idle_seconds: a session unused this long is removed with its files.

    Example: see the module docstring.
    """

    def __init__(
        self,
        base: str = "tiny",
        output_dir: str | Path = "out/app",
        device: str = "auto",
        train_settings: dict[str, dict] | None = None,
        upload_limits: UploadLimits = UPLOAD_LIMITS,
        max_idle_seconds: float = MAX_IDLE_SECONDS,
    ):
        self.base = base
        self.train_settings = train_settings or {}
        self.output_dir = Path(output_dir)
        self.device_choice = device
        self.upload_limits = upload_limits
        self.max_idle_seconds = max_idle_seconds
        self._pipelines: dict[str, Any] = {}
        self._metrics: dict[str, Any] | None = None
        # One generation at a time: parts are attached to the shared pipeline for one call, then removed.
        self._generate_lock = threading.Lock()
        # Session bookkeeping, under one lock: jobs running per session, last use, ended sessions, and
        # which page (Gradio's session hash) holds which session.
        self._sessions_lock = threading.Lock()
        self._busy: dict[str, int] = {}
        self._last_used: dict[str, float] = {}
        self._ended: set[str] = set()
        self._pages: dict[str, str] = {}
        # Checking a quota and copying the photos happen together, so two uploads cannot both pass.
        self._quota_lock = threading.Lock()

    # -------------------------------------------------------------------------------------- sessions

    def new_session(self, page: str | None = None) -> str:
        """A new session id (the page gets one on load); first removes sessions left unused too long.

        Args:
            page: the page's own id (Gradio's session hash), so `end_page` can end the session.
        """
        self.remove_idle_sessions()
        session_id = new_session_id()
        with self._sessions_lock:
            self._last_used[session_id] = time.time()
            if page is not None:
                self._pages[page] = session_id
        return session_id

    def space(self, session_id: str) -> SessionSpace:
        """The session's folder; an InputError once the session has ended."""
        space = SessionSpace(self.output_dir, session_id)
        with self._sessions_lock:
            if session_id in self._ended:
                raise InputError(
                    "this session has ended (its page was closed, or left unused for "
                    f"{self.max_idle_seconds / 3600:g} h) and its files were removed; reload the page to start "
                    "a new one."
                )
            self._last_used[session_id] = time.time()
        return space

    @contextlib.contextmanager
    def _using(self, session_id: str):
        """The session's space, held open: an `end_session` meanwhile waits for this job to finish."""
        space = self.space(session_id)
        with self._sessions_lock:
            self._busy[session_id] = self._busy.get(session_id, 0) + 1
        try:
            yield space
        finally:
            with self._sessions_lock:
                self._busy[session_id] -= 1
                idle = self._busy[session_id] == 0
                if idle:
                    del self._busy[session_id]
                remove = idle and session_id in self._ended
                if not remove:
                    self._last_used[session_id] = time.time()
            if remove:
                shutil.rmtree(space.folder, ignore_errors=True)

    def end_session(self, session_id: str | None) -> None:
        """Remove a session's folder (its uploads, subjects and images); later calls for it are refused.

        A job still running in the session (a training) finishes first; its folder goes when it ends.
        Safe to call twice, and with None (a page that never got a session).
        """
        if session_id is None:
            return
        space = SessionSpace(self.output_dir, session_id)  # checks the id: nothing else is ever removed
        with self._sessions_lock:
            self._ended.add(session_id)
            self._last_used.pop(session_id, None)
            self._pages = {page: s for page, s in self._pages.items() if s != session_id}
            busy = self._busy.get(session_id, 0) > 0
        if not busy:
            shutil.rmtree(space.folder, ignore_errors=True)

    def end_page(self, page: str | None) -> None:
        """End the session of a page that was closed (Gradio's `unload`, given the page's session hash)."""
        with self._sessions_lock:
            session_id = self._pages.pop(page, None) if page is not None else None
        self.end_session(session_id)

    def end_all_sessions(self) -> None:
        """End every session this backend started (the server is shutting down: no page can come back)."""
        with self._sessions_lock:
            sessions = list(self._last_used)
        for session_id in sessions:
            self.end_session(session_id)

    def remove_idle_sessions(self) -> list[str]:
        """End sessions unused for `max_idle_seconds`, and remove folders of earlier runs as old.

        Returns:
            The session ids removed.
        """
        root = self.output_dir / "sessions"
        if not root.is_dir():
            return []
        now, removed = time.time(), []
        for folder in root.iterdir():
            session_id = folder.name
            with self._sessions_lock:
                if self._busy.get(session_id):
                    continue
                last = self._last_used.get(session_id)
            if last is None:  # not started by this backend: judge by its files
                last = _newest_change(folder)
            if now - last > self.max_idle_seconds:
                try:
                    self.end_session(session_id)
                except InputError:  # not a session folder: leave it alone
                    continue
                removed.append(session_id)
        return removed

    def subjects(self, session_id: str) -> list[SavedSubject]:
        space = self.space(session_id)
        return [space.store.load(name) for name in space.store.names()]

    def method_defaults(self, label: str) -> tuple[str, int]:
        """(default token, default steps) of a method: its config as `personalize` starts from it;
        ("", 0) for a method that makes a subject without training (an ID adapter)."""
        if get_method(label).personalize is not None:
            return "", 0
        config = self._train_config(get_method(label).name, {})
        return config.token, config.loop.steps

    def _train_config(self, trainer: str, overrides: dict):
        """The base's preset for `trainer` if it has one (else the defaults) <- train_settings <- overrides."""
        from pimg.methods import builtin_preset
        from pimg.trainers.personalize import load_train_config

        preset = builtin_preset(trainer, self.base)
        # Photos uploaded in a browser come without captions: let the base caption their settings,
        # so the subject's word does not learn the backgrounds (README, "Training a subject").
        captions = {"auto_caption": True} if get_method(trainer).has_setting("auto_caption") else {}
        settings = {"base": self.base, **captions, **self.train_settings.get(trainer, {}), **overrides}
        return load_train_config(trainer, preset, settings)

    # -------------------------------------------------------------------------------------- models

    def device(self) -> tuple[str, Any, str]:
        from pimg.models import pick_device

        return pick_device(self.device_choice)

    def pipeline(self, base: str | None = None):
        """The cached pipeline of `base` (default: the app's base); loads it on first use."""
        from pimg.inference.pipeline import PersonalizedPipeline

        base = base or self.base
        with BUILD_LOCK:
            if base not in self._pipelines:
                device, dtype, _ = self.device()
                # Keep the app's base and at most one other (a DreamBooth subject) in memory.
                for key in [k for k in self._pipelines if k != self.base]:
                    del self._pipelines[key]
                pipe = PersonalizedPipeline.from_base(base, device=device, dtype=dtype)
                self._pipelines[base] = pipe
            return self._pipelines[base]

    def guidance_default(self) -> float:
        from pimg.inference.guidance import choose_guidance

        return choose_guidance(self.base)[0]

    # -------------------------------------------------------------------------------------- personalize

    def personalize(
        self,
        session_id: str,
        files: list[str] | None,
        method: str,
        token: str,
        class_noun: str,
        steps: int,
        name: str = "",
        progress=None,
    ):
        """Train a subject on uploaded photos and save it in the session; yields `TrainUpdate`s.

        Refused before anything trains: a bad class noun or step count, unusable files, photos smaller
        than the training size (each named), and uploads past the session's or the demo's quota.
        Training runs in a worker thread (in this context, so `gr.Progress(track_tqdm=True)` follows its
        progress bar) while this generator shows each new sample grid as it is written.
        """
        with self._using(session_id) as space:
            yield from self._personalize(space, files, method, token, class_noun, steps, name, progress)

    def _personalize(self, space: SessionSpace, files, method, token, class_noun, steps, name, progress):
        entry = get_method(method)
        trainer = entry.name
        class_noun = (class_noun or "").strip()
        if not class_noun or len(class_noun.split()) > 3:
            raise InputError(
                f"class noun {class_noun!r}: say in a word or two what the subject is, e.g. 'star' or 'dog'."
            )
        limits = self.upload_limits
        if entry.personalize is not None:
            yield from self._personalize_without_training(space, files, entry, class_noun, name)
            return
        steps = _number("steps", steps, 1, MAX_TRAIN_STEPS)
        photos = check_uploads(files, limits)
        name = (name or "").strip() or _free_name(space, f"{class_noun.replace(' ', '_')}_{trainer}")
        folder = space.store.folder(name)
        out = folder / "train"
        overrides = {
            "base": self.base,
            "photos": str(folder / "photos"),
            "token": (token or "").strip(),
            "class_noun": class_noun,
            "out_dir": str(out),
            "loop.steps": steps,
            # About four sample grids along the way, so the page shows training take hold.
            "loop.sample_every": steps // 4 if steps >= 8 else 0,
        }
        note = ""
        if entry.has_setting("class_images_dir"):
            overrides["class_images_dir"] = str(self._class_images_dir(class_noun))
            note = " First the base draws images of the bare class (prior preservation; once per class noun)."
        config = self._train_config(trainer, overrides)
        # Training skips a photo smaller than its size (photos are never upscaled): refuse it here, by name,
        # so that the count below is the count trained on.
        size = config.resolution or self.pipeline().default_size()
        check_uploads(photos, dataclasses.replace(limits, min_side=size))
        copied = self._store_photos(space, name, photos)
        try:
            if progress is not None:
                progress(0, desc="loading the base model")
            yield TrainUpdate(
                f"Training **{name}** ({entry.label}, {steps} steps) on {len(copied)} photo(s)…{note}"
            )
            yield from self._run_training(trainer, config, out, name)
            subject = SavedSubject(
                name=name,
                method=trainer,
                token=config.token,
                class_noun=class_noun,
                base=self.base,
                weights=out.relative_to(folder).as_posix(),
                photos=[p.relative_to(folder).as_posix() for p in copied],
                steps=steps,
            )
            # The demo never resumes a run: the final checkpoint (for DreamBooth a second copy of the
            # UNet plus its optimizer state) is only disk.
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
            space.store.save(subject)
        except BaseException:
            space.store.discard(name)
            raise
        samples = sorted((out / "samples").glob("*.png"))
        yield TrainUpdate(
            f"Saved subject **{name}**: prompt with `{subject.prompt}` in the Generate tab.",
            [str(p) for p in samples[-1:]],
            subject,
        )

    def _store_photos(self, space: SessionSpace, name: str, photos) -> list[Path]:
        """A new subject `name` holding copies of the checked uploads, within the quotas; returns the copies."""
        with self._quota_lock:
            check_quota(photos, _photo_bytes(space.folder), self.kept_photo_bytes(), self.upload_limits)
            space.store.create(name)
            try:
                return copy_uploads(photos, space.store.folder(name) / "photos")
            except BaseException:
                space.store.discard(name)
                raise

    def _personalize_without_training(self, space: SessionSpace, files, entry, class_noun: str, name: str):
        """A subject from photos at once (an ID adapter: their embedding; a hypernetwork: its predicted
        LoRA), shown with images of it."""
        from pimg.imaging import grid
        from pimg.methods import load_result

        photos = check_uploads(files, dataclasses.replace(self.upload_limits, min_files=1))
        stem = f"{class_noun.replace(' ', '_')}_{entry.name.replace('-', '_')}"
        name = (name or "").strip() or _free_name(space, stem)
        folder = space.store.folder(name)
        copied = self._store_photos(space, name, photos)
        try:
            yield TrainUpdate(f"Making **{name}** ({entry.label}, no training) from {len(copied)} photo(s)…")
            out = folder / "result"
            with BUILD_LOCK:
                entry.personalize_function()(folder / "photos", out, base=self.base)
            # an ID adapter's subject has no word; a hypernetwork's LoRA is bound to one (`sks`)
            token = json.loads((out / "config.json").read_text()).get("token", "")
            subject = SavedSubject(
                name=name,
                method=entry.name,
                token=token,
                class_noun=class_noun,
                base=self.base,
                weights=out.relative_to(folder).as_posix(),
                photos=[p.relative_to(folder).as_posix() for p in copied],
            )
            with self._generate_lock:
                pipe = self.pipeline()
                try:
                    with BUILD_LOCK:
                        for part in load_result(out).parts:
                            pipe.add(part)
                    images = pipe.generate(
                        subject.prompt, num_images=4, guidance_scale=self.guidance_default()
                    )
                finally:
                    with BUILD_LOCK:
                        pipe.clear()
            (out / "samples").mkdir(exist_ok=True)
            preview = out / "samples" / "preview.png"
            grid([np.asarray(g.image) for g in images], columns=4).save(preview)
            space.store.save(subject)
        except BaseException:
            space.store.discard(name)
            raise
        yield TrainUpdate(
            f"Saved subject **{name}** (no training): prompt with `{subject.prompt}` in the Generate tab.",
            [str(preview)],
            subject,
        )

    def kept_photo_bytes(self) -> int:
        """Bytes of the photos all sessions keep (what `UploadLimits.max_total_bytes` limits)."""
        return _bytes((self.output_dir / "sessions").glob("*/subjects/*/photos/*"))

    def _class_images_dir(self, class_noun: str) -> Path:
        # Class images show the bare class ("a star") and hold nothing of anyone's photos, so every
        # session shares one cache per base and class noun: only the first DreamBooth run draws them.
        # They are drawn while the method is set up, under BUILD_LOCK, so no two runs write one cache.
        base = re.sub(r"[^A-Za-z0-9]+", "_", self.base).strip("_")[-40:]
        noun = re.sub(r"[^A-Za-z0-9]+", "_", class_noun).strip("_")
        return self.output_dir / "class_images" / base / noun

    def _run_training(self, trainer: str, config, out: Path, name: str):
        from pimg.trainers.loop import run_training
        from pimg.trainers.personalize import result_record

        failure: list[BaseException] = []

        def run():
            # `pimg.trainers.personalize.train` in two steps, so that only the set-up (which loads the
            # base and builds adapters or token rows) holds BUILD_LOCK, not the training loop.
            try:
                method_cls = get_method(trainer).trainer_class()
                with BUILD_LOCK:
                    method = method_cls(config)
                run_training(method, config.loop, out, resolved_config=result_record(trainer, config))
            except BaseException as exc:  # handed to the generator, which raises it on the page's thread
                failure.append(exc)

        worker = threading.Thread(target=contextvars.copy_context().run, args=(run,), daemon=True)
        worker.start()
        shown: Path | None = None
        try:
            while worker.is_alive():
                worker.join(timeout=0.5)
                samples = sorted((out / "samples").glob("*.png"))
                if samples and samples[-1] != shown:
                    shown = samples[-1]
                    step = int(shown.stem.rsplit("_", 1)[-1])
                    yield TrainUpdate(f"Training **{name}**: samples at step {step}…", [str(shown)])
        finally:
            # The loop has no cancel hook: when the page goes away mid-run, let the run finish before
            # the caller cleans its folder up.
            worker.join()
        if failure:
            raise failure[0]

    # -------------------------------------------------------------------------------------- generate

    def generate(
        self,
        session_id: str,
        base_choice: str,
        chosen: list[tuple[str | None, float]],
        prompt: str,
        negative_prompt: str = "",
        seed: int = 0,
        num_inference_steps: int = 25,
        guidance_scale: float | str | None = None,
        num_images: int = 4,
    ) -> Generation:
        """Generate with the base (or a DreamBooth subject) and the chosen subjects at their scales.

        Args:
            base_choice: `BASE_CHOICE` for the app's base, or the name of a DreamBooth subject.
            chosen: (subject name or None for an empty slot, scale) pairs.
            guidance_scale: 0 to `MAX_GUIDANCE` (as typed into the page: a number or its text); None or
                blank text takes the lowest the chosen subjects' trainings recorded, else the base's.
        """
        guidance_scale = _guidance(guidance_scale)
        with self._using(session_id) as space:
            picks = [(space.store.load(n), float(s)) for n, s in chosen if n]
            if base_choice and base_choice != BASE_CHOICE:
                picks.insert(0, (space.store.load(base_choice), 1.0))
            seed = _number("seed", seed, 0, 2**31 - 1)
            steps = _number("steps", num_inference_steps, 1, 200)
            num_images = _number("number of images", num_images, 1, MAX_IMAGES)
            loaded = load_subjects(picks, space.store)
            check_prompt_tokens(prompt or "", loaded)
            base, parts = subject_parts(loaded)
            from pimg.inference.guidance import choose_guidance

            # None: what the chosen subjects' trainings recommend, else the base's.
            guidance, _ = choose_guidance(self.base, [r.folder for _, r in loaded], guidance_scale)
            with self._generate_lock:
                pipe = self.pipeline(base)
                try:
                    with BUILD_LOCK:  # attaching a LoRA builds peft layers
                        for part in parts:
                            pipe.add(part)
                    images = pipe.generate(
                        prompt,
                        negative_prompt=negative_prompt or None,
                        num_images=num_images,
                        num_inference_steps=steps,
                        guidance_scale=guidance,
                        seed=seed,
                    )
                finally:
                    with BUILD_LOCK:  # removing a token resizes the embedding table: a new module
                        pipe.clear()
            subjects = [s.name for s, _ in picks]
            paths, settings = _save_images(space, images, subjects)
            return Generation(paths, settings, prompt, subjects, [s.token for s, _ in picks])

    # -------------------------------------------------------------------------------------- compose

    def compose(
        self,
        session_id: str,
        placements: list[Placement],
        prompt: str,
        negative_prompt: str = "",
        seed: int = 0,
        num_inference_steps: int = 25,
        guidance_scale: float | str | None = None,
        num_images: int = 4,
        feather: float = 0.0,
    ) -> Generation:
        """Several saved subjects in one image, each subject's LoRA confined to its region (`pimg.fusion`).

        Refused before any model loads: fewer than `MIN_COMPOSE_SUBJECTS` or more than
        `MAX_COMPOSE_SUBJECTS` subjects, one chosen twice, a region not in `COMPOSE_REGIONS`, a drawn mask
        left empty, a whole-model subject (DreamBooth), a subject trained on another base. Two subjects
        may share a token: each region's prompt is read with its own subject's words.

        Args:
            placements: the subjects and their regions; a placement with no subject (an empty slot) is skipped.
            prompt: the whole image's prompt (what lies outside every region follows it).
            guidance_scale: as in `generate` (None or blank: the subjects' recorded, else the base's).
            feather: soft region edges, a share of the image side (0 to 0.5).

        Example:
            >>> backend.compose(session, [Placement("star", "left"), Placement("dog", "right")], "a sks star and a sks dog")
        """
        from pimg.fusion import Composition
        from pimg.inference.guidance import choose_guidance

        placements = [p for p in placements if p.subject]
        if not MIN_COMPOSE_SUBJECTS <= len(placements) <= MAX_COMPOSE_SUBJECTS:
            raise InputError(
                f"choose {MIN_COMPOSE_SUBJECTS} to {MAX_COMPOSE_SUBJECTS} subjects to compose, got "
                f"{len(placements)}; train more in the Personalize tab, or use the Generate tab for one."
            )
        if not (prompt or "").strip():
            raise InputError(
                "write a prompt for the whole image, e.g. 'a sks star at the left and a sks dog at the right'."
            )
        guidance_scale = _guidance(guidance_scale)
        seed = _number("seed", seed, 0, 2**31 - 1)
        steps = _number("steps", num_inference_steps, 1, 200)
        num_images = _number("number of images", num_images, 1, MAX_IMAGES)
        feather = _number("soft edges", feather, 0, 0.5, integer=False)
        with self._using(session_id) as space:
            subjects, members = self._placed_subjects(space, placements, feather)
            folders = [space.store.path(s, s.weights) for s in subjects]
            guidance, _ = choose_guidance(self.base, folders, guidance_scale)
            with self._generate_lock:
                pipe = self.pipeline()
                try:
                    with BUILD_LOCK:  # attaching LoRAs builds peft layers
                        composition = pipe.add(Composition(members))
                    images = pipe.generate(
                        prompt,
                        negative_prompt=negative_prompt or None,
                        num_images=num_images,
                        num_inference_steps=steps,
                        guidance_scale=guidance,
                        seed=seed,
                    )
                    notes = list(composition.notes)
                finally:
                    with BUILD_LOCK:  # removing a token resizes the embedding table: a new module
                        pipe.clear()
            names = [s.name for s in subjects]
            paths, settings = _save_images(space, images, names)
            return Generation(paths, settings, prompt, names, sorted({s.token for s in subjects}), notes)

    def _placed_subjects(self, space: SessionSpace, placements: list[Placement], feather: float):
        """The placements' saved subjects and their `RegionalSubject`s, after checking each (see `compose`)."""
        from pimg.fusion import RegionalSubject
        from pimg.inference.parts import safe_adapter_name
        from pimg.methods import load_result

        names = [p.subject for p in placements]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise InputError(f"subject {repeated[0]!r} is chosen twice; place each subject once.")
        # Every choice is checked before any weights are read, so that one message names what to fix.
        subjects, regions = [], []
        for placement in placements:
            subject = space.store.load(placement.subject)
            if get_method(subject.method).whole_model:
                raise InputError(
                    f"subject {subject.name!r} is a {get_method(subject.method).label} subject (a whole model), "
                    "which cannot be confined to a region; compose LoRA, pivotal or Textual Inversion subjects."
                )
            if subject.base != self.base:
                raise InputError(
                    f"subject {subject.name!r} was trained on the base {subject.base!r}, but this demo composes "
                    f"on {self.base!r}; compose subjects trained on {self.base!r}."
                )
            subjects.append(subject)
            regions.append(_compose_region(placement, feather))
        members = []
        for placement, subject, region in zip(placements, subjects, regions, strict=True):
            weights = space.store.path(subject, subject.weights)
            if not weights.exists():
                raise ModelLoadError(
                    f"the weights of subject {subject.name!r} are missing ({weights}); train it again."
                )
            name = safe_adapter_name(subject.name) or "subject"
            result = load_result(weights, name=name, token=subject.token)
            prompt = (placement.prompt or "").strip() or None
            members.append(RegionalSubject(name, result.parts, region, prompt))
        return subjects, members

    # -------------------------------------------------------------------------------------- evaluate

    def metrics(self) -> dict[str, Any]:
        """Metric name -> loaded metric (or the reason it is unavailable), loaded once.

        Toy-world bases (those with a `clip/` folder, such as `tiny`) are scored with the toy CLIP and the
        toy checker; other bases with CLIP, DINO and (for face classes) face identity where installed.
        """
        from pimg.metrics import load_embedder, load_metric

        with BUILD_LOCK:
            if self._metrics is not None:
                return self._metrics
            device = self.device()[0]
            metrics: dict[str, Any] = {}
            try:
                from pimg.metrics.clip import toy_clip_folder

                clip_model = str(toy_clip_folder(self.base))
                toy = True
            except PimgError:
                toy = False
            if toy:
                clip = load_embedder("clip-i", "toy", clip_model, device=device)
                metrics["clip-i"] = load_metric("clip-i", embedder=clip)
                metrics["clip-t"] = load_metric("clip-t", embedder=clip)
                metrics["toy-fidelity"] = load_metric("toy-fidelity")
            else:
                try:
                    clip = load_embedder("clip-i", device=device)
                    metrics["clip-i"] = load_metric("clip-i", embedder=clip)
                    metrics["clip-t"] = load_metric("clip-t", embedder=clip)
                except (PimgError, ImportError) as exc:
                    metrics["clip-i"] = metrics["clip-t"] = f"unavailable: {exc}"
                for name in ("dino", "face-id"):
                    try:
                        metrics[name] = load_metric(name, device=device)
                    except (PimgError, ImportError) as exc:
                        metrics[name] = f"unavailable: {exc}"
            self._metrics = metrics
            return metrics

    def evaluate(self, session_id: str, subject_name: str, generation: Generation | None) -> Evaluation:
        """Score the session's last generation against a subject's photos (image metrics) and its prompt (CLIP-T)."""
        from pimg.metrics.dreambench import FACE_CLASSES
        from pimg.metrics.registry import METRICS

        if generation is None or not generation.images:
            raise InputError("there are no images to evaluate yet: generate some in the Generate tab first.")
        if not subject_name:
            raise InputError("choose the subject to compare the images with.")
        with self._using(session_id) as space:
            subject = space.store.load(subject_name)
            images = [space.owns(p) for p in generation.images]
            references = space.store.photo_paths(subject)
            clip_t_prompt = strip_tokens(generation.prompt, generation.tokens)
            scores, notes = {}, []
            for name, metric in self.metrics().items():
                if name == "face-id" and subject.class_noun not in FACE_CLASSES:
                    continue
                if isinstance(metric, str):
                    notes.append(f"{name}: {metric}")
                    continue
                targets = [clip_t_prompt] * len(images) if METRICS[name].kind == "text" else references
                try:
                    scores[name] = [float(v) for v in metric.score(images, targets)]
                except InputError as exc:  # e.g. no face in any of the subject's photos
                    notes.append(f"{name}: {exc}")
            rows = []
            for k, settings in enumerate(generation.settings):
                rows.append({"image": k, "seed": settings["seed"], **{n: v[k] for n, v in scores.items()}})
            means = {n: sum(v) / len(v) for n, v in scores.items()}
            notes.insert(
                0,
                f"CLIP-T prompt: '{clip_t_prompt}' (token removed); references: {len(references)} photo(s).",
            )
            return Evaluation(rows, means, notes)


def method_labels() -> list[tuple[str, str]]:
    """(shown, label) of each registered method, as the Personalize tab lists them (`pimg.methods`);
    a method that makes a subject without training says so."""
    return [(f"{m.label} (no training)" if m.personalize else m.label, m.label) for m in list_methods()]


def _compose_region(placement: Placement, feather: float):
    """A placement's `pimg.fusion.Region`: a preset region by name, or the mask drawn for it."""
    from pimg.fusion import Region, parse_region

    if placement.region == DRAWN_MASK:
        if placement.mask is None or float(placement.mask.max()) <= 0:
            raise InputError(
                f"subject {placement.subject!r} is placed by a drawn mask, but nothing is drawn; paint its region "
                "on the canvas in its row, or choose a preset region."
            )
        return Region(mask=placement.mask, feather=feather, label=f"drawn mask of {placement.subject}")
    if placement.region not in COMPOSE_REGIONS:
        raise InputError(
            f"region {placement.region!r} of subject {placement.subject!r}: choose one of "
            f"{', '.join(COMPOSE_REGIONS)}, or {DRAWN_MASK!r}."
        )
    return parse_region(placement.region, feather=feather)


def _save_images(space: SessionSpace, images, subjects: list[str]) -> tuple[list[str], list[dict]]:
    """One click's images as PNGs in a new folder of the session, and their settings (with the subjects)."""
    folder = space.new_folder("images")
    paths = [str(im.save(folder / f"{k:02d}_seed{im.settings['seed']}.png")) for k, im in enumerate(images)]
    return paths, [{**im.settings, "subjects": subjects} for im in images]


def _free_name(space: SessionSpace, stem: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9_-]", "_", stem)[:40] or "subject"
    taken = set(space.store.names())
    number = 1
    while f"{stem}_{number}" in taken or space.store.folder(f"{stem}_{number}").exists():
        number += 1
    return f"{stem}_{number}"
