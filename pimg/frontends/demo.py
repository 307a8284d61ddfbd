"""The web demo's logic on plain values: sessions, training, generation and evaluation.

`app.py` lays out the page and turns these values into components; everything else is here, so it
can be tested without a browser. Like `pimg.frontends.cli`, this module sits on top of the library: it reaches
the trainers and metrics through lazy imports, and loads no model before first use.

Sessions run in threads of one process. Each has its own folder (`pimg.frontends.subject_store.SessionSpace`):
its uploads, subjects and images are never visible to another session. Torch modules are built under
one process-wide lock (`BUILD_LOCK`, see there); training loops and denoising run side by side.

Example:
    >>> backend = DemoBackend("tiny", "out/app")
    >>> session = backend.new_session()
    >>> *_, done = backend.personalize(session, ["a.png", "b.png"], "LoRA", "sks", "star", 50)
    >>> images = backend.generate(session, BASE_CHOICE, [(done.subject.name, 1.0)], "a sks star")
    >>> backend.evaluate(session, done.subject.name, images).means
    {'clip-i': 0.87, 'clip-t': 0.04, 'toy-fidelity': 0.31}
"""

from __future__ import annotations

import contextvars
import re
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pimg.errors import InputError, PimgError
from pimg.frontends.subject_store import (
    SavedSubject,
    SessionSpace,
    check_prompt_tokens,
    load_subjects,
    new_session_id,
    subject_parts,
)
from pimg.frontends.uploads import UploadLimits, check_uploads, copy_uploads
from pimg.methods import get_method, list_methods

#: Per-photo upload limits (the same size limit is given to Gradio's upload route).
UPLOAD_LIMITS = UploadLimits(min_files=1, max_files=10, max_bytes=20 * 2**20)
MAX_TRAIN_STEPS = 5000
MAX_IMAGES = 8
# Value of the "base" choice in the Generate tab; ':' can never occur in a subject name.
BASE_CHOICE = ":base"
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
    """One Generate click: the images (inside the session folder), their settings, what made them."""

    images: list[str]
    settings: list[dict]
    prompt: str
    subjects: list[str]
    tokens: list[str]


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
    if not low <= number <= high:
        raise InputError(f"{name} must be between {low:g} and {high:g}, got {value!r}.")
    return int(number) if integer else number


class DemoBackend:
    """The demo's logic, on plain values: sessions, training, generation, evaluation.

    Args:
        base: the base model (built-in name, diffusers folder, single file or hub id).
        output_dir: everything the demo writes goes here (one sub-folder per session).
        device: "auto" (CUDA with bf16/fp16 when present, else CPU fp32), "cpu" or "cuda[:N]".
        train_settings: per method name (`pimg.methods`), config keys to set on every run,
            e.g. `{"<method>": {"loop.steps": 50}}` (dotted keys as in `pimg train --set`).

    Example: see the module docstring.
    """

    def __init__(
        self,
        base: str = "tiny",
        output_dir: str | Path = "out/app",
        device: str = "auto",
        train_settings: dict[str, dict] | None = None,
    ):
        self.base = base
        self.train_settings = train_settings or {}
        self.output_dir = Path(output_dir)
        self.device_choice = device
        self._pipelines: dict[str, Any] = {}
        self._metrics: dict[str, Any] | None = None
        # One generation at a time: parts are attached to the shared pipeline for one call, then removed.
        self._generate_lock = threading.Lock()

    # -------------------------------------------------------------------------------------- sessions

    def new_session(self) -> str:
        """A new session id (the page gets one on load)."""
        return new_session_id()

    def space(self, session_id: str) -> SessionSpace:
        return SessionSpace(self.output_dir, session_id)

    def subjects(self, session_id: str) -> list[SavedSubject]:
        space = self.space(session_id)
        return [space.store.load(name) for name in space.store.names()]

    def method_defaults(self, label: str) -> tuple[str, int]:
        """(default token, default steps) of a method: its config as `personalize` starts from it."""
        config = self._train_config(get_method(label).name, {})
        return config.token, config.loop.steps

    def _train_config(self, trainer: str, overrides: dict):
        """The base's preset for `trainer` if it has one (else the defaults) <- train_settings <- overrides."""
        from pimg.methods import builtin_preset
        from pimg.trainers.personalize import load_train_config

        preset = builtin_preset(trainer, self.base)
        settings = {"base": self.base, **self.train_settings.get(trainer, {}), **overrides}
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

        Training runs in a worker thread (in this context, so `gr.Progress(track_tqdm=True)` follows its
        progress bar) while this generator shows each new sample grid as it is written.
        """

        space = self.space(session_id)
        entry = get_method(method)
        trainer = entry.name
        class_noun = (class_noun or "").strip()
        if not class_noun or len(class_noun.split()) > 3:
            raise InputError(
                f"class noun {class_noun!r}: say in a word or two what the subject is, e.g. 'star' or 'dog'."
            )
        steps = _number("steps", steps, 1, MAX_TRAIN_STEPS)
        photos = check_uploads(files, UPLOAD_LIMITS)
        name = (name or "").strip() or _free_name(space, f"{class_noun.replace(' ', '_')}_{trainer}")
        folder = space.store.create(name)
        try:
            copied = copy_uploads(photos, folder / "photos")
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
            if "class_images_dir" in _config_fields(entry):
                overrides["class_images_dir"] = str(self._class_images_dir(class_noun))
                note = " First the base draws images of the bare class (prior preservation; once per class noun)."
            config = self._train_config(trainer, overrides)
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
        guidance_scale: float | None = None,
        num_images: int = 4,
    ) -> Generation:
        """Generate with the base (or a DreamBooth subject) and the chosen subjects at their scales.

        Args:
            base_choice: `BASE_CHOICE` for the app's base, or the name of a DreamBooth subject.
            chosen: (subject name or None for an empty slot, scale) pairs.
            guidance_scale: None takes the lowest the chosen subjects' trainings recorded, else the base's.
        """
        space = self.space(session_id)
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
        folder = space.new_folder("images")
        paths = [
            str(im.save(folder / f"{k:02d}_seed{im.settings['seed']}.png")) for k, im in enumerate(images)
        ]
        subjects = [s.name for s, _ in picks]
        settings = [{**im.settings, "subjects": subjects} for im in images]
        return Generation(paths, settings, prompt, subjects, [s.token for s, _ in picks])

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
        space = self.space(session_id)
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
            0, f"CLIP-T prompt: '{clip_t_prompt}' (token removed); references: {len(references)} photo(s)."
        )
        return Evaluation(rows, means, notes)


def method_labels() -> list[str]:
    """The registered methods' labels, as the Personalize tab lists them (`pimg.methods`)."""
    return [m.label for m in list_methods()]


def _config_fields(method) -> set[str]:
    import dataclasses

    return {f.name for f in dataclasses.fields(method.config_class())}


def _free_name(space: SessionSpace, stem: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9_-]", "_", stem)[:40] or "subject"
    taken = set(space.store.names())
    number = 1
    while f"{stem}_{number}" in taken or space.store.folder(f"{stem}_{number}").exists():
        number += 1
    return f"{stem}_{number}"
