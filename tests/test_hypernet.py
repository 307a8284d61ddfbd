"""The hypernetwork: training on the shared loop, prediction, result folders other tools load, HM-CFG, fine-tune."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pimg.errors import InputError
from pimg.inference.parts import LoraPart
from pimg.inference.pipeline import PersonalizedPipeline
from pimg.models import load_base


def _train(base, out, steps=2, **overrides):
    from pimg.hypernets.model import HypernetArchitecture
    from pimg.hypernets.training import HypernetTrainConfig
    from pimg.trainers.loop import LoopConfig
    from pimg.trainers.personalize import train

    settings = {
        "base": str(base),
        "image_encoder": str(overrides.pop("encoder")),
        "architecture": HypernetArchitecture(width=32, depth=1, heads=2, subject_crop=True),
        "out_dir": str(out),
        "batch_size": 2,
        "max_photos": 2,
        "sample_subjects": 1,
        "num_inference_steps": 2,
        "loop": LoopConfig(steps=steps, learning_rate=1e-3, checkpoint_every=1),
    }
    config = HypernetTrainConfig(**(settings | overrides))
    return train("hypernet", config, progress=False)


@pytest.fixture(scope="module")
def trained_hypernet(random_tiny_dir, tmp_path_factory):
    """2 steps on the random tiny SD pipeline, its random CLIP's vision tower as the encoder."""
    return _train(
        random_tiny_dir, tmp_path_factory.mktemp("hn") / "hypernet", encoder=random_tiny_dir / "clip"
    )


@pytest.fixture(scope="module")
def strong_hypernet(random_tiny_dir, trained_hypernet, tmp_path_factory):
    """The trained hypernetwork with its head's b half made large, so predicted LoRAs visibly change images
    (after 2 steps they are near zero, and "equal to plain diffusers" could pass by both being the base)."""
    from pimg.hypernets.model import Hypernetwork

    model = Hypernetwork.load(trained_hypernet, load_base(str(random_tiny_dir)).unet)
    lidb = model.space.config
    with torch.no_grad():
        model.head[1].bias[lidb.rank * lidb.d_down :].normal_(
            0, 0.3, generator=torch.Generator().manual_seed(0)
        )
    return model.save(tmp_path_factory.mktemp("hn_strong") / "hypernet", model.record)


def _photos(n=3, index=0):
    from pimg.toyworld.subjects import EVAL_SUBJECTS

    return list(EVAL_SUBJECTS.values())[index].photos(n, seed=0)


