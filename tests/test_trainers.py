"""Subject trainers on the random tiny model: train -> save -> reload in plain diffusers -> generate.

Also: exact resume after a kill, config errors, NaN handling, new-token isolation, the CLI and a
smoke run of `pimg eval toysubject`. Every run is a few steps at 64 px, so the file stays fast.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from pimg.errors import InputError, TrainingError
from pimg.formats.safetensors_io import read_safetensors
from pimg.inference.guidance import choose_guidance, recorded_guidance
from pimg.methods import list_methods
from pimg.models import BUILTIN_MODELS
from pimg.photos import save_photos
from pimg.trainers.loop import latest_checkpoint, run_training
from pimg.trainers.personalize import load_train_config, train
from pimg.trainers.toy_base import load_recipe

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# Each case: training method, its overrides (fast: 2 steps, 1 two-step sample image).
CASES = {
    "lora": ("lora", {}),
    "pivotal": ("lora", {"pivotal": True, "token": "<sks>", "n_vectors": 2, "train_text_encoder": True}),
    "ti": ("ti", {"n_vectors": 2}),
    "dreambooth": (
        "dreambooth",
        {"num_class_images": 3, "class_prompts": ["a {class_noun} on a red background", "a {class_noun}"]},
    ),
}


@pytest.fixture(scope="module")
def photos_dir(tmp_path_factory) -> Path:
    from pimg.toyworld.subjects import EVAL_SUBJECTS

    subject = EVAL_SUBJECTS["ringed_star_rgb"]
    folder = tmp_path_factory.mktemp("photos")
    return save_photos(folder, subject.photos(3, seed=0), ["a {token} {class_noun} on a blue background"] * 3)


def fast_config(method: str, base: Path, photos: Path, out: Path, **overrides):
    values = {
        "base": str(base),
        "photos": str(photos),
        "class_noun": "star",
        "out_dir": str(out),
        "loop.steps": 2,
        "loop.learning_rate": 1e-3,
        "sample_images": 1,
        "num_inference_steps": 2,
        "sample_prompts": ["a {token} {class_noun}"],
        "guidance_scale": 1.5,
    }
    return load_train_config(method, None, {**values, **overrides})


def plain_pipeline(folder):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        str(folder), safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def one_image(pipe, prompt: str) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    return pipe(
        prompt, num_inference_steps=2, guidance_scale=5.0, generator=generator, output_type="np"
    ).images


@pytest.mark.parametrize("case", list(CASES))
def test_train_save_reload_generate(case, random_tiny_dir, photos_dir, tmp_path):
    method, overrides = CASES[case]
    config = fast_config(method, random_tiny_dir, photos_dir, tmp_path / case, **overrides)
    out = train(method, config, progress=False)

    card = (out / "README.md").read_text()
    assert config.token in card and "star" in card and "| training steps | 2 |" in card
    assert "samples/sample_0000002.png" in card and (out / "samples" / "sample_0000002.png").is_file()
    assert '"class_noun": "star"' in (out / "config.json").read_text()
    # The recommended guidance travels with the result and is what `pimg generate` picks by default.
    assert "| recommended guidance | 1.5 |" in card
    assert recorded_guidance(out) == 1.5 and recorded_guidance(random_tiny_dir / "unet") is None
    if method == "dreambooth":
        base, subjects, source = str(out), [], str(out)
    elif method == "lora":
        source = str(out / "pytorch_lora_weights.safetensors")
        base, subjects = str(random_tiny_dir), [source]
    else:
        source = str(out / "learned_embeds.safetensors")
        base, subjects = str(random_tiny_dir), [source]
    assert choose_guidance(base, subjects) == (1.5, f"recorded by {source}")
    assert choose_guidance(base, subjects, given=4.0) == (4.0, "given")
    # No subject: a toy-world folder (it holds clip/) samples at tiny's guidance, other folders at SD's 7.5.
    assert choose_guidance(str(random_tiny_dir))[0] == BUILTIN_MODELS["tiny"].guidance_scale
    assert choose_guidance(str(out / "samples")) == (7.5, "the Stable Diffusion default")

    if method == "dreambooth":
        pipe = plain_pipeline(out)
        base = plain_pipeline(random_tiny_dir)
        changed = [
            not torch.equal(a, b) for a, b in zip(pipe.unet.parameters(), base.unet.parameters(), strict=True)
        ]
        assert any(changed)
        assert len(list((out / "class_images").glob("photo_*.png"))) == 3
        manifest = json.loads((out / "class_images" / "manifest.json").read_text())
        assert manifest["prompts"] == ["a star on a red background", "a star"] and manifest["count"] == 3
        # the base's own (a toy-world folder: tiny's), not the subject's recommended 1.5
        assert manifest["guidance_scale"] == BUILTIN_MODELS["tiny"].guidance_scale
    else:
        pipe = plain_pipeline(random_tiny_dir)
    if method == "lora":
        lora = read_safetensors(out / "pytorch_lora_weights.safetensors")
        assert any(
            k.startswith("unet.") and k.endswith("lora_B.weight") and v.abs().sum() > 0
            for k, v in lora.items()
        )
        assert any(k.startswith("text_encoder.") for k in lora) == bool(overrides.get("train_text_encoder"))
        kohya = read_safetensors(out / "lora_kohya.safetensors")
        assert all(k.startswith(("lora_unet_", "lora_te_")) for k in kohya)
        pipe.load_lora_weights(str(out), adapter_name="subject")
    if method == "ti" or overrides.get("pivotal"):
        embeds = read_safetensors(out / "learned_embeds.safetensors")
        assert list(embeds) == ["<sks>"] and embeds["<sks>"].shape == (2, 128)
        pipe.load_textual_inversion(str(out / "learned_embeds.safetensors"))
    image = one_image(pipe, f"a {config.token} star on a green background")
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()


class KilledAt:
    """Wraps a method so the run dies when step `k` begins, as a killed process would."""

    def __init__(self, method, k: int):
        self.method, self.k = method, k

    def __getattr__(self, name):
        return getattr(self.method, name)

    def batch(self, step, micro, seed):
        if step == self.k:
            raise KeyboardInterrupt("killed")
        return self.method.batch(step, micro, seed)


@pytest.mark.parametrize(("case", "accumulation"), [("pivotal", 2), ("dreambooth", 1)])
def test_resume_after_kill_is_exact(case, accumulation, random_tiny_dir, photos_dir, tmp_path):
    """A run killed when step k begins, resumed by new objects, ends with an uninterrupted run's weights."""
    from pimg.methods import get_method

    name, overrides = CASES[case]
    steps, k = 3, 2
    overrides = {
        **overrides,
        "loop.lr_schedule": "cosine",
        "loop.warmup_steps": 1,
        "loop.steps": steps,
        "loop.gradient_accumulation": accumulation,
        "loop.checkpoint_every": k,
        "sample_images": 0,
    }
    if name == "dreambooth":
        overrides["class_images_dir"] = str(tmp_path / "class_images")

    def fresh(out: Path):
        config = fast_config(name, random_tiny_dir, photos_dir, out, **overrides)
        return get_method(name).trainer_class()(config), config.loop

    whole, loop = fresh(tmp_path / "whole")
    run_training(whole, loop, tmp_path / "whole", progress=False)
    killed, loop = fresh(tmp_path / "killed")
    with pytest.raises(KeyboardInterrupt):
        run_training(KilledAt(killed, k), loop, tmp_path / "killed", progress=False)
    assert latest_checkpoint(tmp_path / "killed").name == f"step_{k:07d}"
    resumed, loop = fresh(tmp_path / "killed")  # new objects, as in a new process
    run_training(resumed, loop, tmp_path / "killed", resume=True, progress=False)

    files = (
        ["unet/diffusion_pytorch_model.safetensors"]
        if name == "dreambooth"
        else ["pytorch_lora_weights.safetensors", "learned_embeds.safetensors"]
    )
    for file in files:
        a, b = read_safetensors(tmp_path / "whole" / file), read_safetensors(tmp_path / "killed" / file)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[key], b[key]) for key in a), file


