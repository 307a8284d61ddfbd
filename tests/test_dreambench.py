"""The DreamBench protocol end to end on the toy world: dataset file, bench generate, eval, real-vs-real.

A 2-subject fake dataset in the DreamBench layout (toy subjects as the "photos"), one subject with a
LoRA and one with a Textual Inversion embedding, generated with the random tiny model.
"""

from __future__ import annotations

import csv
import json

import pytest
import torch
from PIL import Image

from pimg.frontends.cli import main
from pimg.metrics.dreambench import index_generated, read_dreambench
from pimg.toyworld.subjects import EVAL_SUBJECTS

STAR, CIRCLE = list(EVAL_SUBJECTS.values())[:2]
PLACES = [
    "in the snow",
    "on the beach",
    "on a red background",
    "with a city in the background",
    "floating on water",
]


def _write_dataset(root, subjects: dict[str, tuple[str, str]]) -> None:
    """prompts_and_classes.txt in the DreamBooth file's own form, 25 prompts per list."""
    objects = [f"a {{0}} {{1}} {place}" for place in PLACES] * 5
    live = [f"a {{0}} {{1}} {place} wearing a hat" for place in PLACES] * 5
    lines = ["Classes", "", "subject_name,class"]
    lines += [f"{name},{cls}" + (f",{token}" if token else "") for name, (cls, token) in subjects.items()]
    lines += ["", "Prompts", "", "Object Prompts", "", "prompt_list = ["]
    lines += [f"'{p}'.format(unique_token, class_token)," for p in objects]
    lines += ["]", "", "Live Subject Prompts", "", "prompt_list = ["]
    lines += [f"'{p}'.format(unique_token, class_token)," for p in live]
    (root / "prompts_and_classes.txt").write_text("\n".join(lines + ["]"]) + "\n")


@pytest.fixture(scope="module")
def fake_bench(tmp_path_factory, random_tiny_dir):
    """(dataset folder, subject-weights folder): ringed star with a LoRA, banded circle with an embedding."""
    from peft import LoraConfig

    from pimg.formats.embeddings import save_embedding
    from pimg.formats.lora import lora_state_dict_from_peft, save_lora
    from pimg.models import load_base

    root = tmp_path_factory.mktemp("bench")
    dataset, weights = root / "dataset", root / "weights"
    for subject in (STAR, CIRCLE):
        (dataset / subject.name).mkdir(parents=True)
        for i, photo in enumerate(subject.photos(n=4, seed=5)):
            Image.fromarray(photo).save(dataset / subject.name / f"{i:02d}.png")
    _write_dataset(dataset, {STAR.name: ("star", "sks"), CIRCLE.name: ("circle", None)})
    pipe = load_base(str(random_tiny_dir))
    torch.manual_seed(0)
    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"]))
    save_lora(weights / STAR.name, lora_state_dict_from_peft(pipe.unet, "unet"))
    dim = pipe.text_encoder.config.hidden_size
    save_embedding(weights / CIRCLE.name / "learned_embeds.safetensors", "zwq", torch.randn(1, dim) * 0.01)
    return dataset, weights


def _bench_generate(random_tiny_dir, fake_bench, out):
    dataset, weights = fake_bench
    args = [
        "bench",
        "generate",
        "--dataset",
        str(dataset),
        "--subject-weights",
        str(weights),
        "--out",
        str(out),
    ]
    args += ["--base", str(random_tiny_dir), "--prompts", "0,1", "--images-per-prompt", "2", "--steps", "2"]
    assert main(args + ["--device", "cpu"]) == 0
    return json.loads((out / "bench.json").read_text())


