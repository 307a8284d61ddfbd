"""The web demo: builds without models, rejects bad uploads readably, keeps sessions apart, works in a browser.

The browser test drives the real page in headless Chromium through Playwright; it skips (saying
what to install) where either is missing. CI needs the Debian package `chromium`; Playwright comes
with the `test` extra.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from pimg.errors import InputError, ModelLoadError
from pimg.frontends.demo import (
    BASE_CHOICE,
    COMPOSE_REGIONS,
    DRAWN_MASK,
    DemoBackend,
    Placement,
    drawn_mask,
    method_labels,
    strip_tokens,
)
from pimg.frontends.subject_store import (
    SavedSubject,
    SessionSpace,
    SubjectStore,
    check_prompt_tokens,
    load_subjects,
    new_session_id,
    subject_parts,
)
from pimg.frontends.uploads import UploadLimits, check_uploads, copy_uploads, image_problem
from pimg.toyworld.subjects import EVAL_SUBJECTS

pytest.importorskip("gradio", reason="the demo needs gradio: pip install -e '.[app]'")

REPO = Path(__file__).resolve().parents[1]
# Fewer sample and class-image denoising steps keep the trainings in these tests short.
FAST = {
    "lora": {"num_inference_steps": 4},
    "ti": {"num_inference_steps": 4, "guidance_scale": 2.0},
    "dreambooth": {"num_inference_steps": 4, "num_class_images": 4, "guidance_scale": 2.0},
}
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


import pimg.frontends.app as app  # noqa: E402  (after the gradio check)


def toy_uploads(folder: Path, subject: str, n: int = 4, seed: int = 0) -> list[str]:
    """A toy-world subject's photos written as PNG files, as a browser would upload them."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, pixels in enumerate(EVAL_SUBJECTS[subject].photos(n, seed)):
        path = folder / f"{subject}_{i}.png"
        Image.fromarray(pixels).save(path)
        paths.append(str(path))
    return paths


# ------------------------------------------------------------------------------------------ building


@pytest.mark.parametrize("module", ["app", "pimg.frontends.app"])
def test_import_loads_nothing_heavy(module):
    # The launcher at the top of the checkout and the installed module alike.
    code = f"import sys; sys.path.insert(0, '.'); import {module}; print(sorted(m for m in ('torch', 'diffusers', 'gradio') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_build_demo_loads_no_model(tmp_path):
    demo = app.build_demo(base="tiny", output_dir=tmp_path, device="cpu")
    assert demo.backend._pipelines == {} and demo.backend._metrics is None
    import gradio as gr

    tabs = [block.label for block in demo.blocks.values() if isinstance(block, gr.Tab)]
    assert tabs == ["Personalize", "Generate", "Evaluate", "Compose"]
    assert not list(tmp_path.iterdir())  # nothing written either


def test_main_options():
    args = app.parse_args(["--auth", "me:secret", "--port", "7861"])
    assert (args.base, args.host, args.share, args.auth, args.port) == (
        "tiny",
        "127.0.0.1",
        False,
        ("me", "secret"),
        7861,
    )
    with pytest.raises(SystemExit):
        app.parse_args(["--auth", "nopassword"])


def test_server_serves_nothing_outside_its_output_folder(tmp_path):
    import urllib.error
    import urllib.request

    out = tmp_path / "out"
    demo = app.build_demo(base="tiny", output_dir=out, device="cpu")
    url = app.serve(demo, block=False)
    inside = out / "sessions" / "x.png"
    inside.parent.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(inside)

    def status(path: Path) -> int:
        try:
            with urllib.request.urlopen(f"{url}gradio_api/file={path}", timeout=10) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code

    try:
        assert status(inside) == 200
        assert status(REPO / "app.py") == 403
        assert status(Path("/etc/passwd")) == 403
        assert status(out / "sessions" / ".." / ".." / "elsewhere.txt") in (403, 404)
    finally:
        demo.close()


# ------------------------------------------------------------------------------------------ uploads


@pytest.fixture
def good_png(tmp_path) -> Path:
    path = tmp_path / "good.png"
    Image.fromarray(EVAL_SUBJECTS["ringed_star_rgb"].photos(1, 0)[0]).save(path)
    return path


def test_text_file_named_png_is_rejected_by_name(tmp_path, good_png):
    fake = tmp_path / "notes.png"
    fake.write_text("shopping list: eggs, milk\n")
    with pytest.raises(InputError) as err:
        check_uploads([good_png, fake])
    message = str(err.value)
    assert "1 of 2 uploaded file(s) cannot be used" in message
    assert "notes.png: the file is a text file, not an image" in message
    assert "good.png" not in message


