"""Non-finite input is refused where it enters: flags before any model loads, weight files when read.

`--guidance inf` drew an all-black PNG, `--guidance nan` an unguided one, and a LoRA or embedding file
holding NaN a black image, all with exit 0. Each case here must end in one `pimg: error:` line (exit
2, no traceback) or a `ModelLoadError` naming the first bad tensor. A NaN loss during training is
covered by `tests/test_trainers.py::test_nan_loss_raises_and_keeps_a_checkpoint`.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from pimg.errors import ModelLoadError
from pimg.formats.embeddings import read_embedding_file, read_embedding_vectors, save_embedding
from pimg.formats.lora import DIFFUSERS_LORA_FILENAME, load_lora_state_dict, prepare_lora_state_dict
from pimg.formats.safetensors_io import read_safetensors
from pimg.frontends.cli import main


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


def assert_one_error_line(err: str, *parts: str) -> None:
    """The error is the last line of stderr, and the only one (above it: model-loading progress bars)."""
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("pimg: error: "), err
    assert err.rstrip().endswith(errors[0]) and "Traceback" not in err
    for part in parts:
        assert part in errors[0], (part, errors[0])


# ------------------------------------------------------------------------------------------ flags


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-5"])
def test_guidance_must_be_finite_and_not_negative(value, capsys, tmp_path):
    code, err = run_cli(
        ["generate", "--prompt", "a red star", f"--guidance={value}", "--out", str(tmp_path)], capsys
    )
    assert code == 2
    assert_one_error_line(err, "--guidance must be a finite number >= 0", f"got {float(value)!r}")
    assert not list(tmp_path.iterdir())  # refused before any image or model


@pytest.mark.parametrize("scale", ["nan", "inf", "-inf"])
def test_lora_scale_must_be_finite(scale, lora_dir, capsys, tmp_path):
    code, err = run_cli(
        ["generate", "--prompt", "a red star", "--lora", f"{lora_dir}:{scale}", "--out", str(tmp_path)],
        capsys,
    )
    assert code == 2
    assert_one_error_line(err, f"--lora {lora_dir}:", "the scale must be a finite number")


def test_zero_steps_fail_before_loading(capsys, tmp_path):
    code, err = run_cli(
        ["generate", "--prompt", "a red star", "--steps", "0", "--out", str(tmp_path)], capsys
    )
    assert code == 2
    assert_one_error_line(err, "--steps must be >= 1, got 0")


# ------------------------------------------------------------------------------------------ LoRA files


@pytest.fixture
def components(random_tiny_dir):
    from pimg.models import load_base

    pipe = load_base(str(random_tiny_dir))
    return {"unet": pipe.unet, "text_encoder": pipe.text_encoder}


@pytest.fixture
def lora_state(lora_dir) -> dict[str, torch.Tensor]:
    return read_safetensors(lora_dir / DIFFUSERS_LORA_FILENAME)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_lora_file_with_non_finite_weights_names_the_tensor(tmp_path, lora_state, components, bad):
    key = sorted(k for k in lora_state if "lora_B" in k)[3]
    lora_state[key].view(-1)[:2] = bad
    path = tmp_path / "diverged.safetensors"
    save_file(lora_state, path)
    kind = "NaN" if bad != bad else "Inf"
    with pytest.raises(
        ModelLoadError, match=rf"diverged\.safetensors' holds {kind} in tensor '{key}' \(2 of"
    ):
        load_lora_state_dict(path, components)
    # The in-memory road (a hypernetwork's prediction) is checked the same way.
    with pytest.raises(ModelLoadError, match=rf"LoRA 'predicted' holds {kind} in tensor '{key}'"):
        prepare_lora_state_dict(lora_state, components, what="LoRA 'predicted'")


def test_kohya_file_with_nan_alpha_is_refused(tmp_path, lora_dir, components):
    kohya = read_safetensors(lora_dir / "lora_kohya.safetensors")
    key = sorted(k for k in kohya if k.endswith(".alpha"))[0]
    kohya[key] = torch.tensor(float("nan"))
    save_file(kohya, tmp_path / "kohya.safetensors")
    with pytest.raises(ModelLoadError, match=rf"holds NaN in tensor '{key}' \(1 of 1 values"):
        load_lora_state_dict(tmp_path / "kohya.safetensors", components)


def test_generate_with_a_nan_lora_is_one_line(tmp_path, lora_state, random_tiny_dir, capsys):
    key = next(iter(lora_state))
    lora_state[key].fill_(float("nan"))
    save_file(lora_state, tmp_path / "nan.safetensors")
    argv = ["generate", "--base", str(random_tiny_dir), "--prompt", "a red star", "--steps", "1"]
    code, err = run_cli(
        [*argv, "--lora", str(tmp_path / "nan.safetensors"), "--out", str(tmp_path / "o")], capsys
    )
    assert code == 2
    assert_one_error_line(err, "nan.safetensors' holds NaN in tensor", key)
    assert not list((tmp_path / "o").glob("*.png"))


# ------------------------------------------------------------------------------------------ embeddings


def test_embedding_file_with_nan_names_the_tensor(tmp_path):
    vectors = torch.randn(2, 32)
    vectors[1, 5] = float("nan")
    path = save_embedding(tmp_path / "run", "<cat>", vectors)
    with pytest.raises(
        ModelLoadError,
        match=r"embedding file '.*learned_embeds\.safetensors' holds NaN in tensor '<cat>' \(1 of 64",
    ):
        read_embedding_file(path)
    with pytest.raises(ModelLoadError, match="holds NaN in tensor '<cat>'"):
        read_embedding_vectors(path)


def test_a1111_and_sdxl_embeddings_with_inf_name_the_nested_tensor(tmp_path):
    a1111 = tmp_path / "style.pt"
    torch.save({"string_to_param": {"*": torch.full((1, 32), float("inf"))}, "name": "style"}, a1111)
    with pytest.raises(ModelLoadError, match=r"holds Inf in tensor 'string_to_param\.\*'"):
        read_embedding_file(a1111)
    sdxl = tmp_path / "sdxl.safetensors"
    save_file({"clip_l": torch.zeros(1, 32), "clip_g": torch.full((1, 64), float("-inf"))}, sdxl)
    with pytest.raises(ModelLoadError, match="holds Inf in tensor 'clip_g'"):
        read_embedding_vectors(sdxl)


def test_generate_with_a_nan_embedding_is_one_line(tmp_path, random_tiny_dir, capsys):
    path = save_embedding(tmp_path / "emb", "<cat>", torch.full((1, 32), float("nan")))
    argv = ["generate", "--base", str(random_tiny_dir), "--prompt", "a <cat>", "--steps", "1"]
    code, err = run_cli([*argv, "--embedding", str(path), "--out", str(tmp_path / "o")], capsys)
    assert code == 2
    assert_one_error_line(err, "holds NaN in tensor '<cat>'")