@pytest.mark.shared
def test_reads_the_shared_dreambench_file(shared_dir):
    bench = read_dreambench(shared_dir / "dreambench")
    assert len(bench.subjects) == 30 and len(bench.object_prompts) == len(bench.live_prompts) == 25
    live = sorted(s.name for s in bench.subjects.values() if s.live)
    assert live == ["cat", "cat2", "dog", "dog2", "dog3", "dog5", "dog6", "dog7", "dog8"]
    dog, can = bench.subjects["dog6"], bench.subjects["can"]
    assert bench.prompt(dog, 10) == "a sks dog wearing a red hat"
    assert bench.prompt(can, 10, token=None) == "a can with a wheat field in the background"
    assert bench.prompt(bench.subjects["bear_plushie"], 0) == "a sks stuffed animal in the jungle"
    assert len(can.references) == 6 and not any(s.face for s in bench.subjects.values())


def test_bench_generate_writes_the_layout_and_resumes(random_tiny_dir, fake_bench, tmp_path):
    out = tmp_path / "generated"
    summary = _bench_generate(random_tiny_dir, fake_bench, out)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert files == [f"{s.name}/{p:02d}_{k}.png" for s in (CIRCLE, STAR) for p in (0, 1) for k in (0, 1)]
    assert summary["written"] == 8
    # The LoRA subject takes the dataset's token; the embedding subject its embedding's own token.
    assert summary["subjects"][STAR.name]["token"] == "sks"
    assert summary["subjects"][CIRCLE.name]["token"] == "zwq"
    assert [p["kind"] for p in summary["subjects"][CIRCLE.name]["parts"]] == ["embedding"]
    (out / STAR.name / "01_1.png").unlink()
    again = _bench_generate(random_tiny_dir, fake_bench, out)
    assert again["written"] == 1 and (out / STAR.name / "01_1.png").is_file()


def test_eval_dreambench_reports_scores_and_problems(random_tiny_dir, random_dino_dir, fake_bench, tmp_path):
    dataset, _ = fake_bench
    generated = tmp_path / "generated"
    for subject in (STAR, CIRCLE):
        (generated / subject.name).mkdir(parents=True)
        for p in range(2):
            for k, photo in enumerate(subject.photos(n=2, seed=10 + p)):
                Image.fromarray(photo).save(generated / subject.name / f"{p:02d}_{k}.png")
    (generated / STAR.name / "01_1.png").write_bytes(b"not a png")  # unreadable
    (generated / STAR.name / "notes.txt").write_text("x")  # extra
    (generated / CIRCLE.name / "30_0.png").write_bytes(b"")  # extra: prompt index out of range
    out = tmp_path / "report"
    args = ["eval", "dreambench", "--dataset", str(dataset), "--generated", str(generated), "--out", str(out)]
    args += ["--metrics", "dino,clip-i,clip-t,toy-fidelity", "--dino-model", str(random_dino_dir)]
    args += ["--clip-backend", "toy", "--clip-model", str(random_tiny_dir)]
    assert main(args + ["--images-per-prompt", "2", "--keep-token", "--device", "cpu"]) == 0

    assert {p.name for p in out.iterdir()} >= {
        "report.json",
        "report.md",
        "per_image.csv",
        "per_subject.csv",
        "per_subject.png",
    }
    report = json.loads((out / "report.json").read_text())
    assert report["counts"] == {
        "subjects": 2,
        "expected_images": 100,
        "scored_images": 7,
        "missing": 92,
        "extra": 2,
        "unreadable": 1,
    }
    assert report["problems"]["unreadable"][0]["file"].endswith("01_1.png")
    assert {e["reason"].split(" ")[0] for e in report["problems"]["extra"]} == {"name", "prompt"}
    assert report["protocol"]["config"]["clip_t_token"] == "keep"
    assert report["protocol"]["backbones"]["clip-i"]["backend"] == "toy"
    assert report["protocol"]["backbones"]["dino"]["preprocess"]["resize"] == 256
    # Subject photos against their own subject: the exact toy fidelity is high.
    assert report["per_subject"][STAR.name]["toy-fidelity"] > 0.85
    assert report["overall"]["n_images"] == 7 and -1 <= report["overall"]["clip-t"] <= 1
    with (out / "per_image.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 7 and rows[0]["clip_t_prompt"].startswith("a sks star")
    assert "| subject | class | group | n |" in (out / "report.md").read_text()
    assert Image.open(out / "per_subject.png").size[0] > 400


def test_report_bar_chart_is_drawn_with_matplotlib_and_skipped_without(tmp_path, monkeypatch, capsys):
    import sys

    from pimg.metrics.report import bar_chart

    per_subject = {STAR.name: {"dino": 0.7, "clip-i": None}, CIRCLE.name: {"dino": 1.3, "clip-i": 0.2}}
    path = tmp_path / "per_subject.png"
    assert bar_chart(per_subject, ["dino", "clip-i"], path) == path
    assert Image.open(path).size[0] > 400
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)  # as if not installed
    assert bar_chart(per_subject, ["dino", "clip-i"], path) is None
    assert not path.exists(), "the earlier run's chart would not match this report"
    message = capsys.readouterr().out
    assert message.count("\n") == 1 and "pip install 'pimg[plot]'" in message