def test_empty_file_is_rejected(tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.touch()
    assert image_problem(empty) == "the file is empty (0 bytes); copy the photo again and re-upload it"


def test_50_megabyte_image_is_rejected_before_decoding(tmp_path):
    big = tmp_path / "scan.bmp"
    Image.new("RGB", (4200, 4200), "white").save(big)  # an uncompressed 50 MB image
    assert big.stat().st_size > 50 * 10**6
    with pytest.raises(
        InputError, match=r"scan\.bmp: the file is 50\.\d MB, over the 20\.0 MB limit per photo"
    ):
        check_uploads([big])


def test_other_bad_uploads(tmp_path, good_png):
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(good_png.read_bytes()[:100])
    pdf = tmp_path / "doc.png"
    pdf.write_bytes(b"%PDF-1.7 rest of a document")
    assert "truncated or damaged" in image_problem(truncated)
    assert "a PDF document" in image_problem(pdf)
    assert "only photos can be uploaded" in image_problem(tmp_path / "script.py")
    assert "smaller than the training size 128 px" in image_problem(good_png, UploadLimits(min_side=128))
    assert "megapixel limit" in image_problem(good_png, UploadLimits(max_pixels=100))
    with pytest.raises(InputError, match="0 photo.s. uploaded; upload at least 1"):
        check_uploads(None)
    with pytest.raises(InputError, match="11 photos uploaded, more than the 10 allowed"):
        check_uploads([good_png] * 11)


def test_copied_uploads_get_our_names(tmp_path, good_png):
    copied = copy_uploads(check_uploads([good_png]), tmp_path / "photos")
    assert [p.name for p in copied] == ["photo_00.png"]
    assert copied[0].read_bytes() == good_png.read_bytes()


def test_bad_upload_becomes_a_page_message(tmp_path):
    import gradio as gr

    fake = tmp_path / "cat.png"
    fake.write_text("not a cat")
    backend = DemoBackend("tiny", tmp_path / "out", "cpu")
    train = app.handle_errors(backend.personalize)
    with pytest.raises(gr.Error, match="cat.png: the file is a text file"):
        list(train(backend.new_session(), [str(fake)], "LoRA", "sks", "cat", 10))
    assert backend._pipelines == {}  # rejected before any model was touched


def test_demo_trains_from_the_builtin_base_preset(tmp_path, random_tiny_dir):
    from pimg.config import load_config
    from pimg.methods import builtin_preset, preset_path
    from pimg.trainers.lora import LoraTrainConfig

    preset = load_config(LoraTrainConfig, preset_path("lora_tiny"))
    assert preset.batch_size != LoraTrainConfig().batch_size  # else this test could not tell them apart
    backend = DemoBackend("tiny", tmp_path / "out", "cpu", {"lora": {"rank": 2}})
    config = backend._train_config("lora", {"class_noun": "star"})
    assert (config.batch_size, config.loop.learning_rate) == (preset.batch_size, preset.loop.learning_rate)
    assert config.rank == 2  # the demo's own settings still win over the preset
    assert config.auto_caption  # uploaded photos have no captions: the base names their settings
    assert not LoraTrainConfig().auto_caption and preset.auto_caption  # on for tiny, measured there only
    assert backend.method_defaults("LoRA") == (preset.token, preset.loop.steps)
    # A base folder has no preset: the dataclass defaults, as before.
    assert builtin_preset("lora", str(random_tiny_dir)) is None
    folder_backend = DemoBackend(str(random_tiny_dir), tmp_path / "out2", "cpu")
    assert folder_backend._train_config("lora", {}).batch_size == LoraTrainConfig().batch_size


def test_error_decorator():
    import gradio as gr

    @app.handle_errors
    def fails(exc):
        raise exc

    with pytest.raises(gr.Error, match="no such base"):
        fails(ModelLoadError("no such base"))
    with pytest.raises(gr.Error, match="Out of memory"):
        fails(MemoryError())
    with pytest.raises(gr.Error, match="Generate fewer images"):
        fails(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    with pytest.raises(KeyError):  # a bug keeps its traceback
        fails(KeyError("x"))


def test_user_errors_reach_the_log_as_one_line(capsys):
    import gradio as gr

    @app.handle_errors
    def on_train():
        raise InputError("class noun '': say in a word or two what the subject is,\n  e.g. 'star'.")

    with pytest.raises(gr.Error) as err:
        on_train()
    assert err.value.print_exception is False  # Gradio prints no traceback for it
    assert "e.g. 'star'" in err.value.message
    assert capsys.readouterr().err == (
        "pimg: on_train: class noun '': say in a word or two what the subject is, e.g. 'star'.\n"
    )


def test_guidance_field_empty_means_none():
    from pimg.frontends.demo import _guidance

    assert _guidance("") is None and _guidance("  ") is None and _guidance(None) is None
    assert _guidance(" 2.5 ") == 2.5 and _guidance(0) == 0.0
    for bad in ("nan", "inf", "-1", "31", "three"):
        with pytest.raises(InputError, match="guidance must be"):
            _guidance(bad)


def test_photos_smaller_than_the_training_size_are_refused_by_name(tmp_path, random_tiny_dir):
    photos = toy_uploads(tmp_path / "up", "ringed_star_rgb", n=2)  # 64 px: the training size
    Image.new("RGB", (48, 80), "white").save(tmp_path / "up" / "small.png")
    backend = DemoBackend(str(random_tiny_dir), tmp_path / "out", "cpu", FAST)
    session = backend.new_session()
    with pytest.raises(
        InputError,
        match=r"1 of 3 uploaded file\(s\) cannot be used: small\.png: the image is 48x80 px, smaller than the "
        r"training size 64 px",
    ):
        list(
            backend.personalize(
                session, [*photos, str(tmp_path / "up" / "small.png")], "LoRA", "sks", "star", 1
            )
        )
    assert backend.subjects(session) == [] and not (backend.space(session).folder / "subjects").exists()


def _keep_photos(backend: DemoBackend, session: str, size: int) -> None:
    """As if `session` had trained a subject on a photo of `size` bytes."""
    folder = backend.space(session).store.create("kept") / "photos"
    folder.mkdir()
    (folder / "photo_00.png").write_bytes(b"x" * size)


def test_upload_quotas_per_session_and_in_total(tmp_path, good_png):
    size = good_png.stat().st_size
    limits = UploadLimits(max_session_bytes=3 * size, max_total_bytes=4 * size)
    backend = DemoBackend("tiny", tmp_path / "out", "cpu", upload_limits=limits)
    first, second = backend.new_session(), backend.new_session()
    _keep_photos(backend, first, 2 * size)
    with pytest.raises(
        InputError,
        match=r"this upload \(.* MB\) would bring the photos this session keeps to .*"
        r"over the .* MB limit per session",
    ):
        list(backend.personalize(first, [good_png] * 2, "LoRA", "sks", "star", 1))
    _keep_photos(backend, second, size)  # within its own quota, but not within the total
    with pytest.raises(
        InputError, match=r"the demo holds .* MB of photos from all sessions.*try again later"
    ):
        list(backend.personalize(second, [good_png] * 2, "LoRA", "sks", "star", 1))
    assert backend.kept_photo_bytes() == 3 * size
    assert [p.name for p in (backend.space(first).folder / "subjects").iterdir()] == [
        "kept"
    ]  # nothing copied
    with pytest.raises(InputError, match="max_session_bytes <= max_total_bytes"):
        UploadLimits(max_session_bytes=10, max_total_bytes=5)


def test_sessions_are_removed_when_they_end_or_sit_unused(tmp_path, good_png):
    import os

    backend = DemoBackend("tiny", tmp_path / "out", "cpu", max_idle_seconds=3600)
    page_session = backend.new_session(page="page-hash")
    _keep_photos(backend, page_session, 10)
    folder = backend.space(page_session).folder
    backend.end_page("page-hash")  # the page was closed (Gradio's unload)
    assert not folder.exists()
    with pytest.raises(InputError, match="this session has ended .* reload the page"):
        backend.subjects(page_session)
    backend.end_session(page_session)  # again, e.g. from gr.State's delete callback: nothing happens
    backend.end_session(None)

    # A job still running keeps its folder until it ends.
    busy = backend.new_session()
    _keep_photos(backend, busy, 10)
    with backend._using(busy) as space:
        backend.end_session(busy)
        assert space.folder.exists()
    assert not space.folder.exists()

    # Unused too long: this backend's own sessions, and the folders an earlier run left behind.
    idle, fresh = backend.new_session(), backend.new_session()
    for session in (idle, fresh):
        _keep_photos(backend, session, 10)
    backend._last_used[idle] -= 7200
    left_over = tmp_path / "out" / "sessions" / ("a" * 32)
    (left_over / "images" / "0000").mkdir(parents=True)
    old = time.time() - 7200
    for path in [left_over, *left_over.rglob("*")]:
        os.utime(path, (old, old))
    recent = tmp_path / "out" / "sessions" / ("b" * 32)
    recent.mkdir()
    not_a_session = tmp_path / "out" / "sessions" / "notes"
    not_a_session.mkdir()
    os.utime(not_a_session, (old, old))
    backend.new_session()  # each page load sweeps
    remaining = {p.name for p in (tmp_path / "out" / "sessions").iterdir()}
    assert remaining == {fresh, recent.name, "notes"}
    backend.end_all_sessions()  # the server stops
    assert {p.name for p in (tmp_path / "out" / "sessions").iterdir()} == {recent.name, "notes"}


# ------------------------------------------------------------------------------------------ store


def test_store_keeps_names_and_paths_inside(tmp_path):
    store = SubjectStore(tmp_path)
    for bad in ("../escape", "a/b", "", ".hidden", "x" * 49):
        with pytest.raises(InputError, match="cannot be used"):
            store.create(bad)
    store.create("star")
    with pytest.raises(InputError, match="already exists"):
        store.create("star")
    with pytest.raises(InputError, match="outside"):
        store.save(SavedSubject("star", "lora", "sks", "star", "tiny", "../../etc/passwd"))
    with pytest.raises(InputError, match="no saved subject named 'moon'"):
        store.load("moon")
    with pytest.raises(InputError, match="session id"):
        SessionSpace(tmp_path, "../../other")
    space = SessionSpace(tmp_path, new_session_id())
    with pytest.raises(InputError, match="outside"):
        space.owns(tmp_path / "elsewhere.png")


def test_subject_parts_refuse_ambiguous_choices(tmp_path):
    from pimg.formats.embeddings import save_embedding

    store = SubjectStore(tmp_path)
    a = SavedSubject("a", "ti", "<sks>", "star", "tiny", "train")
    b = SavedSubject("b", "ti", "<sks>", "dog", "tiny", "train")
    db1 = SavedSubject("db1", "dreambooth", "sks", "star", "tiny", "train")
    db2 = SavedSubject("db2", "dreambooth", "zwx", "dog", "tiny", "train")
    save_embedding(store.folder("a") / "train" / "learned_embeds.safetensors", "<sks>", torch.zeros(1, 8))
    (store.folder("db1") / "train").mkdir(parents=True)
    (store.folder("db1") / "train" / "model_index.json").write_text("{}")
    with pytest.raises(InputError, match="both answer to the token '<sks>'"):
        load_subjects([(a, 1.0), (b, 1.0)], store)
    with pytest.raises(InputError, match="only one can be the base"):
        load_subjects([(db1, 1.0), (db2, 1.0)], store)
    with pytest.raises(InputError, match="has no scale"):
        load_subjects([(db1, 0.5)], store)
    with pytest.raises(InputError, match="between 0 and 2"):
        load_subjects([(a, 3.0)], store)
    with pytest.raises(ModelLoadError, match="weights of subject 'db2' are missing"):
        load_subjects([(db2, 1.0)], store)
    word, whole = load_subjects([(a, 1.0)], store), load_subjects([(db1, 1.0)], store)
    assert subject_parts(whole) == (str(store.folder("db1") / "train"), [])
    assert [p.kind for p in subject_parts(word)[1]] == ["embedding"]
    with pytest.raises(InputError, match="the learned word '<sks>', which the prompt does not contain"):
        check_prompt_tokens("a star on grass", word)
    with pytest.raises(
        InputError, match=r"uses <cat>, which none of the chosen subjects defines \(their tokens: <sks>\)"
    ):
        check_prompt_tokens("a <sks>, and a <cat>", word)
    check_prompt_tokens("a <sks>, on grass", word)
    check_prompt_tokens("a star", whole)  # a DreamBooth or LoRA subject also works without its token
    assert strip_tokens("a <sks> star next to a sks dog", ["<sks>", "sks"]) == "a star next to a dog"


# ------------------------------------------------------------------------------------------ sessions


def test_two_sessions_train_at_once_and_keep_their_own_subjects(tmp_path, random_tiny_dir):
    import torch
    from safetensors.torch import load_file

    backend = DemoBackend(str(random_tiny_dir), tmp_path / "out", "cpu", FAST)
    jobs = {
        "ringed_star_rgb": ("sks", "star", backend.new_session()),
        "banded_circle_poy": ("zwx", "circle", backend.new_session()),
    }
    uploads = {name: toy_uploads(tmp_path / "up" / name, name, n=3) for name in jobs}
    results, errors = {}, []

    def run(name):
        token, noun, session = jobs[name]
        try:
            results[name] = list(backend.personalize(session, uploads[name], "LoRA", token, noun, 2))[
                -1
            ].subject
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(name,)) for name in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    weights = {}
    for name, (token, noun, session) in jobs.items():
        space = backend.space(session)
        subject = results[name]
        assert space.store.names() == [subject.name]  # each session sees only its own subject
        assert (subject.token, subject.class_noun) == (token, noun)
        photos = space.store.photo_paths(subject)
        assert [p.read_bytes() for p in photos] == [Path(u).read_bytes() for u in uploads[name]]
        weights[name] = load_file(
            str(space.store.path(subject, subject.weights) / "pytorch_lora_weights.safetensors")
        )
        generated = backend.generate(
            session,
            BASE_CHOICE,
            [(subject.name, 1.0)],
            f"a {token} {noun}",
            num_inference_steps=2,
            num_images=1,
        )
        assert [Path(p).parent.parent.parent for p in generated.images] == [space.folder]
        assert generated.settings[0]["parts"][0]["path"].startswith(str(space.folder))
    a, b = weights.values()
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)
    (token_a, _, session_a), (_, _, session_b) = jobs.values()
    with pytest.raises(InputError, match="no saved subject named"):
        backend.generate(
            session_b, BASE_CHOICE, [(results["ringed_star_rgb"].name, 1.0)], f"a {token_a} star"
        )


