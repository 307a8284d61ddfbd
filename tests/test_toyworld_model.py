"""The tiny base model: tokenizer, shipped files, training stages and the evaluation command."""

from __future__ import annotations

import json

import pytest

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


@pytest.mark.skipif(
    not (TINY / "model_index.json").is_file(), reason="the trained tiny model is not in this checkout"
)
def test_shipped_tiny_loads_in_plain_diffusers_and_transformers():
    import torch
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


def test_train_base_stages_run_and_resume_skips_finished_stages(tmp_path):
    from diffusers import StableDiffusionPipeline

    from pimg.cli import main

    out = tmp_path / "run"
    config = tmp_path / "fast.yaml"
    config.write_text("sample_steps: 1\nunet:\n  batch_size: 8\nclip:\n  batch_size: 16\n")
    args = [
        "toyworld",
        "train-base",
        "--config",
        str(config),
        "--out",
        str(out),
        "--clip-steps",
        "2",
        "--vae-steps",
        "2",
        "--unet-steps",
        "2",
    ]
    assert main(args) == 0
    model = out / "unet" / "model"
    assert StableDiffusionPipeline.from_pretrained(str(model)).unet is not None
    assert (out / "unet" / "samples").is_dir() and list((out / "unet" / "logs").iterdir())
    stamp = (model / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime
    assert main([*args, "--resume"]) == 0
    assert (model / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime == stamp


def test_eval_toybase_reports_seen_and_held_out(random_tiny_dir, tmp_path):
    from pimg.toyworld.evaluate import ToyBaseEvalConfig, evaluate_base

    config = ToyBaseEvalConfig(
        base=str(random_tiny_dir), num_prompts=2, seeds=1, num_inference_steps=2, out_dir=str(tmp_path)
    )
    report = evaluate_base(config)
    assert set(report["splits"]) == {"seen", "held-out"}
    assert "background" in report["splits"]["held-out"]
    assert 0 <= report["vae_psnr_db"] < 60
    assert 0 <= report["clip_retrieval_top1_heldout"] <= 1
    assert json.loads((tmp_path / "report.json").read_text())["config"]["num_prompts"] == 2
    assert (tmp_path / "samples.png").is_file()


def test_unet_training_captions_mix_empty_class_noun_and_full_captions():
    from pimg.trainers.toy_base import ToyBaseConfig, UnetStage

    from pimg.errors import InputError
    from pimg.toyworld.captions import parse_caption
    from pimg.toyworld.scene import ObjectSpec, Scene

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