def test_class_image_cache_follows_the_base_weights_not_its_name(photos_dir, tmp_path):
    """A base retrained under the same name must not be served the old base's class images."""
    from pimg.methods import get_method
    from pimg.toyworld.architecture import build_random_pipeline

    base, cache = tmp_path / "base", tmp_path / "class_images"
    overrides = {**CASES["dreambooth"][1], "class_images_dir": str(cache)}

    def class_photos_after_setup(seed: int) -> tuple[dict, dict]:
        build_random_pipeline(base, seed=seed)  # the same folder, so the same `base` string
        get_method("dreambooth").trainer_class()(
            fast_config("dreambooth", base, photos_dir, tmp_path / "out", **overrides)
        )
        photos = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(cache.glob("photo_*.png"))}
        return photos, json.loads((cache / "manifest.json").read_text())

    first, first_manifest = class_photos_after_setup(seed=0)
    again, again_manifest = class_photos_after_setup(seed=0)
    other, other_manifest = class_photos_after_setup(seed=1)
    assert again == first and again_manifest == first_manifest  # same weights: reused, files untouched
    assert other_manifest["base"] == first_manifest["base"]
    assert other_manifest["base_weights"] != first_manifest["base_weights"]
    assert other.keys() == first.keys()
    assert all(other[name][0] != first[name][0] for name in first)  # regenerated by the new weights