@pytest.mark.parametrize("method, token", [("Textual Inversion", "<sks>"), ("DreamBooth", "sks")])
def test_other_methods_save_subjects_that_generate(tmp_path, random_tiny_dir, method, token):
    backend = DemoBackend(str(random_tiny_dir), tmp_path / "out", "cpu", FAST)
    session = backend.new_session()
    photos = toy_uploads(tmp_path / "up", "ringed_star_rgb", n=2)
    subject = list(backend.personalize(session, photos, method, token, "star", 1, "mine"))[-1].subject
    assert subject.name == "mine" and backend.space(session).store.load("mine") == subject
    if subject.method == "dreambooth":  # a whole model: it is chosen as the base
        generated = backend.generate(session, "mine", [], "a sks star", num_inference_steps=2, num_images=1)
        assert generated.settings[0]["base"].endswith("subjects/mine/train")
    else:
        generated = backend.generate(
            session, BASE_CHOICE, [("mine", 1.0)], "a <sks> star", num_inference_steps=2, num_images=1
        )
        assert generated.settings[0]["parts"][0]["token"] == "<sks>"
    # No guidance given: the one the subject's training recorded, not the base's 7.5.
    assert generated.settings[0]["guidance_scale"] == 2.0
    assert backend.pipeline().parts == {}  # the shared pipeline is left bare for the next person
    with pytest.raises(InputError, match="already exists"):
        list(backend.personalize(session, photos, method, token, "star", 1, "mine"))


