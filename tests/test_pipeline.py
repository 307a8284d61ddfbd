"""The shared pipeline: base loading, seeded generation, metadata, LoRA and TI parts, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pimg.errors import InputError, ModelLoadError
from pimg.formats.lora import (
    DIFFUSERS_LORA_FILENAME,
    KOHYA_LORA_FILENAME,
    save_lora,
)
from pimg.formats.safetensors_io import read_safetensors
from pimg.inference.parts import EmbeddingPart, LoraPart
from pimg.inference.pipeline import PersonalizedPipeline, read_png_settings
from pimg.models import describe_base, load_base

FAST = dict(num_inference_steps=4, guidance_scale=5.0)


def _pixels(generated) -> np.ndarray:
    return np.stack([np.asarray(g.image, dtype=np.int16) for g in generated])


@pytest.fixture(scope="module")
def pp(random_tiny_dir):
    return PersonalizedPipeline.from_base(str(random_tiny_dir))


def test_builtin_and_folder_bases_are_classified(random_tiny_dir):
    assert describe_base("tiny")[0] == "builtin"
    assert describe_base(str(random_tiny_dir)) == ("folder", str(random_tiny_dir))
    assert describe_base("some-org/some-model")[0] == "hub"


def test_unknown_base_lists_what_is_accepted():
    with pytest.raises(InputError, match="built-in name \\(tiny\\).*diffusers folder.*safetensors.*hub id"):
        describe_base("no such model")


def test_hub_id_offline_says_how_to_pass_a_local_folder(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="no access to the hub.*--base /path/to/folder"):
        load_base("pimg-test-org/definitely-not-cached")


def test_folder_without_model_index_is_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="model_index.json"):
        load_base(str(tmp_path))


def test_corrupt_single_file_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x00\x01 not a checkpoint")
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        load_base(str(bad))


def test_same_seed_same_pixels_and_seeds_are_per_image(pp):
    a = pp.generate("a red star on a blue background", num_images=2, seed=5, **FAST)
    b = pp.generate("a red star on a blue background", num_images=2, seed=5, **FAST)
    c = pp.generate("a red star on a blue background", num_images=1, seed=6, **FAST)
    assert np.array_equal(_pixels(a), _pixels(b))
    assert [g.settings["seed"] for g in a] == [5, 6]
    assert not np.array_equal(_pixels(a)[0], _pixels(a)[1])
    # image k of a batch is the same image as a single call with seed + k
    assert np.abs(_pixels(a)[1] - _pixels(c)[0]).max() <= 1


def test_png_carries_its_settings(pp, tmp_path):
    image = pp.generate("a green heart on a white background", seed=3, **FAST)[0]
    path = image.save(tmp_path / "x.png")
    settings = read_png_settings(path)
    assert settings["prompt"] == "a green heart on a white background"
    assert settings["seed"] == 3 and settings["num_inference_steps"] == 4


@pytest.mark.parametrize("size", [60, 0])
def test_height_not_multiple_of_8_is_refused(pp, size):
    with pytest.raises(InputError, match="multiple of 8"):
        pp.generate("a red star", height=size, width=64, **FAST)


def test_schedulers_by_name(pp):
    for name in ("ddim", "euler", "dpm++"):
        pp.set_scheduler(name)
        assert pp.generate("a red star", seed=0, **FAST)[0].settings["scheduler"] == name
    with pytest.raises(InputError, match="ddim"):
        pp.set_scheduler("nope")


def test_zero_terminal_snr_schedule_carries_over_or_is_refused():
    from pimg.inference.schedulers import make_scheduler
    from pimg.toyworld.architecture import build_scheduler

    base = build_scheduler("v_prediction", zero_terminal_snr=True).config
    euler = make_scheduler("euler", base)
    assert euler.config.rescale_betas_zero_snr and euler.config.prediction_type == "v_prediction"
    with pytest.raises(InputError, match="zero terminal SNR"):
        make_scheduler("pndm", base)
    assert make_scheduler("pndm", build_scheduler().config) is not None


def test_lora_saved_by_pimg_matches_plain_diffusers(random_tiny_dir, lora_dir):
    """pimg's own LoRA path and diffusers' load_lora_weights on pimg's file give the same images."""
    prompt = "a red star on a blue background"
    ours = PersonalizedPipeline.from_base(str(random_tiny_dir))
    base_pixels = _pixels(ours.generate(prompt, seed=0, **FAST))
    ours.add(LoraPart(lora_dir, scale=1.0, name="subject"))
    ours_pixels = _pixels(ours.generate(prompt, seed=0, **FAST))

    plain = load_base(str(random_tiny_dir))
    plain.load_lora_weights(str(lora_dir), weight_name=DIFFUSERS_LORA_FILENAME)
    plain.set_progress_bar_config(disable=True)
    image = plain(prompt, generator=[torch.Generator().manual_seed(0)], **FAST).images[0]
    plain_pixels = np.asarray(image, dtype=np.int16)[None]

    assert np.abs(ours_pixels - plain_pixels).max() <= 1
    assert np.abs(ours_pixels - base_pixels).max() > 10, "the LoRA must change the image"


def test_kohya_file_gives_the_same_unet_output(random_tiny_dir, lora_dir):
    outputs = []
    for filename in (DIFFUSERS_LORA_FILENAME, KOHYA_LORA_FILENAME):
        pp = PersonalizedPipeline.from_base(str(random_tiny_dir))
        pp.add(LoraPart(lora_dir / filename, name="x"))
        torch.manual_seed(0)
        sample = torch.randn(2, 4, 16, 16)
        text = pp.pipe.encode_prompt("a red star", "cpu", 1, False)[0]
        with torch.no_grad():
            outputs.append(pp.pipe.unet(sample, torch.tensor([500, 500]), text.repeat(2, 1, 1)).sample)
    assert torch.allclose(outputs[0], outputs[1], atol=1e-5)


