"""The tiny base model: tokenizer, shipped files, training stages and the evaluation command."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from pimg.models import BUILTIN_MODELS
from pimg.toyworld.captions import VOCABULARY
from pimg.toyworld.tokenizer import RARE_TOKENS, build_tokenizer

TINY = BUILTIN_MODELS["tiny"].folder


def test_tokenizer_keeps_grammar_words_and_rare_tokens_whole(tmp_path):
    from pimg.toyworld.architecture import tokenizer_words

    tokenizer = build_tokenizer(tokenizer_words(), tmp_path / "tok")
    for word in [*VOCABULARY, *RARE_TOKENS]:
        assert tokenizer.tokenize(word) == [word + "</w>"], word
    assert not set(RARE_TOKENS) & set(VOCABULARY), "identifier tokens must never appear in training captions"
    # any other word still tokenizes, into pieces, never into the unknown token
    pieces = tokenizer.tokenize("xylophone")
    assert len(pieces) > 1 and tokenizer.unk_token not in pieces


def test_tokenizer_build_is_the_same_in_every_process(tmp_path):
    # Token ids are what CLIP and the UNet learn: a rebuild that renumbers them breaks a resumed run.
    # Separate processes with different hash seeds, since hash order is what used to break the ties.
    script = (
        "import sys; from pimg.toyworld.architecture import tokenizer_words; "
        "from pimg.toyworld.tokenizer import build_bpe_files; build_bpe_files(tokenizer_words(), sys.argv[1])"
    )
    for k in range(2):
        env = dict(os.environ, PYTHONHASHSEED=str(k + 1))
        subprocess.run([sys.executable, "-c", script, str(tmp_path / str(k))], check=True, env=env)
    for name in ("vocab.json", "merges.txt"):
        assert (tmp_path / "0" / name).read_text() == (tmp_path / "1" / name).read_text(), name


@pytest.mark.skipif(
    not (TINY / "model_index.json").is_file(), reason="the trained tiny model is not in this checkout"
)
def test_shipped_tiny_loads_in_plain_diffusers_and_transformers():
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPModel, CLIPProcessor

    size = sum(f.stat().st_size for f in TINY.rglob("*") if f.is_file())
    assert size <= 40 * 2**20, f"tiny is {size / 2**20:.1f} MB; it must stay <= 40 MB"
    pipe = StableDiffusionPipeline.from_pretrained(str(TINY), dtype=torch.float32)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        "a red star on a blue background", num_inference_steps=2, generator=torch.Generator().manual_seed(0)
    ).images[0]
    assert image.size == (64, 64)
    clip = CLIPModel.from_pretrained(str(TINY / "clip"))
    processor = CLIPProcessor.from_pretrained(str(TINY / "clip"))
    inputs = processor(
        text=["a red star on a blue background"], images=[image], return_tensors="pt", padding=True
    )
    assert clip(**inputs).logits_per_image.shape == (1, 1)


FAST_STAGES = "sample_steps: 1\nunet:\n  batch_size: 8\nclip:\n  batch_size: 16\n"
FAST_STEPS = ["--clip-steps", "2", "--vae-steps", "2", "--unet-steps", "2", "--decoder-steps", "2"]


def _train_base_args(config, out) -> list[str]:
    return ["toyworld", "train-base", "--config", str(config), "--out", str(out), *FAST_STEPS]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A 2-steps-per-stage run of clip, vae, unet and decoder (the default stages)."""
    from pimg.frontends.cli import main

    folder = tmp_path_factory.mktemp("train_base")
    config = folder / "fast.yaml"
    config.write_text(FAST_STAGES)
    assert main(_train_base_args(config, folder / "run")) == 0
    return folder / "run", config