def test_id_adapter_makes_a_subject_from_one_photo_without_training(tmp_path):
    backend = DemoBackend("tiny", tmp_path / "out", "cpu")
    assert ("ID adapter (no training)", "ID adapter") in method_labels()
    assert backend.method_defaults("ID adapter") == ("", 0)
    session = backend.new_session()
    photos = toy_uploads(tmp_path / "up", "ringed_star_rgb", n=1)
    updates = list(backend.personalize(session, photos, "ID adapter", "", "star", 0, "instant"))
    subject = updates[-1].subject
    assert subject.method == "id-adapter" and subject.prompt == "a star" and "no training" in subject.label()
    assert Path(updates[-1].samples[0]).is_file()  # images of it at once
    generated = backend.generate(
        session,
        BASE_CHOICE,
        [("instant", 0.8)],
        "a star on a green background",
        num_inference_steps=2,
        num_images=1,
    )
    (part,) = generated.settings[0]["parts"]
    assert part["kind"] == "id_adapter" and part["scale"] == 0.8
    assert backend.pipeline().parts == {}


def test_hypernetwork_predicts_a_subject_without_training(tmp_path):
    backend = DemoBackend("tiny", tmp_path / "out", "cpu")
    assert ("Hypernetwork (no training)", "Hypernetwork") in method_labels()
    session = backend.new_session()
    photos = toy_uploads(tmp_path / "up", "ringed_star_rgb", n=2)
    updates = list(backend.personalize(session, photos, "Hypernetwork", "", "star", 0, "instant"))
    subject = updates[-1].subject
    # the predicted LoRA is bound to the hypernetwork's word, which the saved prompt carries
    assert (
        subject.method == "hypernet" and subject.prompt == "a sks star" and "no training" in subject.label()
    )
    generated = backend.generate(
        session,
        BASE_CHOICE,
        [("instant", 0.8)],
        "a sks star on a green background",
        num_inference_steps=2,
        num_images=1,
    )
    (part,) = generated.settings[0]["parts"]
    assert part["kind"] == "lora" and part["scale"] == 0.8
    assert backend.pipeline().parts == {}


