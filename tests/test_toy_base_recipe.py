"""`configs/toy_base.yaml`, the recipe of the shipped `tiny`: its phases, their order and the checks on a
recipe file. Nothing trains here (`tests/test_toyworld_model.py` runs phases for a few steps)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pimg.errors import InputError, TrainingError
from pimg.trainers.toy_base import ToyBaseConfig, load_recipe, train_phases

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SHIPPED_PHASES = ["scratch", "more", "binding", "objects", "objects_more"]


def test_shipped_recipe_lists_its_phases_in_order_each_continuing_the_one_before():
    phases = load_recipe(CONFIGS / "toy_base.yaml")
    assert [p.name for p in phases] == SHIPPED_PHASES
    first = phases[0].config
    # ToyBaseConfig's defaults are the shipped tiny's first phase.
    assert first == ToyBaseConfig() and first.unet_init is None
    assert first.result_dir() == Path("runs/tiny/decoder/model")
    for before, phase in zip(phases, phases[1:], strict=False):
        assert Path(phase.config.unet_init) == before.config.result_dir(), phase.name
        assert phase.config.stages == ("unet",)
    shipped = phases[-1].config
    assert shipped.result_dir() == Path("runs/tiny-objects-more/unet/model")
    assert (shipped.two_object_prob, shipped.object_loss_weight, shipped.unet.loop.steps) == (0.6, 4.0, 1000)


def test_a_phase_is_a_diff_from_the_one_before_and_flags_reach_every_phase():
    more, binding = load_recipe(CONFIGS / "toy_base.yaml", {"unet.loop.steps": 2})[1:3]
    assert binding.config.unet.loop.learning_rate == more.config.unet.loop.learning_rate == 3e-4
    assert more.config.two_object_prob == 0.3 and binding.config.two_object_prob == 0.6
    assert more.config.unet.loop.steps == binding.config.unet.loop.steps == 2


def test_one_phase_is_picked_by_name_and_an_unknown_name_lists_the_phases():
    (binding,) = load_recipe(CONFIGS / "toy_base.yaml", phase="binding")
    assert binding.name == "binding" and binding.config.out_dir == "runs/tiny-binding"
    with pytest.raises(InputError, match=r"no phase 'bindings'.*Did you mean 'binding'.*scratch, more"):
        load_recipe(CONFIGS / "toy_base.yaml", phase="bindings")


def test_out_is_refused_for_several_phases_but_kept_for_one():
    with pytest.raises(InputError, match=r"out_dir override \(--out\) names one run folder.*--phase NAME"):
        load_recipe(CONFIGS / "toy_base.yaml", {"out_dir": "runs/x"})
    (phase,) = load_recipe(CONFIGS / "toy_base.yaml", {"out_dir": "runs/x"}, phase="more")
    assert phase.config.out_dir == "runs/x"


def test_a_file_without_phases_is_one_run_named_after_the_file():
    (phase,) = load_recipe(CONFIGS / "toy_base_2h.yaml")
    assert phase.name == "toy_base_2h" and phase.config.out_dir == "runs/tiny-2h"
    assert [p.name for p in load_recipe()] == ["defaults"]


@pytest.mark.parametrize(
    "phase, message",
    [
        (
            "    two_object_pro: 0.6\n",
            r"unknown key 'two_object_pro' in r.yaml phases\[b\]\. Did you mean 'two_object_prob'",
        ),
        (
            "    unet:\n      loop:\n        stepz: 3\n",
            r"'stepz' in r.yaml phases\[b\]\.unet\.loop\. Did you mean 'steps'",
        ),
    ],
)
def test_an_unknown_key_in_a_phase_names_the_phase_and_the_nearest_valid_key(tmp_path, phase, message):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"phases:\n  - name: a\n    out_dir: {tmp_path / 'a'}\n  - name: b\n    out_dir: x\n{phase}"
    )
    with pytest.raises(InputError, match=message):
        load_recipe(recipe)


@pytest.mark.parametrize(
    "phases, message",
    [
        ("  - out_dir: a\n", r"phases\[0\] must be a mapping with a name"),
        ("  - name: a\n    out_dir: a\n  - name: a\n    out_dir: b\n", "two phases are named 'a'"),
        ("  - name: a\n    out_dir: a\n  - name: b\n", "phases share an out_dir"),
    ],
)
def test_malformed_phases_are_refused(tmp_path, phases, message):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("phases:\n" + phases)
    with pytest.raises(InputError, match=message):
        load_recipe(recipe)


def test_a_unet_init_no_phase_makes_is_refused_before_any_training(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"phases:\n  - name: a\n    out_dir: {tmp_path / 'a'}\n"
        f"  - name: b\n    out_dir: {tmp_path / 'b'}\n    stages: [unet]\n"
        f"    unet_init: {tmp_path / 'typo'}\n"
    )
    with pytest.raises(TrainingError, match=r"phase b: unet_init .*typo is neither a finished model folder"):
        train_phases(load_recipe(recipe), progress=False)
    assert not (tmp_path / "a").exists(), "the check runs before the first phase trains"


def test_train_base_help_names_the_phase_flag(capsys):
    from pimg.frontends.cli import main

    with pytest.raises(SystemExit):
        main(["toyworld", "train-base", "--help"])
    assert "--phase NAME" in capsys.readouterr().out