def test_train_base_stages_run_and_resume_skips_finished_stages(trained_run):
    from diffusers import StableDiffusionPipeline

    from pimg.frontends.cli import main

    out, config = trained_run
    model = out / "unet" / "model"
    assert StableDiffusionPipeline.from_pretrained(str(model)).unet is not None
    assert (out / "decoder" / "model" / "model_index.json").is_file()
    assert (out / "unet" / "samples").is_dir() and list((out / "unet" / "logs").iterdir())
    stamp = (model / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime
    assert main([*_train_base_args(config, out), "--resume"]) == 0
    assert (model / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime == stamp


def test_recipe_phases_run_in_order_and_a_continued_unet_starts_from_the_previous_phase(
    trained_run, tmp_path, capsys
):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPModel

    from pimg.frontends.cli import main

    first, _ = trained_run
    # The fixture's run is the first phase (finished, so --resume skips it); the second continues it in a
    # new run folder, its unet stage taking VAE, CLIP and tokenizer from unet_init.
    out = tmp_path / "continued"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"{FAST_STAGES}phases:\n  - name: first\n    out_dir: {first}\n"
        f"  - name: continued\n    out_dir: {out}\n    stages: [unet]\n"
        f"    unet_init: {first / 'decoder' / 'model'}\n"
        "    text_encoder_lr: 0.01\n    unet:\n      loop:\n        learning_rate: 0.0\n"
    )
    stamp = (first / "decoder" / "model" / "model_index.json").stat().st_mtime
    assert main(["toyworld", "train-base", "--config", str(recipe), "--resume", *FAST_STEPS]) == 0
    printed = capsys.readouterr().out
    assert "phase first (1/2)" in printed and "stage decoder: finished earlier" in printed
    assert printed.index("phase first") < printed.index("phase continued (2/2)")
    assert f"result written to {out / 'unet' / 'model'}" in printed
    assert (first / "decoder" / "model" / "model_index.json").stat().st_mtime == stamp

    before = StableDiffusionPipeline.from_pretrained(str(first / "decoder" / "model"))
    after = StableDiffusionPipeline.from_pretrained(str(out / "unet" / "model"))
    # The UNet's learning rate is 0 here, so it must come out exactly as the finished model's UNet.
    unet_after = dict(after.unet.named_parameters())
    assert all(torch.equal(p, unet_after[n]) for n, p in before.unet.named_parameters())
    tuned = dict(after.text_encoder.named_parameters())
    moved = [n for n, p in before.text_encoder.named_parameters() if not torch.equal(p, tuned[n])]
    assert moved, "train_text_encoder: the shipped text tower must be the tuned one"
    assert after.scheduler.config.prediction_type == "v_prediction"
    assert (
        after.scheduler.config.rescale_betas_zero_snr
        and after.scheduler.config.timestep_spacing == "trailing"
    )
    clip = CLIPModel.from_pretrained(str(out / "unet" / "model" / "clip"))
    original = CLIPModel.from_pretrained(str(first / "clip" / "clip"))
    assert all(torch.equal(a, b) for a, b in zip(clip.parameters(), original.parameters(), strict=True)), (
        "the metric CLIP stays the contrastive one"
    )


def test_zero_terminal_snr_needs_v_prediction_and_ends_in_pure_noise():
    from diffusers import DDPMScheduler

    from pimg.errors import TrainingError
    from pimg.toyworld.architecture import noise_schedule
    from pimg.trainers.toy_base import ToyBaseConfig

    with pytest.raises(TrainingError, match="v_prediction"):
        ToyBaseConfig(prediction_type="epsilon", zero_terminal_snr=True)

    scheduler = DDPMScheduler(**noise_schedule("v_prediction", zero_terminal_snr=True))
    assert scheduler.alphas_cumprod[-1] == 0  # the last training step sees no image at all
    assert DDPMScheduler(**noise_schedule()).alphas_cumprod[-1] > 0.004  # SD's leak


def test_eval_toybase_reports_seen_and_held_out(random_tiny_dir, tmp_path):
    from pimg.toyworld.evaluate import ToyBaseEvalConfig, evaluate_base, format_report

    config = ToyBaseEvalConfig(
        base=str(random_tiny_dir), num_prompts=2, seeds=1, num_inference_steps=2, out_dir=str(tmp_path)
    )
    report = evaluate_base(config)
    assert set(report["splits"]) == {"seen", "held-out"}
    assert "background" in report["splits"]["held-out"]
    assert 0 <= report["vae_psnr_db"] < 60
    assert 0 <= report["clip_retrieval_top1_heldout"] <= 1
    recorded = json.loads((tmp_path / "report.json").read_text())["config"]
    assert recorded["num_prompts"] == 2
    # No guidance given: a toy-world model folder is sampled at tiny's recommended guidance, not SD's 7.5.
    assert recorded["guidance_scale"] == BUILTIN_MODELS["tiny"].guidance_scale != 7.5
    assert f"guidance {BUILTIN_MODELS['tiny'].guidance_scale:g}" in format_report(report)
    assert (tmp_path / "samples.png").is_file()


def test_unet_training_captions_mix_empty_class_noun_and_full_captions():
    from pimg.errors import InputError
    from pimg.toyworld.captions import parse_caption
    from pimg.toyworld.scene import ObjectSpec, Scene
    from pimg.trainers.toy_base import ToyBaseConfig, UnetStage

    one = Scene("green", (ObjectSpec("star", "red", None, "solid", "large", "left"),))
    two = Scene(
        "blue",
        (
            ObjectSpec("star", "red", None, "solid", "small", "left"),
            ObjectSpec("heart", "white", None, "solid", "small", "right"),
        ),
    )
    stage = UnetStage.__new__(UnetStage)  # only the caption rule is under test: no models needed
    stage.config = ToyBaseConfig(caption_dropout=0.1, class_prompt_prob=0.2)
    assert stage._training_caption(0.05, "full", one) == ""
    assert stage._training_caption(0.2, "full", one) == "a star on a green background"
    assert stage._training_caption(0.2, "full two", two) == "full two"  # two objects keep their caption
    assert stage._training_caption(0.5, "full", one) == "full"
    # The class-noun prompt is not in the caption grammar (no colour), which is the point of it.
    with pytest.raises(InputError):
        parse_caption("a star on a green background")


def test_unet_init_that_is_not_a_model_folder_is_refused_before_any_loading(tmp_path):
    from pimg.errors import TrainingError
    from pimg.trainers.toy_base import ToyBaseConfig, train_base

    config = ToyBaseConfig(
        out_dir=str(tmp_path / "run"), stages=("unet",), unet_init=str(tmp_path / "missing")
    )
    with pytest.raises(TrainingError, match="not a finished model folder"):
        train_base(config, progress=False)


def test_object_loss_weight_weighs_the_latent_pixels_under_objects():
    from pimg.errors import TrainingError
    from pimg.toyworld.render import render_scene
    from pimg.toyworld.scene import ObjectSpec, Scene
    from pimg.trainers.toy_base import ToyBaseConfig, UnetStage

    scene = Scene("green", (ObjectSpec("square", "red", None, "solid", "small", "left"),))
    image = render_scene(scene, noise=0)
    stage = UnetStage.__new__(UnetStage)  # only the weighting is under test: no models needed
    stage.config = ToyBaseConfig(object_loss_weight=3.0)
    weights = stage._pixel_weights(image[None], [scene], 16)[0, 0]
    rows, cols = np.nonzero(image.astype(int).sum(-1) != image[0, 0].astype(int).sum())
    # Every latent pixel (4x4 image pixels) holding an object pixel weighs 4, all others 1.
    expected = torch.ones(16, 16)
    expected[rows // 4, cols // 4] = 4.0
    assert torch.equal(weights, expected)
    assert 0 < (weights == 4).sum() < 40  # a small object on the left: a few latent pixels
    stage.config = ToyBaseConfig()
    assert stage._pixel_weights(image[None], [scene], 16) is None
    with pytest.raises(TrainingError, match="object_loss_weight"):
        ToyBaseConfig(object_loss_weight=-1)


def test_denoising_loss_with_pixel_weights_is_the_weighted_mean_of_the_squared_error():
    from diffusers import DDPMScheduler

    from pimg.trainers.diffusion_training import Conditioning, denoising_loss

    class Echo(torch.nn.Module):
        """Predicts its input: the squared error is then known in closed form from the same draws."""

        def forward(self, sample, timesteps, encoder_hidden_states, added_cond_kwargs=None):
            return type("Out", (), {"sample": sample})()

    scheduler = DDPMScheduler(prediction_type="sample")
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    conditioning = Conditioning(torch.zeros(2, 3, 16))
    plain = denoising_loss(Echo(), scheduler, latents, conditioning, torch.Generator().manual_seed(1))
    ones = denoising_loss(
        Echo(),
        scheduler,
        latents,
        conditioning,
        torch.Generator().manual_seed(1),
        pixel_weights=torch.ones(2, 1, 8, 8),
    )
    assert torch.allclose(plain, ones)
    # All weight on one latent pixel: the loss is that pixel's squared error, averaged over channels.
    one_pixel = torch.zeros(2, 1, 8, 8)
    one_pixel[:, :, 3, 5] = 2.0
    focused = denoising_loss(
        Echo(), scheduler, latents, conditioning, torch.Generator().manual_seed(1), pixel_weights=one_pixel
    )
    draws = torch.Generator().manual_seed(1)  # the loss's own draws, in its order: noise, then timesteps
    noise = torch.randn(latents.shape, generator=draws)
    timesteps = torch.randint(0, 1000, (2,), generator=draws)
    error = (scheduler.add_noise(latents, noise, timesteps) - latents) ** 2
    assert torch.allclose(focused, error[:, :, 3, 5].mean(dim=1))
    assert torch.allclose(plain, error.mean(dim=(1, 2, 3)))
    with pytest.raises(ValueError, match="one weight per latent pixel"):
        denoising_loss(
            Echo(),
            scheduler,
            latents,
            conditioning,
            torch.Generator().manual_seed(1),
            pixel_weights=torch.ones(2, 8, 8),
        )


def test_high_noise_share_moves_that_share_of_timesteps_into_the_noisier_half():
    from diffusers import DDPMScheduler

    from pimg.errors import TrainingError
    from pimg.trainers.diffusion_training import Conditioning, denoising_loss
    from pimg.trainers.toy_base import ToyBaseConfig

    class Recorder(torch.nn.Module):
        def forward(self, sample, timesteps, encoder_hidden_states, added_cond_kwargs=None):
            self.timesteps = timesteps
            return type("Out", (), {"sample": sample})()

    scheduler = DDPMScheduler(num_train_timesteps=1000)
    latents = torch.zeros(2000, 4, 2, 2)
    conditioning = Conditioning(torch.zeros(2000, 3, 16))

    def drawn(share: float) -> torch.Tensor:
        unet = Recorder()
        denoising_loss(
            unet, scheduler, latents, conditioning, torch.Generator().manual_seed(3), high_noise_share=share
        )
        return unet.timesteps

    uniform, all_noisy, mixed = drawn(0.0), drawn(1.0), drawn(0.4)
    assert 0.45 < (uniform >= 500).float().mean() < 0.55
    assert all_noisy.min() >= 500 and all_noisy.max() <= 999
    assert all_noisy.unique().numel() > 450  # spread over the whole noisier half, not piled up
    # 40% moved up, the other 60% uniform: 0.4 + 0.6 / 2 = 70% in the noisier half.
    assert 0.66 < (mixed >= 500).float().mean() < 0.74
    with pytest.raises(TrainingError, match="high_noise_share"):
        ToyBaseConfig(high_noise_share=1.5)


def test_high_noise_share_schedule_runs_linearly_from_start_to_end_over_the_unet_steps():
    from pimg.errors import TrainingError
    from pimg.trainers.loop import LoopConfig
    from pimg.trainers.toy_base import StageConfig, ToyBaseConfig

    def share_at(step: int, **settings) -> float:
        config = ToyBaseConfig(unet=StageConfig(loop=LoopConfig(steps=101)), **settings)
        return config.high_noise_share_at(step)

    assert share_at(0, high_noise_share=0.3) == share_at(100, high_noise_share=0.3) == 0.3
    schedule = {"high_noise_share": 0.6, "high_noise_share_end": 0.0}
    assert share_at(0, **schedule) == pytest.approx(0.6)
    assert share_at(50, **schedule) == pytest.approx(0.3)
    assert share_at(100, **schedule) == pytest.approx(0.0)
    assert share_at(250, **schedule) == pytest.approx(0.0)  # a longer resumed run holds the end value
    with pytest.raises(TrainingError, match="high_noise_share_end"):
        ToyBaseConfig(high_noise_share_end=-0.1)


def test_plain_attention_computes_what_sdpa_does_in_training(random_tiny_dir):
    """The CPU training speed-up swaps the attention kernel only: same outputs, same gradients."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from pimg.trainers.toy_base import _use_plain_attention

    unet = UNet2DConditionModel.from_pretrained(str(random_tiny_dir / "unet"))
    text_encoder = CLIPTextModel.from_pretrained(str(random_tiny_dir / "text_encoder"))
    ids = torch.randint(
        0, text_encoder.config.vocab_size, (2, 77), generator=torch.Generator().manual_seed(0)
    )
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))

    def forward_backward():
        unet.zero_grad()
        text = text_encoder(ids)[0]
        out = unet(latents, torch.tensor([10, 900]), text).sample
        out.square().mean().backward()
        return out.detach(), unet.conv_in.weight.grad.clone()

    fused_out, fused_grad = forward_backward()
    _use_plain_attention(unet, text_encoder)
    assert text_encoder.config._attn_implementation == "eager"
    plain_out, plain_grad = forward_backward()
    assert torch.allclose(fused_out, plain_out, atol=1e-5)
    assert torch.allclose(fused_grad, plain_grad, atol=1e-6, rtol=1e-4)