# ------------------------------------------------------------------------------------------ compose


def _save_subject(backend: DemoBackend, session: str, name: str, lora: Path | None = None, **fields):
    """As if `session` had trained subject `name` on the backend's base: a LoRA, with `lora`'s weights."""
    store = backend.space(session).store
    folder = store.create(name)
    if lora is not None:
        shutil.copytree(lora, folder / "train")
    settings = {"method": "lora", "token": "sks", "class_noun": "star", "base": backend.base} | fields
    store.save(SavedSubject(name=name, weights="train", **settings))


def test_compose_places_saved_subjects_in_their_regions(tmp_path, random_tiny_dir, lora_dir):
    import numpy as np

    backend = DemoBackend(str(random_tiny_dir), tmp_path / "out", "cpu")
    session = backend.new_session()
    for name in ("star", "circle"):  # one token for both: routing, not vocabulary, keeps them apart
        _save_subject(backend, session, name, lora_dir)
    # The sketchpad's value: a transparent canvas with paint on its right half.
    layer = np.zeros((32, 32, 4), np.uint8)
    layer[:, 16:] = (31, 111, 235, 255)
    mask = drawn_mask({"background": None, "layers": [layer], "composite": None})
    assert mask.shape == (32, 32) and mask[:, :16].max() == 0 and mask[:, 16:].min() == 1
    result = backend.compose(
        session,
        [
            Placement("star", "left", "a sks star on a blue background"),
            Placement("circle", DRAWN_MASK, mask=mask),
            Placement(None, "top"),  # an empty slot
        ],
        "a sks star at the left and a sks circle at the right on a blue background",
        seed=3,
        num_inference_steps=2,
        num_images=2,
        feather=0.05,
    )
    space = backend.space(session)
    assert len(result.images) == 2 and all(space.owns(p).is_file() for p in result.images)
    assert result.subjects == ["star", "circle"] and result.tokens == ["sks"]
    assert any("resized" in note for note in result.notes)  # the 32 px mask, on a 64 px image
    (part,) = result.settings[0]["parts"]
    assert part["kind"] == "composition"
    regions = [(s["name"], s["region"], s["prompt"]) for s in part["subjects"]]
    assert regions == [
        ("star", "left", "a sks star on a blue background"),
        ("circle", "drawn mask of circle", None),
    ]
    assert [s["seed"] for s in result.settings] == [3, 4] and result.settings[0]["subjects"] == [
        "star",
        "circle",
    ]
    assert backend.pipeline().parts == {}  # the shared pipeline is left bare for the next person