def _image(pipe, prompt="a sks star on a green background", guidance=1.0, steps=3):
    return np.asarray(
        pipe(
            prompt,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images[0]
        * 255
    )


def test_two_training_steps_write_a_hypernetwork_that_loads_and_moved(random_tiny_dir, trained_hypernet):
    from pimg.hypernets.model import CONFIG_FILE, ENCODER_FOLDER, WEIGHTS_FILE, Hypernetwork
    from pimg.methods import detect_method

    for name in (WEIGHTS_FILE, CONFIG_FILE, ENCODER_FOLDER, "README.md", "samples", "checkpoints"):
        assert (trained_hypernet / name).exists(), name
    assert detect_method(trained_hypernet).name == "hypernet"
    model = Hypernetwork.load(trained_hypernet, load_base(str(random_tiny_dir)).unet)
    lidb = model.space.config
    # the b half of the head started at zero; two steps moved it, so predictions are no longer zero
    assert model.head[1].weight[lidb.rank * lidb.d_down :].abs().max() > 0
    factors = model.predict(_photos(2))
    assert any(b.abs().max() > 0 for _, b in factors)
    # 1 photo and 4 photos work with the same model (the number is drawn per step in training)
    assert len(model.predict(_photos(1))) == len(model.predict(_photos(4))) == len(model.space.layers)


def test_training_resumes_exactly(random_tiny_dir, trained_hypernet, tmp_path):
    from pimg.formats.safetensors_io import read_safetensors
    from pimg.trainers.personalize import resume_config, train

    resumed_dir = tmp_path / "resumed"
    import shutil

    shutil.copytree(trained_hypernet, resumed_dir)
    train("hypernet", resume_config("hypernet", resumed_dir, {"loop.steps": 3}), resume=True, progress=False)
    straight = _train(random_tiny_dir, tmp_path / "straight", steps=3, encoder=random_tiny_dir / "clip")
    a = read_safetensors(resumed_dir / "hypernet.safetensors")
    b = read_safetensors(straight / "hypernet.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_prediction_is_a_lora_plain_diffusers_loads_as_the_hooks_apply_it(
    random_tiny_dir, strong_hypernet, tmp_path
):
    from pimg.hypernets.lidb import apply_per_sample
    from pimg.hypernets.model import Hypernetwork
    from pimg.hypernets.predict import personalize

    out = personalize(_photos(3), tmp_path / "subject", base=str(random_tiny_dir), model=strong_hypernet)
    record = json.loads((out / "config.json").read_text())
    assert record["method"] == "hypernet" and record["token"] == "sks" and record["predict_seconds"] > 0

    base = load_base(str(random_tiny_dir))
    model = Hypernetwork.load(strong_hypernet, base.unet)
    factors = [(a[None], b[None]) for a, b in model.predict(_photos(3))]
    with apply_per_sample(base.unet, model.space, factors):
        hooked = _image(base)
    plain_base = _image(base)

    plain = load_base(str(random_tiny_dir))
    plain.load_lora_weights(str(out), adapter_name="subject")
    diffusers_image = _image(plain)
    kohya = load_base(str(random_tiny_dir))
    kohya.load_lora_weights(str(out / "lora_kohya.safetensors"), adapter_name="subject")
    kohya_image = _image(kohya)

    assert np.abs(diffusers_image - plain_base).max() > 10  # the LoRA does something
    assert np.abs(diffusers_image - hooked).max() <= 1
    assert np.abs(kohya_image - diffusers_image).max() <= 1


def test_subject_folder_is_a_result_every_front_end_loads(
    random_tiny_dir, strong_hypernet, trained_hypernet, tmp_path
):
    from pimg.hypernets.predict import personalize
    from pimg.methods import load_result

    out = personalize(_photos(2), tmp_path / "subject", base=str(random_tiny_dir), model=strong_hypernet)
    result = load_result(out, scale=0.5)
    assert result.method.name == "hypernet" and isinstance(result.parts[0], LoraPart)
    assert result.parts[0].scale == 0.5
    with pytest.raises(InputError, match="predict one first"):
        load_result(trained_hypernet)
    with pytest.raises(InputError, match="no photos"):
        personalize(tmp_path, tmp_path / "x", base=str(random_tiny_dir), model=strong_hypernet)


def test_hypernetwork_for_another_architecture_is_refused(random_sdxl_dir, trained_hypernet):
    from pimg.errors import ModelLoadError
    from pimg.hypernets.model import Hypernetwork

    with pytest.raises(ModelLoadError, match="another base architecture"):
        Hypernetwork.load(trained_hypernet, load_base(str(random_sdxl_dir)).unet)


def test_sdxl_hypernetwork_trains_predicts_and_its_lora_loads(random_sdxl_dir, random_tiny_dir, tmp_path):
    from pimg.hypernets.predict import personalize

    trained = _train(random_sdxl_dir, tmp_path / "hn", encoder=random_tiny_dir / "clip", sample_subjects=0)
    out = personalize(_photos(2), tmp_path / "subject", base=str(random_sdxl_dir), model=trained)
    plain = load_base(str(random_sdxl_dir))
    plain.load_lora_weights(str(out), adapter_name="subject")
    assert "subject" in plain.get_active_adapters()
    _image(plain, steps=2)


# ---------------------------------------------------------------------------------------------- HM-CFG


@pytest.fixture(scope="module")
def strong_subject(random_tiny_dir, strong_hypernet, tmp_path_factory):
    from pimg.hypernets.predict import personalize

    return personalize(
        _photos(3), tmp_path_factory.mktemp("subject") / "s", base=str(random_tiny_dir), model=strong_hypernet
    )


def _generate(pp, guidance, steps=3):
    return np.asarray(
        pp.generate(
            "a sks star on a green background", num_inference_steps=steps, guidance_scale=guidance, seed=0
        )[0].image
    ).astype(np.int16)


def test_hm_cfg_at_its_ends_is_the_base_and_the_personalised_model(random_tiny_dir, strong_subject):
    from pimg.inference.hybrid_guidance import HybridGuidance

    base = PersonalizedPipeline.from_base(str(random_tiny_dir))
    plain_base = _generate(base, 3.0)
    lora = PersonalizedPipeline.from_base(str(random_tiny_dir))
    lora.add(LoraPart(strong_subject))
    plain_lora_unguided = _generate(lora, 1.0)

    hybrid = PersonalizedPipeline.from_base(str(random_tiny_dir))
    hybrid.add(HybridGuidance(LoraPart(strong_subject), subject_scale=0.0))
    assert np.abs(_generate(hybrid, 3.0) - plain_base).max() <= 1  # s_p 0: the base's own CFG
    assert np.abs(plain_lora_unguided - plain_base).max() > 10
    hybrid = PersonalizedPipeline.from_base(str(random_tiny_dir))
    hybrid.add(HybridGuidance(LoraPart(strong_subject), subject_scale=1.0))
    # guidance 1, s_p 1: eps_base(c) + (eps_pers(c) - eps_base(c)) = the personalised model alone
    assert np.abs(_generate(hybrid, 1.0) - plain_lora_unguided).max() <= 1


def test_hm_cfg_mixes_the_three_predictions_in_one_unet_call_per_step(random_tiny_dir, strong_subject):
    from pimg.inference.hybrid_guidance import HybridGuidance

    pp = PersonalizedPipeline.from_base(str(random_tiny_dir))
    part = HybridGuidance(LoraPart(strong_subject), subject_scale=0.7)
    pp.add(part)
    batches, seen = [], {}
    unet = pp.pipe.unet
    handle = unet.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))

    # the mix itself: record the three blocks of rows the one call returns, then check the formula
    original = part.wrap_noise_prediction

    def spy(predict, call):
        def recording(*args, **kwargs):
            eps = predict(*args, **kwargs)
            seen["eps"] = eps
            return eps

        wrapped = original(recording, call)

        def outer(*args, **kwargs):
            out = wrapped(*args, **kwargs)
            seen["out"] = out
            return out

        return outer

    part.wrap_noise_prediction = spy
    try:
        pp.generate("a sks star on a green background", num_inference_steps=3, guidance_scale=3.0, seed=0)
    finally:
        handle.remove()
    assert batches == [3, 3, 3]  # one call per step: [uncond base, cond base, cond personalised]
    u, c, p = seen["eps"].chunk(3)
    expected = u + 3.0 * (c - u) + 0.7 * (p - c)
    out_u, out_c = seen["out"].chunk(2)
    torch.testing.assert_close(out_u + 3.0 * (out_c - out_u), expected, rtol=1e-4, atol=1e-5)
    assert (p - c).abs().max() > 0  # the LoRA acted on the personalised rows only
    pp.remove(part.name)  # detaching removes its hooks and its LoRA
    assert part._handles == [] and part.loras[0].adapter_name not in pp.pipe.get_list_adapters().get(
        "unet", []
    )


