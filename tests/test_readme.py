"""The README's `pimg ...` commands run as written on `tiny`, in a fresh folder.

Every command of the README's bash blocks is parsed by the real parser (so a renamed or missing flag
fails here); the ones that run on `tiny` in seconds then run through `pimg.frontends.cli.main`.
Only speed flags are appended, and argparse takes the last of a repeated flag, so every flag as written
is still parsed and used: one denoising step for generation, one fine-tune step for a prediction, one training step and a one-image,
one-step sample grid for training (DreamBooth: one class image). The commands that need data,
weights or hours are skipped with the reason in `SKIPPED`.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from pimg.frontends.cli import build_parser, main

README = Path(__file__).resolve().parents[1] / "README.md"

#: (what marks a command, why it does not run here). The first that matches applies.
SKIPPED = (
    (lambda argv: argv[:1] == ["app"], "starts the web demo's server (tests/test_app.py covers the demo)"),
    (
        lambda argv: any("../shared" in a for a in argv),
        "reads ../shared (DreamBench, faces), absent from a fresh clone; tests/test_dreambench.py runs "
        "these commands on a fake DreamBench",
    ),
    (
        lambda argv: any(a.startswith(("/models", "stable-diffusion-v1-5/")) for a in argv),
        "needs Stable Diffusion weights: a download, and a GPU to be quick",
    ),
    (
        lambda argv: argv[:2] == ["toyworld", "train-base"],
        "retrains tiny: hours on 2 cores (tests/test_toy_base_recipe.py checks the recipes)",
    ),
    (
        lambda argv: argv[:2] == ["eval", "toybase"],
        "about 30 s even at 2 prompts x 1 seed x 1 step (fixed VAE and CLIP passes); "
        "tests/test_toyworld_model.py runs it small",
    ),
    (
        lambda argv: argv[:2] == ["eval", "toycompose"],
        "trains 6 subjects' LoRAs and composes 8 groups; tests/test_fusion.py covers its parts",
    ),
    (
        lambda argv: argv[:2] == ["eval", "toysubject"],
        "trains and scores 5 subjects; tests/test_trainers.py::test_eval_toysubject_smoke runs one",
    ),
)


def readme_commands() -> list[list[str]]:
    """The arguments of every `pimg ...` command in the README's bash blocks, in order.

    Continued lines (a trailing backslash) are joined, comments dropped, and `a && b && pimg ...`
    gives its `pimg` part.
    """
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            segment: list[str] = []
            for token in [*shlex.split(line, comments=True), "&&"]:
                if token != "&&":
                    segment.append(token)
                    continue
                if segment[:1] == ["pimg"]:
                    commands.append(segment[1:])
                segment = []
    return commands


def skip_reason(argv: list[str]) -> str | None:
    return next((why for marks, why in SKIPPED if marks(argv)), None)


def fast(argv: list[str]) -> list[str]:
    """`argv` with the speed flags appended (see the module docstring)."""
    if argv[0] in ("generate", "compose"):
        return [*argv, "--steps", "1"]
    if argv[:2] == ["hypernet", "predict"] and "--finetune-steps" in argv:
        return [*argv, "--finetune-steps", "1"]
    if argv[0] == "train" and "--resume" in argv:
        return [*argv, "--steps", "2"]  # one step more than the run it continues
    if argv[0] == "train":
        from pimg.methods import get_method

        method = get_method(argv[1])
        extra = ["--set", "num_class_images=1"] if method.has_setting("num_class_images") else []
        samples = next(k for k in ("sample_images", "sample_subjects") if method.has_setting(k))
        return [*argv, "--steps", "1", "--set", f"{samples}=1", "--set", "num_inference_steps=1", *extra]
    return argv


def _inputs(folder: Path) -> None:
    """What the README assumes the reader has: a folder of subject photos and a prompt file."""
    from pimg.photos import save_photos
    from pimg.toyworld.subjects import EVAL_SUBJECTS

    save_photos(folder / "my_star", EVAL_SUBJECTS["ringed_star_rgb"].photos(4, seed=0), None)
    (folder / "prompts.txt").write_text("a red star on a blue background\na small green heart\n")


COMMANDS = readme_commands()


def test_the_readme_has_the_commands_this_file_expects():
    assert len(COMMANDS) >= 20
    assert any(a[:2] == ["train", "lora"] and "--resume" in a for a in COMMANDS)
    assert any("--embedding" in a for a in COMMANDS)
    runnable = [a for a in COMMANDS if skip_reason(a) is None]
    assert {a[0] for a in runnable} == {"generate", "compose", "models", "env", "train", "hypernet"}


@pytest.mark.parametrize("argv", [a for a in COMMANDS if skip_reason(a)], ids=lambda a: " ".join(a[:3])[:50])
def test_skipped_commands_still_parse(argv):
    if argv[0] != "app":  # the demo parses its own options
        build_parser().parse_args(argv)
    pytest.skip(skip_reason(argv))


def test_readme_commands_run_on_tiny(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _inputs(tmp_path)
    runnable = [a for a in COMMANDS if skip_reason(a) is None]
    # Training first: the generation examples load its results (out/sks, out/ti).
    ordered = [a for a in runnable if a[0] == "train"] + [a for a in runnable if a[0] != "train"]
    for argv in ordered:
        code = main(fast(argv))
        assert code == 0, f"pimg {shlex.join(argv)} exited {code}: {capsys.readouterr().err[-2000:]}"
    assert (tmp_path / "out" / "sks" / "checkpoints" / "step_0000002").is_dir()  # resumed to step 2
    assert len(list((tmp_path / "out" / "demo").glob("*.png"))) == 4
