"""pimg's web demo: personalize a model on your photos, generate with it, compose subjects, score the results.

    pimg app                                        # the tiny model on CPU, http://127.0.0.1:7860
    pimg app --base /models/sd15 --auth me:secret --output-dir /data/pimg-app
    python app.py ...                               # the same, from a source checkout

`build_demo` lays out the page and maps its events to `pimg.frontends.demo.DemoBackend`, which does the work
on plain values (tests drive it directly). Nothing loads at import: the base pipeline and the metric
backbones load on first use (or in `main()`) and are cached. Every session gets its own folder under
the output folder, so people using the demo at once never see each other's subjects or images, and
nothing outside the output folder is read or served. A session's folder is removed when its page
closes, or after hours unused; Gradio's own copies of uploads and results after `CACHE_MAX_AGE_S`.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from pimg.errors import PimgError
from pimg.frontends.demo import (
    BASE_CHOICE,
    COMPOSE_REGIONS,
    DRAWN_MASK,
    MAX_COMPOSE_SUBJECTS,
    MAX_IMAGES,
    UPLOAD_LIMITS,
    DemoBackend,
    Placement,
    drawn_mask,
    method_labels,
)
from pimg.methods import get_method

#: How many saved subjects one generation can combine.
SUBJECT_SLOTS = 3
#: Gradio keeps every upload, and a copy of every image it shows, in its cache folder: files older than
#: this are removed (checked every `CACHE_SWEEP_S`), and all of them when the server stops. Training
#: copies the photos it uses into the session's folder, so an hour-old upload is no longer needed.
CACHE_MAX_AGE_S = 3600
CACHE_SWEEP_S = 600


def _gradio():
    try:
        import gradio
    except ImportError as exc:
        raise ImportError("the demo needs gradio: pip install 'pimg[app]'") from exc
    return gradio


# ------------------------------------------------------------------------------------------ errors


def error_message(exc: BaseException) -> str | None:
    """The message to show a person for `exc`, or None for an unexpected error (a bug: keep the traceback)."""
    if isinstance(exc, PimgError):
        return str(exc)
    # torch's OutOfMemoryError is a RuntimeError ("CUDA out of memory. Tried to allocate ..."), as is MPS's.
    if isinstance(exc, MemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
    ):
        return (
            "Out of memory. Generate fewer images at once, train with fewer photos, or use a smaller base "
            "model; on a GPU shared with other programs, close them and try again."
        )
    return None


def handle_errors(fn):
    """Handler decorator: pimg errors and out-of-memory become `gr.Error` messages on the page.

    Such an error is the user's to fix, not a bug: the server log gets one line (`pimg: <handler>:
    <message>`), not a traceback. Any other exception keeps its traceback. Keeps `fn`'s signature
    (Gradio reads its `gr.Progress` default through `functools.wraps`).
    """

    def translate(exc: BaseException):
        message = error_message(exc)
        if message is None:
            raise exc
        print(f"pimg: {fn.__name__}: {' '.join(message.split())}", file=sys.stderr, flush=True)
        raise _gradio().Error(message, print_exception=False) from exc

    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def generator_wrapper(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except Exception as exc:
                translate(exc)

        return generator_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            translate(exc)

    return wrapper


# ------------------------------------------------------------------------------------------ page


def _caption(settings: dict) -> str:
    subjects = ", ".join(settings.get("subjects", [])) or "base only"
    return (
        f"seed {settings['seed']} · {settings['num_inference_steps']} steps · "
        f"guidance {settings['guidance_scale']} · {subjects}"
    )


def build_demo(
    base: str = "tiny",
    output_dir: str | Path = "out/app",
    device: str = "auto",
    train_settings: dict[str, dict] | None = None,
):
    """The demo page (a `gr.Blocks`); loads no model (they load on first use).

    Args:
        base: base model (built-in name, diffusers folder, single file or hub id).
        output_dir: where sessions' subjects and images are written (and the only folder served).
        device: "auto", "cpu" or "cuda[:N]".
        train_settings: per-trainer config keys set on every run (see `DemoBackend`).

    Example:
        >>> serve(build_demo("tiny", "out/app"))
    """
    gr = _gradio()
    backend = DemoBackend(base, output_dir, device, train_settings)
    with gr.Blocks(
        title="pimg", analytics_enabled=False, delete_cache=(CACHE_SWEEP_S, CACHE_MAX_AGE_S)
    ) as demo:
        gr.Markdown(
            f"# pimg: personalized text-to-image\nBase model: `{base}`. Train a subject on a few photos, "
            "generate with it, put several subjects in one image, then score the images against the photos."
        )
        with gr.Tabs():
            with gr.Tab("Personalize", id="personalize"):
                personalize = _personalize_tab(gr, *backend.method_defaults(method_labels()[0][1]))
            with gr.Tab("Generate", id="generate"):
                generate = _generate_tab(gr, base, backend.guidance_default())
            with gr.Tab("Evaluate", id="evaluate"):
                evaluate = _evaluate_tab(gr)
            with gr.Tab("Compose", id="compose"):
                compose = _compose_tab(gr)
        _wire(gr, demo, backend, personalize, generate, evaluate, compose)
    demo.backend = backend  # for tests and main(): the page's logic without the page
    return demo


def _personalize_tab(gr, token: str, steps: int) -> SimpleNamespace:
    with gr.Row():
        with gr.Column():
            photos = gr.File(
                label=f"Photos of the subject ({UPLOAD_LIMITS.min_files}-{UPLOAD_LIMITS.max_files})",
                file_count="multiple",
                file_types=["image"],
                elem_id="photos",
            )
            method = gr.Radio(method_labels(), value=method_labels()[0][1], label="Method", elem_id="method")
            with gr.Row():
                token = gr.Textbox(token, label="Token", elem_id="token")
                class_noun = gr.Textbox(
                    label="Class noun", placeholder="what it is: star, dog…", elem_id="class-noun"
                )
            with gr.Row():
                steps = gr.Number(steps, label="Training steps", precision=0, elem_id="steps")
                name = gr.Textbox(label="Subject name", placeholder="optional, e.g. my_star", elem_id="name")
            button = gr.Button("Train", variant="primary", elem_id="train")
        with gr.Column():
            status = gr.Markdown(elem_id="train-status")
            # One grid of sample images (a row per sample prompt), replaced as training writes new ones.
            samples = gr.Image(
                label="Samples", type="filepath", interactive=False, height=220, elem_id="samples"
            )
    return SimpleNamespace(
        photos=photos,
        method=method,
        token=token,
        class_noun=class_noun,
        steps=steps,
        name=name,
        button=button,
        status=status,
        samples=samples,
    )


def _generate_tab(gr, base: str, guidance: float) -> SimpleNamespace:
    with gr.Row():
        with gr.Column():
            base_choice = gr.Dropdown(
                [(f"{base} (base model)", BASE_CHOICE)], value=BASE_CHOICE, label="Base", elem_id="base"
            )
            slots = []
            for i in range(SUBJECT_SLOTS):
                with gr.Row():
                    subject = gr.Dropdown([], value=None, label=f"Subject {i + 1}", elem_id=f"subject-{i}")
                    slots.append((subject, gr.Slider(0, 2, value=1.0, step=0.05, label="Scale")))
            prompt = gr.Textbox(
                label="Prompt", placeholder="a sks star on a green background", elem_id="prompt"
            )
            negative_prompt = gr.Textbox(label="Negative prompt", elem_id="negative-prompt")
            with gr.Row():
                seed = gr.Number(0, label="Seed", precision=0, elem_id="seed")
                steps = gr.Number(25, label="Steps", precision=0, elem_id="gen-steps")
                # Empty: the chosen subjects' recommended guidance (their trainings record it), else the base's.
                # A Textbox, because a Number field shows and sends 0 when left empty.
                guidance = gr.Textbox(
                    "",
                    label=f"Guidance (empty: the subjects' own, else {guidance:g})",
                    placeholder="auto",
                    max_lines=1,
                    elem_id="guidance",
                )
                num_images = gr.Slider(1, MAX_IMAGES, value=4, step=1, label="Images", elem_id="num-images")
            button = gr.Button("Generate", variant="primary", elem_id="generate")
        with gr.Column():
            gallery = gr.Gallery(
                label="Images", columns=4, height=320, object_fit="contain", elem_id="gallery"
            )
            with gr.Accordion("Settings of each image", open=False):
                settings = gr.JSON(elem_id="settings")
    return SimpleNamespace(
        base_choice=base_choice,
        slots=slots,
        prompt=prompt,
        negative_prompt=negative_prompt,
        seed=seed,
        steps=steps,
        guidance=guidance,
        num_images=num_images,
        button=button,
        gallery=gallery,
        settings=settings,
    )


def _evaluate_tab(gr) -> SimpleNamespace:
    gr.Markdown("Scores the last generated images against a subject's photos and the prompt.")
    subject = gr.Dropdown([], value=None, label="Subject", elem_id="eval-subject")
    button = gr.Button("Evaluate", variant="primary", elem_id="evaluate")
    with gr.Row():
        table = gr.Dataframe(label="Scores per image", interactive=False, elem_id="scores")
        plot = gr.BarPlot(x="metric", y="mean", label="Mean scores", elem_id="plot")
    notes = gr.Markdown(elem_id="eval-notes")
    return SimpleNamespace(subject=subject, button=button, table=table, plot=plot, notes=notes)


def _compose_tab(gr) -> SimpleNamespace:
    gr.Markdown(
        f"Several saved subjects in one image, each subject confined to its region, in one pass per step. "
        f"Choose 2 to {MAX_COMPOSE_SUBJECTS} subjects and place each; the prompt describes the whole image."
    )
    defaults = ("left", "right", "top", "bottom")
    with gr.Row():
        with gr.Column():
            slots = []
            for i in range(MAX_COMPOSE_SUBJECTS):
                with gr.Group():
                    with gr.Row():
                        subject = gr.Dropdown(
                            [], value=None, label=f"Subject {i + 1}", scale=2, elem_id=f"compose-subject-{i}"
                        )
                        region = gr.Dropdown(
                            [*COMPOSE_REGIONS, DRAWN_MASK],
                            value=defaults[i],
                            label="Region",
                            scale=1,
                            elem_id=f"compose-region-{i}",
                        )
                        prompt = gr.Textbox(
                            label="Region prompt",
                            placeholder="optional (empty: the image's prompt)",
                            max_lines=1,
                            scale=3,
                            elem_id=f"compose-region-prompt-{i}",
                        )
                    # Square like the image; paint is where the subject goes (resized to the image).
                    mask = gr.Sketchpad(
                        label="Paint the region",
                        type="numpy",
                        image_mode="RGBA",
                        canvas_size=(256, 256),
                        fixed_canvas=True,
                        layers=False,
                        brush=gr.Brush(colors=["#1f6feb"], default_size=24, color_mode="fixed"),
                        visible=False,
                        elem_id=f"compose-mask-{i}",
                    )
                slots.append(SimpleNamespace(subject=subject, region=region, prompt=prompt, mask=mask))
            prompt = gr.Textbox(
                label="Prompt",
                placeholder="a sks star at the left and a sks circle at the right on a blue background",
                elem_id="compose-prompt",
            )
            with gr.Row():
                seed = gr.Number(0, label="Seed", precision=0, elem_id="compose-seed")
                steps = gr.Number(25, label="Steps", precision=0, elem_id="compose-steps")
                num_images = gr.Slider(
                    1, MAX_IMAGES, value=4, step=1, label="Images", elem_id="compose-num-images"
                )
                feather = gr.Slider(
                    0, 0.25, value=0.0, step=0.01, label="Soft edges", elem_id="compose-feather"
                )
            button = gr.Button("Generate", variant="primary", elem_id="compose")
        with gr.Column():
            gallery = gr.Gallery(
                label="Images", columns=4, height=320, object_fit="contain", elem_id="compose-gallery"
            )
            status = gr.Markdown(elem_id="compose-status")
    return SimpleNamespace(
        slots=slots,
        prompt=prompt,
        seed=seed,
        steps=steps,
        num_images=num_images,
        feather=feather,
        button=button,
        gallery=gallery,
        status=status,
    )


def _compose_status(placements: list, notes: list[str]) -> str:
    placed = ", ".join(f"**{p.subject}** ({p.region})" for p in placements if p.subject)
    return "\n".join([f"Composed {placed}.", *(f"- {note}" for note in notes)])


def _wire(
    gr,
    demo,
    backend: DemoBackend,
    p: SimpleNamespace,
    g: SimpleNamespace,
    e: SimpleNamespace,
    c: SimpleNamespace,
) -> None:
    """Connect the tabs' events to the backend; each handler only converts between values and components."""
    # This page's session id, made on load. Its files go when the page closes (`end_page`, on unload); the
    # delete callback covers a page whose unload never came (Gradio drops a closed page's state an hour on).
    session = gr.State(None, delete_callback=backend.end_session)
    generation = gr.State(None)  # the last Generate result, for the Evaluate tab

    @handle_errors
    def start_session(request):
        return backend.new_session(page=request.session_hash)

    def end_page(request):
        backend.end_page(request.session_hash)

    # Gradio passes the request to a parameter annotated gr.Request; a string annotation (this module
    # has `from __future__ import annotations`) names `gr`, which Gradio cannot resolve here.
    start_session.__annotations__["request"] = end_page.__annotations__["request"] = gr.Request

    @handle_errors
    def on_method(label):
        return backend.method_defaults(label)

    @handle_errors
    def on_train(
        session_id,
        files,
        method,
        token,
        class_noun,
        steps,
        name,
        progress=gr.Progress(track_tqdm=True),  # noqa: B008 (Gradio reads the tracker from the default)
    ):
        for update in backend.personalize(
            session_id, files, method, token, class_noun, steps, name, progress
        ):
            yield update.status, (update.samples[-1] if update.samples else None)

    @handle_errors
    def refresh_choices(session_id):
        subjects = backend.subjects(session_id)
        bases = [(f"{backend.base} (base model)", BASE_CHOICE)]
        whole = {s.name: get_method(s.method) for s in subjects if get_method(s.method).whole_model}
        bases += [(f"{name} ({method.label})", name) for name, method in whole.items()]
        parts = [(s.label(), s.name) for s in subjects if s.name not in whole]
        everyone = [(s.label(), s.name) for s in subjects]
        latest = everyone[-1][1] if everyone else None
        slots = [gr.update(choices=parts) for _ in g.slots]
        compose_slots = [gr.update(choices=parts) for _ in c.slots]
        return gr.update(choices=bases), *slots, gr.update(choices=everyone, value=latest), *compose_slots

    @handle_errors
    def on_generate(values: dict, progress=gr.Progress(track_tqdm=True)):  # noqa: B008
        # Inputs come as one {component: value} dict, so the subject slots need no fixed parameter list.
        result = backend.generate(
            values[session],
            values[g.base_choice],
            [(values[subject], values[scale]) for subject, scale in g.slots],
            values[g.prompt],
            values[g.negative_prompt],
            values[g.seed],
            values[g.steps],
            values[g.guidance],
            values[g.num_images],
        )
        gallery = [(path, _caption(s)) for path, s in zip(result.images, result.settings, strict=True)]
        subject = gr.update(value=result.subjects[0]) if result.subjects else gr.update()
        return gallery, result.settings, result, subject

    @handle_errors
    def on_evaluate(session_id, subject_name, last):
        import pandas as pd

        result = backend.evaluate(session_id, subject_name, last)
        means = {"image": "mean", "seed": ""} | {k: round(v, 4) for k, v in result.means.items()}
        table = pd.concat([pd.DataFrame(result.rows).round(4).astype(object), pd.DataFrame([means])])
        plot = pd.DataFrame({"metric": list(result.means), "mean": list(result.means.values())})
        return table, plot, "\n".join(f"- {note}" for note in result.notes)

    @handle_errors
    def on_compose(values: dict, progress=gr.Progress(track_tqdm=True)):  # noqa: B008
        # The mask counts only where the slot says "draw mask"; elsewhere the hidden canvas is ignored.
        placements = [
            Placement(
                values[s.subject],
                values[s.region],
                values[s.prompt] or "",
                drawn_mask(values[s.mask]) if values[s.region] == DRAWN_MASK else None,
            )
            for s in c.slots
        ]
        result = backend.compose(
            values[session],
            placements,
            values[c.prompt],
            seed=values[c.seed],
            num_inference_steps=values[c.steps],
            num_images=values[c.num_images],
            feather=values[c.feather],
        )
        gallery = [(path, _caption(s)) for path, s in zip(result.images, result.settings, strict=True)]
        return gallery, _compose_status(placements, result.notes)

    choices = [
        g.base_choice,
        *(subject for subject, _ in g.slots),
        e.subject,
        *(slot.subject for slot in c.slots),
    ]
    demo.load(start_session, outputs=session).then(refresh_choices, session, choices)
    demo.unload(end_page)
    p.method.change(on_method, p.method, [p.token, p.steps])
    p.button.click(
        on_train,
        [session, p.photos, p.method, p.token, p.class_noun, p.steps, p.name],
        [p.status, p.samples],
        concurrency_limit=1,  # one training at a time: it takes the whole CPU or GPU; others wait in the queue
    ).success(refresh_choices, session, choices)
    generate_inputs = {session, g.base_choice, g.prompt, g.negative_prompt, g.seed, g.steps, g.guidance}
    g.button.click(
        on_generate,
        generate_inputs | {g.num_images} | {c for pair in g.slots for c in pair},
        [g.gallery, g.settings, generation, e.subject],
        concurrency_limit=1,
    )
    e.button.click(on_evaluate, [session, e.subject, generation], [e.table, e.plot, e.notes])
    for slot in c.slots:  # the canvas shows only where the slot is placed by a drawn mask
        slot.region.change(lambda region: gr.update(visible=region == DRAWN_MASK), slot.region, slot.mask)
    compose_inputs = {session, c.prompt, c.seed, c.steps, c.num_images, c.feather}
    c.button.click(
        on_compose,
        compose_inputs | {component for slot in c.slots for component in vars(slot).values()},
        [c.gallery, c.status],
        concurrency_limit=1,
    )


# ------------------------------------------------------------------------------------------ main


def _auth(text: str) -> tuple[str, str]:
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise argparse.ArgumentTypeError(f"--auth {text!r}: write USER:PASSWORD, e.g. --auth me:secret")
    return user, password


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pimg app", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--base", default="tiny", help="base model: built-in name, diffusers folder, file or hub id"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=None, help="port (default: 7860 or the next free one)")
    parser.add_argument("--share", action="store_true", help="also serve through a public gradio.live link")
    parser.add_argument("--auth", type=_auth, default=None, metavar="USER:PASSWORD", help="require a login")
    parser.add_argument("--output-dir", default="out/app", help="where subjects and images are written")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda[:N]")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    output_dir = Path(args.output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    # Uploads land inside the output folder too, so the app reads and serves nothing outside it;
    # Gradio reads these before it is imported.
    os.environ.setdefault("GRADIO_TEMP_DIR", str(output_dir / ".uploads"))
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    began = time.perf_counter()
    demo = build_demo(args.base, output_dir, args.device)
    print(f"pimg: {demo.backend.device()[2]}; loading {args.base}…", file=sys.stderr)
    try:
        demo.backend.pipeline()  # the first person should not wait for the base model to load
    except PimgError as exc:
        sys.exit(f"pimg: {exc}")
    removed = demo.backend.remove_idle_sessions()  # left by an earlier run, unused for hours
    print(
        f"pimg: ready in {time.perf_counter() - began:.1f} s"
        + (f"; removed {len(removed)} idle session(s)" if removed else ""),
        file=sys.stderr,
    )
    try:
        serve(demo, host=args.host, port=args.port, share=args.share, auth=args.auth)
    finally:
        demo.backend.end_all_sessions()  # no page can come back to a stopped server's sessions


def serve(demo, *, host="127.0.0.1", port=None, share=False, auth=None, block=True):
    """Launch `demo` through Gradio's queue, serving files from its output folder only.

    Returns:
        The local URL (when `block` is False; otherwise it serves until interrupted).
    """
    _, url, _ = demo.queue(default_concurrency_limit=1).launch(
        server_name=host,
        server_port=port,
        share=share,
        auth=auth,
        allowed_paths=[str(demo.backend.output_dir.resolve())],
        max_file_size=demo.backend.upload_limits.max_bytes,
        prevent_thread_lock=not block,
        quiet=not block,
    )
    return url


if __name__ == "__main__":
    main()