def test_hm_cfg_refuses_a_lora_that_changes_the_text_encoder(random_tiny_dir, lora_dir):
    from pimg.inference.hybrid_guidance import HybridGuidance

    pp = PersonalizedPipeline.from_base(str(random_tiny_dir))
    with pytest.raises(InputError, match="text encoder"):
        pp.add(HybridGuidance(LoraPart(lora_dir)))


# ------------------------------------------------------------------------------------------- fine-tune


def test_lora_training_starts_exactly_at_a_lower_rank_init_lora(random_tiny_dir, strong_subject, tmp_path):
    from pimg.formats.lora import load_lora_state_dict
    from pimg.photos import save_photos
    from pimg.trainers.lora import LoraMethod, LoraTrainConfig

    save_photos(tmp_path / "photos", _photos(2), None)
    config = LoraTrainConfig(
        base=str(random_tiny_dir),
        photos=str(tmp_path / "photos"),
        class_noun="star",
        rank=4,
        init_lora=str(strong_subject / "pytorch_lora_weights.safetensors"),
        out_dir=str(tmp_path / "out"),
    )
    method = LoraMethod(config)
    unet = method.pipe.unet
    state = load_lora_state_dict(strong_subject, {"unet": unet, "text_encoder": method.pipe.text_encoder})
    modules = dict(unet.named_modules())
    checked = 0
    for key, down in state.items():
        if key.endswith(".lora_A.weight"):
            module = modules[key.removeprefix("unet.").removesuffix(".lora_A.weight")]
            up = state[key.replace("lora_A", "lora_B")]
            delta = (
                module.lora_B["subject"].weight @ module.lora_A["subject"].weight * module.scaling["subject"]
            )
            torch.testing.assert_close(delta, up @ down, rtol=1e-5, atol=1e-6)
            assert module.lora_A["subject"].weight.shape[0] == 4  # rank relaxed from the prediction's 1
            checked += 1
    assert checked == len([k for k in state if k.endswith("lora_A.weight")]) > 0
    # a file of higher rank than the trainer's cannot fit: say which rank to use
    import dataclasses

    from pimg.formats.lora import lora_state_dict_from_peft, save_lora

    rank4 = save_lora(tmp_path / "rank4", lora_state_dict_from_peft(unet, "unet", "subject"))
    with pytest.raises(InputError, match="raise rank"):
        LoraMethod(dataclasses.replace(config, rank=2, init_lora=str(rank4), out_dir=str(tmp_path / "r2")))