def test_compose_refuses_bad_choices_before_loading_a_model(tmp_path):
    import gradio as gr

    from pimg.fusion.regions import NAMED_REGIONS

    assert set(COMPOSE_REGIONS) <= set(NAMED_REGIONS)
    backend = DemoBackend("tiny", tmp_path / "out", "cpu")
    session = backend.new_session()
    _save_subject(backend, session, "star")
    _save_subject(backend, session, "circle")
    _save_subject(backend, session, "elsewhere", base="stable-diffusion-v1-5/stable-diffusion-v1-5")
    _save_subject(backend, session, "whole", method="dreambooth")
    prompt = "a sks star and a sks circle"
    compose = app.handle_errors(backend.compose)
    with pytest.raises(gr.Error, match="choose 2 to 4 subjects to compose, got 1"):
        compose(session, [Placement("star", "left"), Placement(None, "right")], prompt)
    for placements, message in (
        (
            [Placement("star", "left"), Placement("circle", DRAWN_MASK)],
            "'circle' is placed by a drawn mask, but nothing is drawn",
        ),
        (
            [Placement("star", "left"), Placement("elsewhere", "right")],
            "'elsewhere' was trained on the base 'stable-diffusion",
        ),
        ([Placement("star", "left"), Placement("whole", "right")], "a whole model"),
        ([Placement("star", "left"), Placement("star", "right")], "'star' is chosen twice"),
        (
            [Placement("star", "left"), Placement("circle", "/etc/passwd")],
            "region '/etc/passwd' of subject 'circle': choose one of left",
        ),
        ([Placement("star", "left"), Placement("moon", "right")], "no saved subject named 'moon'"),
        ([Placement(n, "left") for n in ("star", "circle", "elsewhere", "whole", "x")], "got 5"),
    ):
        with pytest.raises(InputError, match=message):
            backend.compose(session, placements, prompt)
    with pytest.raises(ModelLoadError, match="the weights of subject 'star' are missing"):
        backend.compose(session, [Placement("star", "left"), Placement("circle", "right")], prompt)
    with pytest.raises(InputError, match="write a prompt for the whole image"):
        backend.compose(session, [Placement("star", "left"), Placement("circle", "right")], " ")
    assert drawn_mask(None) is None
    assert drawn_mask({"background": None, "layers": [], "composite": None}) is None
    assert backend._pipelines == {}  # every refusal came before any model loaded


