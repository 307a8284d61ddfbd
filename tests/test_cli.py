"""The `pimg` command line: outputs, reproducibility, and errors without tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field

import pytest

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