def test_lora_prior_preservation_draws_class_images_from_the_bare_base(random_tiny_dir, photos_dir, tmp_path):
    """LoRA shares DreamBooth's prior: the class images are the base's even when the LoRA starts non-zero
    (`init_lora`, a hypernetwork's start), and each step's loss adds theirs."""
    from pimg.formats.lora import save_lora
    from pimg.methods import get_method

    prior = {"class_prompts": ["a {class_noun} on a red background"], "num_class_images": 2}
    train("lora", fast_config("lora", random_tiny_dir, photos_dir, tmp_path / "start"), progress=False)
    weights = read_safetensors(tmp_path / "start" / "pytorch_lora_weights.safetensors")
    strong = save_lora(
        tmp_path / "strong", {k: v * (50 if "lora_B" in k else 1) for k, v in weights.items()}
    )  # a start far from the base: images drawn through it would differ

    def class_images(method: str, folder: str, **overrides) -> tuple[object, list[bytes]]:
        config = fast_config(method, random_tiny_dir, photos_dir, tmp_path / folder, **prior, **overrides)
        trainer = get_method(method).trainer_class()(config)
        files = sorted((tmp_path / folder / "class_images").glob("photo_*.png"))
        return trainer, [f.read_bytes() for f in files]

    _, bare = class_images("dreambooth", "db")
    lora, drawn = class_images("lora", "lora", prior_preservation=True, init_lora=str(strong))
    assert len(drawn) == 2 and drawn == bare
    batch = lora.batch(0, 0, 0)
    assert batch.prior is not None and batch.prior.prompts == ["a star on a red background"]
    loss, logs = lora.loss(batch, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and {"instance_loss", "prior_loss"} <= logs.keys()
    assert torch.isclose(loss, torch.tensor(logs["instance_loss"] + logs["prior_loss"]), rtol=1e-4)
    with pytest.raises(InputError, match="prior_preservation does nothing for Textual Inversion"):
        fast_config("ti", random_tiny_dir, photos_dir, tmp_path / "ti", prior_preservation=True)


@pytest.mark.parametrize(
    "given",
    ["attn2.to_q,attn2.to_out.0", "[attn2.to_q, attn2.to_out.0]", "['attn2.to_q', \"attn2.to_out.0\"]"],
)
def test_a_list_setting_reads_commas_or_a_yaml_list(given):
    """`--set target_modules=[a,b]` (as a preset writes it) must not keep the brackets in the names."""
    config = load_train_config("lora", None, {"photos": "x", "class_noun": "star", "target_modules": given})
    assert config.target_modules == ("attn2.to_q", "attn2.to_out.0")
    with pytest.raises(InputError, match="is not a YAML list"):
        load_train_config("lora", None, {"photos": "x", "class_noun": "star", "target_modules": "[a, [b]"})


def test_unknown_config_key_names_the_nearest(tmp_path):
    yaml = tmp_path / "typo.yaml"
    yaml.write_text("rnak: 8\n")
    with pytest.raises(InputError, match=r"unknown key 'rnak' in typo.yaml\. Did you mean 'rank'"):
        load_train_config("lora", yaml)
    with pytest.raises(InputError, match="learning_rate"):
        load_train_config("ti", None, {"loop.learning_rat": 1.0})
    with pytest.raises(InputError, match="methods are lora, dreambooth, ti, id-adapter, hypernet"):
        load_train_config("hyperdream")
    assert [m.name for m in list_methods()] == ["lora", "dreambooth", "ti", "id-adapter", "hypernet"]


@pytest.mark.parametrize(
    "preset", sorted(p.name for p in CONFIGS.glob("*.yaml") if not p.name.startswith("toy_base"))
)
def test_presets_load(preset):
    # <method>_<base>.yaml, the method's name spelt with "_" for "-" (id_adapter_tiny.yaml)
    config = load_train_config(preset.rsplit("_", 1)[0].replace("_", "-"), CONFIGS / preset)
    assert config.loop.steps > 0


@pytest.mark.parametrize("preset", sorted(p.name for p in CONFIGS.glob("toy_base*.yaml")))
def test_toy_base_presets_load(preset):
    for phase in load_recipe(CONFIGS / preset):
        config = phase.config
        assert config.stages and all(getattr(config, stage).loop.steps > 0 for stage in config.stages)


def test_nan_loss_raises_and_keeps_a_checkpoint(random_tiny_dir, photos_dir, tmp_path):
    # A learning rate of 1e30 blows the LoRA weights up after the first steps: the loss turns inf/NaN.
    config = fast_config(
        "lora",
        random_tiny_dir,
        photos_dir,
        tmp_path / "nan",
        **{
            "loop.learning_rate": 1e30,
            "loop.steps": 6,
            "loop.checkpoint_every": 1,
            "loop.max_grad_norm": 0.0,
            "sample_images": 0,
        },
    )
    with pytest.raises(
        TrainingError, match=r"loss became (nan|inf|-inf) at step \d.*resumable checkpoint is"
    ):
        train("lora", config, progress=False)
    kept = latest_checkpoint(tmp_path / "nan")
    assert kept is not None
    assert all(torch.isfinite(t).all() for t in read_safetensors(kept / "unet.safetensors").values())


def test_new_token_learning_refuses_existing_word(random_tiny_dir, photos_dir, tmp_path):
    config = fast_config("ti", random_tiny_dir, photos_dir, tmp_path / "ti", token="sks")
    with pytest.raises(InputError, match="'sks' is already in the tokenizer.*'<sks>'"):
        train("ti", config, progress=False)
    with pytest.raises(InputError, match="lacks '\\{token\\}'"):
        fast_config("lora", random_tiny_dir, photos_dir, tmp_path, prompt_template="a star")
    with pytest.raises(InputError, match="--class-noun"):
        train("lora", fast_config("lora", random_tiny_dir, photos_dir, tmp_path / "x", class_noun=""))


def test_new_tokens_start_from_a_phrase_one_word_per_vector(random_tiny_dir):
    from pimg.trainers.diffusion_training import NewTokens

    pipe = plain_pipeline(random_tiny_dir)
    table = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    ids = pipe.tokenizer.convert_tokens_to_ids(["red</w>", "and</w>", "blue</w>", "striped</w>"])
    phrase = NewTokens(
        pipe.tokenizer, pipe.text_encoder, "<four>", n_vectors=4, init_word="red and blue striped"
    )
    assert torch.equal(phrase.vectors.detach(), table[ids])
    # A phrase whose length is not the vector count: every vector starts from the phrase's mean.
    fresh = plain_pipeline(random_tiny_dir)
    mean = NewTokens(
        fresh.tokenizer, fresh.text_encoder, "<two>", n_vectors=2, init_word="red and blue striped"
    )
    assert torch.allclose(mean.vectors.detach(), table[ids].mean(0, keepdim=True).repeat(2, 1))


def test_new_tokens_train_only_their_rows(random_tiny_dir):
    from pimg.trainers.diffusion_training import NewTokens, TextConditioner

    pipe = plain_pipeline(random_tiny_dir)
    pipe.text_encoder.requires_grad_(False)
    before = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    tokens = NewTokens(pipe.tokenizer, pipe.text_encoder, "<new>", n_vectors=3, init_word="star")
    assert tokens.expand("a <new> star") == "a <new> <new>_1 <new>_2 star"
    trainable = [p for p in pipe.text_encoder.parameters() if p.requires_grad]
    assert len(trainable) == 1 and trainable[0] is tokens.vectors
    optimizer = torch.optim.AdamW(trainable, lr=0.1)
    TextConditioner.from_pipeline(pipe).encode([tokens.expand("a <new> star")]).prompt_embeds.sum().backward()
    optimizer.step()
    table = pipe.text_encoder.get_input_embeddings().weight
    assert torch.equal(table[: before.shape[0]], before)
    assert not torch.equal(table[tokens.ids[0]], before[pipe.tokenizer.convert_tokens_to_ids("star</w>")])


def test_cli_train_and_errors(random_tiny_dir, photos_dir, tmp_path, capsys):
    from pimg.frontends.cli import main

    args = [
        "train",
        "lora",
        "--base",
        str(random_tiny_dir),
        "--photos",
        str(photos_dir),
        "--class-noun",
        "star",
        "--steps",
        "1",
        "--rank",
        "2",
        "--out",
        str(tmp_path / "cli"),
        "--set",
        "sample_images=0",
    ]
    assert main(args) == 0
    assert '"rank": 2' in (tmp_path / "cli" / "config.json").read_text()
    assert main(args) == 2  # the folder holds a run now: --resume or another --out
    assert "--resume" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0
    assert main([*args[:-2], "--set", "rank=x"]) == 2
    assert "rank must be int" in capsys.readouterr().err


def test_eval_toysubject_smoke(random_tiny_dir, tmp_path):
    from pimg.trainers.toy_subject_eval import ToySubjectEvalConfig, evaluate_subjects

    config = ToySubjectEvalConfig(
        method="lora",
        base=str(random_tiny_dir),
        subjects=1,
        steps=2,
        images_per_background=1,
        num_inference_steps=2,
        out_dir=str(tmp_path / "eval"),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = evaluate_subjects(
            config, overrides={"sample_images": 0, "guidance_scale": 1.5}, progress=False
        )
    row = report["subjects"][0]
    assert set(report["mean"]) == {
        "fidelity",
        "background_accuracy",
        "base_fidelity",
        "drift_fidelity",
        "train_seconds",
    }
    assert 0.0 <= row["fidelity"] <= 1.0 and 0.0 <= row["background_accuracy"] <= 1.0
    assert row["guidance_scale"] == 1.5  # the method config's recommendation, not the base's 7.5
    assert (tmp_path / "eval" / "report.json").is_file() and (tmp_path / "eval" / "samples.png").is_file()


class LinearRegression:
    """The smallest method the loop accepts: fit y = 2x with one Linear layer."""

    def __init__(self):
        torch.manual_seed(0)
        self.model = torch.nn.Linear(4, 1)

    def trainable_modules(self):
        return {"model": self.model}

    def trainable_parameters(self):
        return list(self.model.parameters())

    def batch(self, step, micro, seed):
        x = torch.randn(8, 4, generator=torch.Generator().manual_seed(seed + step))
        return x, 2 * x.sum(dim=1, keepdim=True)

    def loss(self, batch, generator):
        x, y = batch
        return torch.nn.functional.mse_loss(self.model(x), y), {}

    def sample(self, step, out_dir):
        return None

    def save(self, out_dir):
        torch.save(self.model.state_dict(), out_dir / "model.pt")


def test_finished_run_extends_to_more_steps_as_if_never_stopped(tmp_path):
    """The final checkpoint keeps live weights and the EMA shadow, so `--resume` with more steps continues
    the run exactly (with a constant LR, 2 + 2 steps equal 4 uninterrupted ones)."""
    from pimg.trainers.loop import LoopConfig

    def loop(steps):
        return LoopConfig(steps=steps, learning_rate=0.05, ema_decay=0.5, log_every=1)

    run_training(LinearRegression(), loop(4), tmp_path / "whole", progress=False)
    run_training(LinearRegression(), loop(2), tmp_path / "extended", progress=False)
    run_training(LinearRegression(), loop(4), tmp_path / "extended", resume=True, progress=False)
    whole = torch.load(tmp_path / "whole" / "model.pt", weights_only=True)
    extended = torch.load(tmp_path / "extended" / "model.pt", weights_only=True)
    assert all(torch.equal(whole[k], extended[k]) for k in whole)


def sdxl_pixels(personalized, prompt: str) -> np.ndarray:
    """One small, fast image of a random-SDXL `PersonalizedPipeline`, as float pixels."""
    image = personalized.generate(
        prompt, seed=0, num_inference_steps=2, guidance_scale=5.0, height=32, width=32
    )[0].image
    return np.asarray(image, dtype=np.float32)


def test_sdxl_textual_inversion_trains_loads_and_reattaches(random_sdxl_dir, photos_dir, tmp_path):
    """SDXL TI writes one part per text encoder, which pimg's pipeline and plain diffusers both load."""
    from diffusers import StableDiffusionXLPipeline

    from pimg.inference.parts import EmbeddingPart
    from pimg.inference.pipeline import PersonalizedPipeline

    config = fast_config("ti", random_sdxl_dir, photos_dir, tmp_path / "ti", n_vectors=2)
    out = train("ti", config, progress=False)
    path = out / "embeddings_sdxl.safetensors"
    stored = read_safetensors(path)
    assert set(stored) == {"clip_l", "clip_g"} and stored["clip_l"].shape == (2, 32)

    pp = PersonalizedPipeline.from_base(str(random_sdxl_dir))
    before = sdxl_pixels(pp, "a <sks> star")
    pp.add(EmbeddingPart(path))
    assert {"<sks>", "<sks>_1"} <= set(pp.pipe.tokenizer_2.get_vocab())
    after = sdxl_pixels(pp, "a <sks> star")
    assert np.abs(after - before).max() > 0
    pp.remove("<sks>")
    assert "<sks>_1" not in pp.pipe.tokenizer.get_vocab() and "<sks>_1" not in pp.pipe.tokenizer_2.get_vocab()
    pp.add(EmbeddingPart(path))

    # The model card's plain-diffusers lines, run as written (the pipeline built from the same folder).
    card = (out / "README.md").read_text()
    recipe = card.split("```python\n", 1)[1].split("image = pipe(", 1)[0]
    assert 'pipe.load_textual_inversion(state["clip_g"]' in recipe
    recipe = recipe.replace("DiffusionPipeline.from_pretrained", "StableDiffusionXLPipeline.from_pretrained")
    namespace = {"StableDiffusionXLPipeline": StableDiffusionXLPipeline}
    exec(recipe.replace("from diffusers import DiffusionPipeline\n", ""), namespace)
    assert {"<sks>", "<sks>_1"} <= set(namespace["pipe"].tokenizer_2.get_vocab())


@pytest.mark.parametrize("method", ["lora", "dreambooth"])
def test_sdxl_lora_and_dreambooth_train_and_load(method, random_sdxl_dir, photos_dir, tmp_path):
    """The SDXL paths (two text encoders, text-time conditioning) train and load as the SD ones do."""
    from diffusers import StableDiffusionXLPipeline

    from pimg.inference.parts import LoraPart
    from pimg.inference.pipeline import PersonalizedPipeline

    overrides = {"num_class_images": 2} if method == "dreambooth" else {"train_text_encoder": True}
    config = fast_config(method, random_sdxl_dir, photos_dir, tmp_path / method, **overrides)
    out = train(method, config, progress=False)
    base = PersonalizedPipeline.from_base(str(random_sdxl_dir))
    before = sdxl_pixels(base, "a sks star")
    if method == "lora":
        lora = read_safetensors(out / "pytorch_lora_weights.safetensors")
        assert any(k.startswith("text_encoder_2.") for k in lora)
        base.add(LoraPart(out))
        trained = base
        plain = StableDiffusionXLPipeline.from_pretrained(str(random_sdxl_dir))
        plain.load_lora_weights(str(out))
        kohya = read_safetensors(out / "lora_kohya.safetensors")
        assert any(k.startswith("lora_te2_") for k in kohya) and any(
            k.startswith("lora_unet_") for k in kohya
        )
        from_kohya = StableDiffusionXLPipeline.from_pretrained(str(random_sdxl_dir))
        from_kohya.load_lora_weights(str(out / "lora_kohya.safetensors"), adapter_name="kohya")
        assert "kohya" in from_kohya.get_list_adapters().get("text_encoder_2", [])
    else:
        trained = PersonalizedPipeline.from_base(str(out))
        StableDiffusionXLPipeline.from_pretrained(str(out))
    after = sdxl_pixels(trained, "a sks star")
    assert np.abs(after - before).max() > 0


class PlacingPipe:
    """Stands in for a personalized pipeline: draws the subject where a placed prompt asks, or
    (`obeys=False`) always large at the centre, so placement is known exactly."""

    def __init__(self, subject, obeys: bool):
        self.subject, self.obeys = subject, obeys

    def generate(self, prompts, num_inference_steps, guidance_scale, seeds):
        import re
        from types import SimpleNamespace

        from pimg.toyworld.palette import POSITIONS, SIZES
        from pimg.toyworld.subjects import render_subject

        images = []
        for prompt in prompts:
            size, position, bg = re.fullmatch(
                r"a (\w+) sks \w+ at the (\w+) on a (\w+) background", prompt
            ).groups()
            if not self.obeys:
                size, position = "large", "center"
            image = render_subject(self.subject, SIZES[size], POSITIONS[position], bg, noise=0)
            images.append(SimpleNamespace(image=image))
        return images


def test_placed_prompts_ask_every_size_and_position_in_turn_and_placement_is_read_by_pixels():
    from pimg.toyworld.subjects import EVAL_SUBJECTS
    from pimg.trainers.toy_subject_eval import (
        PLACEMENTS,
        ToySubjectEvalConfig,
        score,
        subject_prompts,
    )

    assert len(set(PLACEMENTS)) == 10  # 2 sizes x 5 positions
    prompts = subject_prompts("sks star", ["blue"] * 10, placed=True)
    assert prompts[0] == "a small sks star at the left on a blue background"
    assert {p.split(" sks")[0] for p in prompts} == {"a small", "a large"}
    assert len(set(prompts)) == 10
    assert subject_prompts("star", ["red"], placed=False) == ["a star on a red background"]

    subject = next(iter(EVAL_SUBJECTS.values()))
    # 10 images per background: each background is asked for every placement once
    config = ToySubjectEvalConfig(method="lora", images_per_background=10, placed=True)
    obeying = score(PlacingPipe(subject, obeys=True), subject, "sks star", config, guidance=1.0)
    assert obeying.placement == 1.0 and obeying.background_accuracy == 1.0
    assert obeying.fidelity > 0.9
    stuck = score(PlacingPipe(subject, obeys=False), subject, "sks star", config, guidance=1.0)
    assert stuck.placement == pytest.approx(0.1)  # only "large at the center" is right
    assert stuck.fidelity > 0.9  # fidelity alone cannot tell the two apart