# ------------------------------------------------------------------------------------------ browser


def _chromium() -> str:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("playwright is not installed (pip install -e '.[test]'): no browser test")
    path = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).is_file():
        pytest.skip("no Chromium browser found (Debian: apt-get install chromium): no browser test")
    return path


def test_browser_end_to_end(tmp_path, random_tiny_dir, capfd):
    """In headless Chromium: a user error, then upload toy photos, train a LoRA, generate with the guidance
    field left empty, see the gallery, evaluate, close the page (its files go)."""
    chromium = _chromium()
    from playwright.sync_api import expect, sync_playwright

    from pimg.inference.guidance import choose_guidance
    from pimg.inference.pipeline import read_png_settings
    from pimg.models import BUILTIN_MODELS

    # The trained tiny model makes a screenshot worth looking at; the random one tests the same path.
    base = "tiny" if (BUILTIN_MODELS["tiny"].folder / "model_index.json").is_file() else str(random_tiny_dir)
    demo = app.build_demo(base=base, output_dir=tmp_path / "out", device="cpu")
    url = app.serve(demo, port=None, block=False)
    photos = toy_uploads(tmp_path / "up", "ringed_star_rgb", n=4)
    shots = tmp_path / "screens"
    shots.mkdir()
    sessions = tmp_path / "out" / "sessions"
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url)
            page.locator("#photos input[type=file]").set_input_files(photos)
            expect(page.locator("#photos")).to_contain_text("ringed_star_rgb_3", timeout=30_000)
            expect(page.locator("#photos")).not_to_contain_text("Uploading", timeout=30_000)
            page.locator("#train").click()  # no class noun yet: a message on the page, one line in the log
            expect(page.get_by_text("say in a word or two what the subject is").first).to_be_visible(
                timeout=30_000
            )
            page.locator("#class-noun textarea").fill("star")
            page.locator("#steps input").fill("4")
            page.locator("#train").click()
            expect(page.locator("#train-status")).to_contain_text("Saved subject", timeout=180_000)
            expect(page.locator("#samples img").first).to_be_visible()
            page.screenshot(path=shots / "personalize.png", full_page=True)

            page.get_by_role("tab", name="Generate").click()
            expect(page.locator("#guidance textarea, #guidance input").first).to_have_value("")
            page.locator("#subject-0 input").click()
            page.get_by_role("option", name="star_lora_1").click()
            page.locator("#prompt textarea").fill("a sks star on a green background")
            page.locator("#gen-steps input").fill("10")
            page.locator("#generate").click()  # the guidance field left empty
            expect(page.locator("#gallery img")).to_have_count(4, timeout=120_000)
            page.screenshot(path=shots / "generate.png", full_page=True)

            page.get_by_role("tab", name="Evaluate").click()
            page.locator("#evaluate").click()
            expect(page.locator("#scores")).to_contain_text("mean", timeout=120_000)
            expect(page.locator("#scores")).to_contain_text("toy-fidelity")
            expect(page.locator("#eval-notes")).to_contain_text(
                "CLIP-T prompt: 'a star on a green background'"
            )
            page.wait_for_timeout(500)  # let the plot draw
            page.screenshot(path=shots / "evaluate.png", full_page=True)

            # The same run, as the library saw it: one subject, four images, in this session's folder only.
            (session,) = sessions.iterdir()
            assert [p.name for p in (session / "subjects").iterdir()] == ["star_lora_1"]
            images = sorted((session / "images").glob("*/*.png"))
            assert len(images) == 4
            # No guidance given: the subject's recorded one (else the base's), never the field's old 0.
            expected, source = choose_guidance(base, [session / "subjects" / "star_lora_1" / "train"])
            assert source.startswith("recorded by") and expected > 0
            assert {read_png_settings(path)["guidance_scale"] for path in images} == {expected}

            page.close()  # the page goes: its session's folder follows (Gradio's unload)
            for _ in range(60):
                if not session.exists():
                    break
                time.sleep(0.5)
            assert not session.exists()
            browser.close()
    finally:
        demo.close()
    log = capfd.readouterr().err
    assert "pimg: on_train: class noun '': say in a word or two what the subject is" in log
    assert "Traceback" not in log
    copies = REPO / "out"
    copies.mkdir(exist_ok=True)
    for name in ("personalize", "generate", "evaluate"):
        shutil.copyfile(shots / f"{name}.png", copies / f"app_screenshot_{name}.png")
    shutil.copyfile(shots / "generate.png", copies / "app_screenshot.png")