def test_manifest_layout_and_bad_lines(fake_bench, tmp_path):
    dataset, _ = fake_bench
    bench = read_dreambench(dataset)
    image = tmp_path / "a.png"
    Image.fromarray(STAR.photos(n=1)[0]).save(image)
    lines = [
        {"subject": STAR.name, "prompt_index": 3, "file": "a.png"},
        {"subject": STAR.name, "prompt_index": 3, "file": "a.png"},  # k counts up: slot 1
        {"subject": "nobody", "prompt_index": 0, "file": "a.png"},
    ]
    text = "\n".join(json.dumps(line) for line in lines) + "\n{not json\n"
    (tmp_path / "manifest.jsonl").write_text(text)
    index = index_generated(tmp_path, bench, [STAR.name], images_per_prompt=2)
    assert set(index.found) == {(STAR.name, 3, 0), (STAR.name, 3, 1)}
    assert len(index.missing) == 48
    reasons = sorted(e["reason"].split(" (")[0] for e in index.extra)
    assert reasons == ["bad manifest line", "unknown subject 'nobody'"]


def test_real_vs_real_retrieves_toy_subjects(fake_bench):
    from pimg.metrics.real_vs_real import run_real_vs_real

    report = run_real_vs_real(str(fake_bench[0]), "toy-fidelity")
    assert report["n_subjects"] == 2 and report["subject_top1"] == 1.0 and report["gap"] > 0.3


@pytest.mark.shared
def test_face_subjects_get_identity_and_a_no_face_rate(shared_dir, tmp_path):
    pytest.importorskip("dlib", reason="dlib is not installed: pip install 'pimg[face-dlib]'")
    photos = sorted((shared_dir / "faces" / "person_a").glob("*.jpg"))
    dataset, generated = tmp_path / "dataset", tmp_path / "generated"
    (dataset / "person_a").mkdir(parents=True)
    (generated / "person_a").mkdir(parents=True)
    for i, photo in enumerate(photos[:3]):
        Image.open(photo).save(dataset / "person_a" / f"{i:02d}.jpg")
    _write_dataset(dataset, {"person_a": ("person", None)})
    Image.open(photos[3]).save(generated / "person_a" / "00_0.png")
    Image.fromarray(STAR.photos(n=1)[0]).save(generated / "person_a" / "00_1.png")  # no face
    out = tmp_path / "report"
    args = ["eval", "dreambench", "--dataset", str(dataset), "--generated", str(generated), "--out", str(out)]
    assert (
        main(args + ["--metrics", "face-id,toy-fidelity", "--face-backend", "dlib", "--device", "cpu"]) == 0
    )
    report = json.loads((out / "report.json").read_text())
    subject = report["per_subject"]["person_a"]
    assert subject["group"] == "live" and subject["n_images"] == 2
    assert subject["face-id"] > 0.9 and subject["face-id_no_face_rate"] == 0.5
    assert report["protocol"]["backbones"]["face-id"]["backend"] == "dlib"