def test_predict_with_finetune_steps_trains_on_from_the_prediction(
    random_tiny_dir, strong_hypernet, tmp_path
):
    from pimg.formats.safetensors_io import read_safetensors
    from pimg.hypernets.predict import personalize

    predicted = personalize(_photos(2), tmp_path / "p", base=str(random_tiny_dir), model=strong_hypernet)
    tuned = personalize(
        _photos(2),
        tmp_path / "t",
        base=str(random_tiny_dir),
        model=strong_hypernet,
        finetune_steps=2,
        class_noun="star",
    )
    record = json.loads((tuned / "config.json").read_text())
    assert record["finetune_steps"] == 2 and record["finetune_seconds"] > 0
    a = read_safetensors(predicted / "pytorch_lora_weights.safetensors")
    b = read_safetensors(tuned / "pytorch_lora_weights.safetensors")
    key = next(k for k in a if k.endswith("lora_A.weight"))
    assert b[key].shape[0] > a[key].shape[0]  # rank relaxed
    assert (tuned / "lora_kohya.safetensors").is_file()
    load_base(str(random_tiny_dir)).load_lora_weights(str(tuned), adapter_name="tuned")


# ------------------------------------------------------------------------------------------ front ends


def test_cli_predict_writes_a_lora_folder_and_prints_its_time(
    random_tiny_dir, strong_hypernet, tmp_path, capsys
):
    from pimg.frontends.cli import main
    from pimg.photos import save_photos

    save_photos(tmp_path / "photos", _photos(2), None)
    code = main(
        [
            "hypernet",
            "predict",
            "--base",
            str(random_tiny_dir),
            "--hypernet",
            str(strong_hypernet),
            "--photos",
            str(tmp_path / "photos"),
            "--out",
            str(tmp_path / "subject"),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "predicted from 2 photo(s) in" in printed and "bound to 'sks'" in printed
    for name in ("pytorch_lora_weights.safetensors", "lora_kohya.safetensors", "README.md", "config.json"):
        assert (tmp_path / "subject" / name).is_file(), name
    assert (
        main(
            [
                "hypernet",
                "predict",
                "--base",
                str(random_tiny_dir),
                "--hypernet",
                str(tmp_path),
                "--photos",
                str(tmp_path / "photos"),
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )  # not a hypernetwork


def test_eval_toysubject_predicts_and_prompts_with_the_recorded_token(
    random_tiny_dir, strong_hypernet, tmp_path
):
    from pimg.toyworld.subjects import held_out_stream
    from pimg.trainers.toy_subject_eval import ToySubjectEvalConfig, evaluate_subjects, format_report

    report = evaluate_subjects(
        ToySubjectEvalConfig(
            method="hypernet",
            base=str(random_tiny_dir),
            subjects=1,
            images_per_background=1,
            num_inference_steps=2,
            model=str(strong_hypernet),
            hm_cfg=1.0,
            guidance_scale=2.0,
            subject_set="held-out",
            subject_seed=3,
            placed=True,
            scales=(0.5,),
            out_dir=str(tmp_path / "eval"),
        ),
        progress=False,
    )
    row = report["subjects"][0]
    assert row["subject"] == next(held_out_stream(3)).name  # a fresh subject, not EVAL_SUBJECTS' first
    with pytest.raises(InputError, match="subject_set must be 'eval' or 'held-out'"):
        ToySubjectEvalConfig(method="hypernet", subject_set="fresh")
    assert row["predict_seconds"] > 0 and "predict_seconds" in report["mean"]
    assert 0.0 <= row["placement"] <= 1.0 and "base_placement" in report["mean"]
    assert 0.0 <= row["by_scale"]["0.5"]["placement"] <= 1.0
    assert "placed" in format_report(report).splitlines()[-1]  # the sweep line prints it
    assert (
        json.loads((tmp_path / "eval" / row["subject"] / "result" / "config.json").read_text())["token"]
        == "sks"
    )
    assert (
        row["prompt_words"] == f"a sks {row['class_noun']}"
    )  # the predicted LoRA's word, not the class alone


# ------------------------------------------------------------------------------------------ shipped


def test_shipped_tiny_hypernetwork_is_small_and_predicts_a_loadable_lora(tmp_path):
    from pimg.hypernets.predict import default_hypernet, personalize

    folder = default_hypernet("tiny")
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size <= 10 * 2**20, f"the shipped hypernetwork is {size / 2**20:.1f} MB (the bound is 10 MB)"
    out = personalize(_photos(4), tmp_path / "subject", base="tiny")
    assert json.loads((out / "config.json").read_text())["predict_seconds"] < 5
    pipe = load_base("tiny")
    pipe.load_lora_weights(str(out), adapter_name="subject")
    assert "subject" in pipe.get_active_adapters()
