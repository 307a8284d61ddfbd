"""The `pimg` command line: outputs, reproducibility, and errors without tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field

import pytest
from PIL import Image

from pimg.config import load_config
from pimg.errors import InputError
from pimg.frontends.cli import main


def _generate(base, out, *extra):
    return main(
        [
            "generate",
            "--base",
            str(base),
            "--prompt",
            "a red star on a blue background",
            "--num-images",
            "2",
            "--seed",
            "0",
            "--steps",
            "3",
            "--device",
            "cpu",
            "--out",
            str(out),
            *extra,
        ]
    )


def test_generate_writes_pngs_and_settings_and_is_byte_identical(random_tiny_dir, tmp_path):
    assert _generate(random_tiny_dir, tmp_path / "a") == 0
    assert _generate(random_tiny_dir, tmp_path / "b") == 0
    pngs = sorted(p.name for p in (tmp_path / "a").glob("*.png"))
    assert pngs == ["000_00_seed0.png", "000_01_seed1.png"]
    for name in pngs:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    settings = json.loads((tmp_path / "a" / "settings.json").read_text())
    assert settings["request"]["num_images"] == 2 and len(settings["images"]) == 2
    assert settings["images"][1]["seed"] == 1


def test_prompt_file_adds_prompts(random_tiny_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a green heart on a white background\n\n a small blue circle on a red background \n")
    code = main(
        [
            "generate",
            "--base",
            str(random_tiny_dir),
            "--prompt-file",
            str(prompts),
            "--steps",
            "2",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert code == 0
    assert len(list((tmp_path / "o").glob("*.png"))) == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["--base", "no such model"], "unknown base model"),
        (["--height", "60"], "multiple of 8"),
        (["--lora", "/nonexistent/lora.safetensors"], "lora.safetensors"),
        (["--prompt", ""], "empty --prompt"),
    ],
)
def test_bad_input_is_one_clear_line_without_traceback(args, message, tmp_path, random_tiny_dir):
    if "--base" not in args:
        args = ["--base", str(random_tiny_dir), *args]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pimg.frontends.cli",
            "generate",
            "--prompt",
            "a red star",
            "--steps",
            "1",
            "--device",
            "cpu",
            "--out",
            str(tmp_path),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "pimg: error:" in result.stderr and message in result.stderr


def test_models_and_env(capsys):
    assert main(["models"]) == 0
    assert "tiny" in capsys.readouterr().out
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "diffusers" in out


@dataclass
class _Inner:
    steps: int = 1


@dataclass
class _Outer:
    name: str = "x"
    inner: _Inner = field(default_factory=_Inner)


def test_config_yaml_overrides_and_unknown_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("inner:\n  steps: 5\n")
    assert load_config(_Outer, path, {"name": "y"}) == _Outer("y", _Inner(5))
    assert load_config(_Outer, path, {"inner.steps": "7"}).inner.steps == 7
    path.write_text("inner:\n  stpes: 5\n")
    with pytest.raises(InputError, match="unknown key 'stpes'.*Did you mean 'steps'"):
        load_config(_Outer, path)


def _help_options():
    """(command, option action) for every option of every `pimg` command."""
    import argparse

    from pimg.frontends.cli import build_parser

    def walk(parser, path):
        yield path, parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    yield from walk(child, f"{path} {name}")

    for path, parser in walk(build_parser(), "pimg"):
        parser.format_help()  # every help text renders (a stray % would raise here)
        for action in parser._actions:
            if action.option_strings and not isinstance(action, argparse._HelpAction):
                yield path, action


def test_every_flag_has_help_and_shows_its_default():
    options = list(_help_options())
    assert len(options) > 100
    for path, action in options:
        where = f"{path} {action.option_strings[0]}"
        assert action.help, f"{where} has no help text"
        if action.default not in (None, False) and not action.required:
            assert "default" in action.help, f"{where} does not say its default ({action.default!r})"
    flags = {(path, a.option_strings[0]): a.help for path, a in options}
    assert "(default: %(default)s)" in flags[("pimg generate", "--seed")]
    assert "-1 draws one" in flags[("pimg train lora", "--seed")]
    assert "default" in flags[("pimg eval toybase", "--base")]


def test_train_flags_land_in_the_config_and_seed_minus_one_is_drawn(random_tiny_dir, tmp_path, capsys):
    from pimg.photos import save_photos
    from pimg.toyworld.subjects import EVAL_SUBJECTS

    photos = save_photos(tmp_path / "photos", EVAL_SUBJECTS["ringed_star_rgb"].photos(2, seed=0), None)
    out = tmp_path / "run"
    args = ["train", "lora", "--base", str(random_tiny_dir), "--photos", str(photos), "--class-noun", "star"]
    flags = ["--steps", "2", "--checkpoint-every", "1", "--sample-every", "2", "--seed", "-1"]
    assert main([*args, *flags, "--out", str(out), "--set", "sample_images=0"]) == 0

    saved = json.loads((out / "config.json").read_text())["loop"]
    assert (saved["checkpoint_every"], saved["sample_every"]) == (1, 2)
    assert 0 <= saved["seed"] < 2**31
    assert f"--seed -1 drew seed {saved['seed']}" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000001", "step_0000002"]


def test_generate_seed_minus_one_is_drawn_and_recorded(random_tiny_dir, tmp_path, capsys):
    from pimg.inference.pipeline import read_png_settings

    out = tmp_path / "o"
    assert _generate(random_tiny_dir, out, "--seed", "-1", "--steps", "1") == 0

    seed = json.loads((out / "settings.json").read_text())["request"]["seed"]
    assert 0 <= seed < 2**31
    assert f"--seed -1 drew seed {seed}" in capsys.readouterr().out
    png = out / f"000_01_seed{seed + 1}.png"
    assert read_png_settings(png)["seed"] == seed + 1
    with Image.open(png) as image:
        assert f"Seed: {seed + 1}," in image.text["parameters"]


@pytest.mark.parametrize(
    "given, message",
    [
        (["--set", "loop.steps=abc"], "--set loop.steps=abc: loop.steps must be int, got 'abc'."),
        (
            ["--set", "loop.stpes=3"],
            "--set loop.stpes=3: unknown key 'stpes' in loop. Did you mean 'loop.steps'",
        ),
        (["--set", "rank.x=3"], "--set rank.x=3: rank is one setting"),
        (["--steps", "0"], "--steps 0: steps must be >= 1, got 0."),
        (["--resolution", "60"], "--resolution 60: resolution must be a multiple of 8"),
        (["--set", "batch_size=0", "--batch-size", "2"], "--set batch_size=0: batch_size must be >= 1"),
    ],
)
def test_bad_command_line_values_name_the_key_and_the_flag(given, message, tmp_path, capsys):
    args = ["train", "lora", "--photos", str(tmp_path), "--class-noun", "star", "--out", str(tmp_path / "o")]
    assert main([*args, *given]) == 2
    err = capsys.readouterr().err
    assert message in err and ".yaml" not in err.split(message)[0]
    assert not (tmp_path / "o").exists()


def test_a_bad_yaml_value_is_blamed_on_the_file_and_a_bad_override_on_the_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("inner:\n  steps: many\n")
    with pytest.raises(InputError, match=r"c\.yaml\.inner\.steps must be int"):
        load_config(_Outer, path, {"name": "y"}, {"name": "--name y"})
    path.write_text("inner:\n  steps: 5\n")
    with pytest.raises(InputError, match=r"^--steps many: inner\.steps must be int, got 'many'\.$"):
        load_config(_Outer, path, {"inner.steps": "many"}, {"inner.steps": "--steps many"})
    with pytest.raises(InputError, match=r"^the override inner\.steps='many': inner\.steps must be int"):
        load_config(_Outer, path, {"inner.steps": "many"})


def test_eval_toysubject_names_a_bad_set_before_training(tmp_path, capsys):
    args = ["eval", "toysubject", "--method", "pivotal", "--out", str(tmp_path / "o")]
    assert main([*args, "--set", "rank=x"]) == 2
    assert "--set rank=x: rank must be int, got 'x'." in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_random_seed_is_refused_under_several_processes(monkeypatch):
    from pimg.config import resolve_seed

    assert resolve_seed(5) == 5 and 0 <= resolve_seed(-1) < 2**31
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun / accelerate launch set it
    assert resolve_seed(5) == 5
    with pytest.raises(InputError, match="--seed -1 cannot be used under a launcher"):
        resolve_seed(-1)
