"""`pimg train --resume`: the run's saved config.json is the config; flags given again must agree with it.

Every run is a LoRA of rank 2 on the random tiny model, a few steps at 64 px (about 2 s each).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pimg.errors import InputError
from pimg.frontends.cli import main
from pimg.photos import save_photos
from pimg.trainers.loop import latest_checkpoint
from pimg.trainers.personalize import RESUMABLE_KEYS, resume_config


@pytest.fixture(scope="module")
def photos_dir(tmp_path_factory) -> Path:
    from pimg.toyworld.subjects import EVAL_SUBJECTS

    subject = EVAL_SUBJECTS["ringed_star_rgb"]
    folder = tmp_path_factory.mktemp("photos")
    return save_photos(folder, subject.photos(3, seed=0), ["a {token} {class_noun} on a blue background"] * 3)


def _train_args(base: Path, photos: Path, out: Path, steps: int) -> list[str]:
    return [
        "train",
        "lora",
        "--base",
        str(base),
        "--photos",
        str(photos),
        "--class-noun",
        "star",
        "--rank",
        "2",
        "--lr",
        "1e-3",
        "--steps",
        str(steps),
        "--checkpoint-every",
        "1",
        "--out",
        str(out),
        "--set",
        "sample_images=1",
        "--set",
        "num_inference_steps=2",
    ]


@pytest.fixture(scope="module")
def two_step_run(random_tiny_dir, photos_dir, tmp_path_factory) -> Path:
    """A finished 2-step run (checkpoints at steps 1 and 2); tests that resume it work on a copy."""
    out = tmp_path_factory.mktemp("run") / "sks"
    assert main(_train_args(random_tiny_dir, photos_dir, out, steps=2)) == 0
    return out


def test_resume_reads_the_saved_config_and_continues(two_step_run, tmp_path, capsys):
    run = shutil.copytree(two_step_run, tmp_path / "moved")  # a moved folder resumes where it is now
    capsys.readouterr()

    assert main(["train", "lora", "--resume", "--out", str(run), "--steps", "4"]) == 0

    out = capsys.readouterr().out
    assert f"settings from {run}/config.json" in out and "at step 2" in out
    saved = json.loads((run / "config.json").read_text())
    assert saved["method"] == "lora" and saved["rank"] == 2 and saved["loop"]["learning_rate"] == 1e-3
    assert saved["loop"]["steps"] == 4 and saved["out_dir"] == str(run)
    assert latest_checkpoint(run).name == "step_0000004"
    # That steps 3 and 4 are then the ones an uninterrupted run takes: test_trainers.py's resume tests.


def test_resume_with_the_whole_command_again_agrees(two_step_run, random_tiny_dir, photos_dir, tmp_path):
    run = shutil.copytree(two_step_run, tmp_path / "again")
    photos = f"{photos_dir}/"  # the same folder written with a slash is no disagreement
    args = _train_args(random_tiny_dir, photos, run, steps=2)
    assert main([*args, "--resume"]) == 0


def test_a_conflicting_flag_is_one_paragraph_naming_key_and_both_values(two_step_run, capsys):
    before = (two_step_run / "config.json").read_text()
    code = main(["train", "lora", "--resume", "--out", str(two_step_run), "--rank", "3", "--lr", "0.5"])

    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("pimg: error: --resume:") and err.count("\n") == 1
    assert "rank is 2 there, 3 from --rank 3" in err
    assert "loop.learning_rate is 0.001 there, 0.5 from --lr 0.5" in err
    assert str(two_step_run / "config.json") in err and "another --out" in err
    assert (two_step_run / "config.json").read_text() == before  # nothing was started


@pytest.mark.parametrize(
    "args, message",
    [
        (["lora", "--resume"], "--resume needs --out"),
        (["ti", "--resume", "--out", "RUN"], "holds a lora run, not a ti one"),
        (["lora", "--resume", "--out", "RUN", "--steps", "1"], "has trained 2 steps already"),
        (["lora", "--resume", "--out", "RUN", "--set", "rank=x"], "--set rank=x: rank must be int"),
        (["lora", "--resume", "--out", "RUN", "--seed", "-1"], "loop.seed is 0 there, -1 from --seed -1"),
        (["lora", "--resume", "--out", "NOWHERE"], "holds no config.json"),
    ],
)
def test_resume_errors(args, message, two_step_run, tmp_path, capsys):
    paths = {"RUN": str(two_step_run), "NOWHERE": str(tmp_path / "nothing")}
    assert main(["train", *[paths.get(a, a) for a in args]]) == 2
    assert message in capsys.readouterr().err


def test_resume_config_keys(two_step_run, tmp_path):
    """Only the length and the bookkeeping may change; a YAML given again is checked, never applied."""
    assert "loop.steps" in RESUMABLE_KEYS and "rank" not in RESUMABLE_KEYS
    config = resume_config(
        "lora",
        two_step_run,
        {"loop.steps": 6, "loop.sample_every": 3, "sample_images": 0, "rank": 2},
        config_path=None,
    )
    assert (config.loop.steps, config.loop.sample_every, config.sample_images, config.rank) == (6, 3, 0, 2)
    yaml = tmp_path / "again.yaml"
    yaml.write_text("rank: 2\nloop:\n  steps: 400\n")
    assert resume_config("lora", two_step_run, {}, config_path=yaml).loop.steps == 2
    yaml.write_text("rank: 16\n")
    with pytest.raises(InputError, match="rank is 2 there, 16 from again.yaml"):
        resume_config("lora", two_step_run, {}, config_path=yaml)