def test_unet_only_lora_loads_without_diffusers_text_encoder_warning(random_tiny_dir, lora_dir, tmp_path):
    import logging

    from diffusers.utils import logging as diffusers_logging
    from safetensors.torch import save_file

    state = read_safetensors(lora_dir / DIFFUSERS_LORA_FILENAME)
    save_file(
        {k: v for k, v in state.items() if k.startswith("unet.")}, str(tmp_path / "unet_only.safetensors")
    )
    pp = PersonalizedPipeline.from_base(str(random_tiny_dir))

    class Collect(logging.Handler):
        messages: list[str] = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    handler = Collect()
    diffusers_logging.get_logger("diffusers").addHandler(handler)  # diffusers' loggers do not propagate
    before = diffusers_logging.get_verbosity()
    try:
        pp.add(LoraPart(tmp_path / "unet_only.safetensors"))
    finally:
        diffusers_logging.get_logger("diffusers").removeHandler(handler)
    assert not [m for m in handler.messages if "No LoRA keys" in m]
    assert diffusers_logging.get_verbosity() == before
    assert pp.pipe.unet.peft_config and not getattr(pp.pipe.text_encoder, "peft_config", None)


def test_lora_scale_zero_is_the_base(random_tiny_dir, lora_dir):
    pp = PersonalizedPipeline.from_base(str(random_tiny_dir))
    base = _pixels(pp.generate("a red star", seed=1, **FAST))
    pp.add(LoraPart(lora_dir, scale=0.0))
    assert np.abs(_pixels(pp.generate("a red star", seed=1, **FAST)) - base).max() <= 1


def test_lora_for_another_family_names_the_layer(tmp_path, random_tiny_dir):
    pp = PersonalizedPipeline.from_base(str(random_tiny_dir))
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    bad = {f"{key}.lora_A.weight": torch.zeros(4, 768), f"{key}.lora_B.weight": torch.zeros(64, 4)}
    save_lora(tmp_path, bad)
    with pytest.raises(ModelLoadError, match="attn2.to_k"):
        pp.add(LoraPart(tmp_path))


def test_truncated_lora_file_is_a_clear_error(pp, tmp_path, lora_dir):
    data = (lora_dir / DIFFUSERS_LORA_FILENAME).read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="cut.safetensors"):
        pp.add(LoraPart(tmp_path / "cut.safetensors"))
    assert "cut" not in pp.parts


def test_textual_inversion_part_and_plain_diffusers(random_tiny_dir, tmp_path):
    from pimg.formats.embeddings import save_embedding

    pp = PersonalizedPipeline.from_base(str(random_tiny_dir))
    dim = pp.pipe.text_encoder.config.hidden_size
    torch.manual_seed(0)
    path = save_embedding(tmp_path / "learned_embeds.safetensors", "zwq", torch.randn(2, dim))
    before = _pixels(pp.generate("a zwq star", seed=0, **FAST))
    pp.add(EmbeddingPart(path))
    after = _pixels(pp.generate("a zwq star", seed=0, **FAST))
    assert np.abs(after - before).max() > 0

    plain = load_base(str(random_tiny_dir))
    plain.load_textual_inversion(str(path))
    assert "zwq" in plain.tokenizer.get_vocab() and "zwq_1" in plain.tokenizer.get_vocab()


def test_multi_vector_embedding_detaches_fully_and_attaches_again(random_tiny_dir, tmp_path):
    from pimg.formats.embeddings import save_embedding

    pp = PersonalizedPipeline.from_base(str(random_tiny_dir))
    vocab_size = len(pp.pipe.tokenizer)
    torch.manual_seed(0)
    path = save_embedding(
        tmp_path / "e.safetensors", "zwq", torch.randn(3, pp.pipe.text_encoder.config.hidden_size)
    )
    pp.add(EmbeddingPart(path))
    with_token = _pixels(pp.generate("a zwq star", seed=0, **FAST))
    pp.remove("zwq")
    vocab = pp.pipe.tokenizer.get_vocab()
    assert not {"zwq", "zwq_1", "zwq_2"} & set(vocab) and len(pp.pipe.tokenizer) == vocab_size
    pp.add(EmbeddingPart(path))  # the demo re-attaches a subject this way when it is picked again
    assert np.array_equal(_pixels(pp.generate("a zwq star", seed=0, **FAST)), with_token)


def test_sdxl_embedding_on_an_sd_base_is_a_clear_error(pp, tmp_path):
    from safetensors.torch import save_file

    dim = pp.pipe.text_encoder.config.hidden_size
    path = tmp_path / "xl.safetensors"
    save_file({"clip_l": torch.zeros(1, dim), "clip_g": torch.zeros(1, dim)}, path)
    part = EmbeddingPart(path)
    assert part.token == "xl"  # no token in the metadata: named by the file, as A1111 does
    with pytest.raises(ModelLoadError, match="SDXL embedding .*1 text encoder"):
        pp.add(part)
    assert "xl" not in pp.parts and "xl" not in pp.pipe.tokenizer.get_vocab()


def test_embedding_token_already_in_the_tokenizer_is_refused(random_tiny_dir, tmp_path):
    from pimg.formats.embeddings import save_embedding

    pp = PersonalizedPipeline.from_base(str(random_tiny_dir))
    path = save_embedding(
        tmp_path / "e.safetensors", "star", torch.randn(1, pp.pipe.text_encoder.config.hidden_size)
    )
    with pytest.raises(InputError, match="already exists"):
        pp.add(EmbeddingPart(path))