def test_browser_compose(tmp_path, random_tiny_dir, capfd):
    """In headless Chromium: train two subjects, place them left and right in the Compose tab, see the
    images in the gallery; then paint the second one's region on the canvas instead."""
    chromium = _chromium()
    from playwright.sync_api import expect, sync_playwright

    from pimg.inference.pipeline import read_png_settings
    from pimg.models import BUILTIN_MODELS

    base = "tiny" if (BUILTIN_MODELS["tiny"].folder / "model_index.json").is_file() else str(random_tiny_dir)
    demo = app.build_demo(base=base, output_dir=tmp_path / "out", device="cpu", train_settings=FAST)
    url = app.serve(demo, port=None, block=False)
    subjects = {"star": "ringed_star_rgb", "circle": "banded_circle_poy"}
    shot = tmp_path / "compose.png"
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url)
            for noun, toy in subjects.items():
                if page.locator("#photos").get_by_label("Clear").count():
                    page.locator("#photos").get_by_label("Clear").click()  # the last subject's photos
                photos = toy_uploads(tmp_path / "up" / noun, toy, n=4)
                page.locator("#photos input[type=file]").set_input_files(photos)
                expect(page.locator("#photos")).to_contain_text(f"{toy}_3", timeout=30_000)
                expect(page.locator("#photos")).not_to_contain_text("Uploading", timeout=30_000)
                page.locator("#class-noun textarea").fill(noun)
                page.locator("#steps input").fill("4")
                page.locator("#train").click()
                expect(page.locator("#train-status")).to_contain_text(
                    f"Saved subject {noun}_lora_1", timeout=180_000
                )

            page.get_by_role("tab", name="Compose").click()
            for i, (noun, region) in enumerate([("star", "left"), ("circle", "right")]):
                page.locator(f"#compose-subject-{i} input").click()
                page.get_by_role("option", name=f"{noun}_lora_1").click()
                page.locator(f"#compose-region-{i} input").click()
                page.get_by_role("option", name=region, exact=True).click()
            expect(page.locator("#compose-mask-1")).to_be_hidden()
            page.locator("#compose-prompt textarea").fill(
                "a sks star at the left and a sks circle at the right on a blue background"
            )
            page.locator("#compose-steps input").fill("10")
            page.locator("#compose").click()
            expect(page.locator("#compose-gallery img")).to_have_count(4, timeout=120_000)
            expect(page.locator("#compose-status")).to_contain_text(
                "Composed star_lora_1 (left), circle_lora_1 (right)."
            )
            page.screenshot(path=shot, full_page=True)

            # The second subject placed by a painted region: a stroke down the right half of the canvas.
            page.locator("#compose-region-1 input").click()
            page.get_by_role("option", name=DRAWN_MASK).click()
            canvas = page.locator("#compose-mask-1")
            expect(canvas).to_be_visible()
            canvas.get_by_label("Brush").click()
            # The canvas element spans the whole box; the square being painted sits at its centre.
            box = canvas.locator("canvas").first.bounding_box()
            x, y = box["x"] + box["width"] / 2 + 60, box["y"] + box["height"] / 2
            page.mouse.move(x, y - 100)
            page.mouse.down()
            page.mouse.move(x, y + 100, steps=10)
            page.mouse.up()
            page.locator("#compose").click()
            expect(page.locator("#compose-status")).to_contain_text(
                "circle_lora_1 (draw mask)", timeout=120_000
            )
            expect(page.locator("#compose-status")).to_contain_text("resized to the image's")

            (session,) = (tmp_path / "out" / "sessions").iterdir()
            first, second = sorted((session / "images").iterdir())
            images = sorted(first.glob("*.png"))
            assert len(images) == 4
            (part,) = read_png_settings(images[0])["parts"]
            assert [(s["name"], s["region"]) for s in part["subjects"]] == [
                ("star_lora_1", "left"),
                ("circle_lora_1", "right"),
            ]
            (part,) = read_png_settings(sorted(second.glob("*.png"))[0])["parts"]
            assert part["subjects"][1]["region"] == "drawn mask of circle_lora_1"
            browser.close()
    finally:
        demo.close()
    assert "Traceback" not in capfd.readouterr().err
    copies = REPO / "out"
    copies.mkdir(exist_ok=True)
    shutil.copyfile(shot, copies / "app_screenshot_compose.png")
