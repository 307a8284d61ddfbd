"""Multi-subject fusion (`pimg.fusion`): regions, routing by mask in one UNet pass, every subject kind."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from pimg.errors import InputError
from pimg.fusion import Composition, Region, RegionalSubject, default_regions, parse_region, regional_subject
from pimg.fusion.regions import region_weights
from pimg.inference.parts import LoraPart
from pimg.inference.pipeline import PersonalizedPipeline

FAST = dict(num_inference_steps=3, num_images=2, seed=5)
PROMPT = "a zwq star at the left and a zwq circle at the right on a blue background"


def _pixels(generated) -> np.ndarray:
    return np.stack([np.asarray(g.image, dtype=np.int16) for g in generated])


@pytest.fixture(scope="module")
def pp(random_tiny_dir):
    pipe = PersonalizedPipeline.from_base(str(random_tiny_dir))
    pipe.pipe.set_progress_bar_config(disable=True)
    return pipe


def _second_lora(lora_dir, folder):
    """A LoRA result with other random weights than `lora_dir`'s (same layout)."""
    from safetensors.torch import save_file

    from pimg.formats.safetensors_io import read_safetensors

    torch.manual_seed(7)
    state = read_safetensors(lora_dir / "pytorch_lora_weights.safetensors")
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: torch.randn_like(v) * 0.3 for k, v in state.items()}, folder / "pytorch_lora_weights.safetensors"
    )
    return folder


def _word_result(pp, folder, seed, lora_dir=None):
    """A Textual Inversion result (or, with `lora_dir`, a pivotal one) for the word `zwq`."""
    from pimg.formats.embeddings import save_embedding

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    save_embedding(
        folder / "learned_embeds.safetensors", "zwq", torch.randn(1, pp.pipe.text_encoder.config.hidden_size)
    )
    if lora_dir is not None:
        shutil.copy(lora_dir / "pytorch_lora_weights.safetensors", folder)
    return folder


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_one_subject_everywhere_and_one_nowhere_equals_the_first_alone(pp, lora_dir, tmp_path, guidance):
    other = _second_lora(lora_dir, tmp_path / "other")
    pp.add(LoraPart(lora_dir, name="alone"))
    try:
        alone = _pixels(pp.generate(PROMPT, guidance_scale=guidance, **FAST))
    finally:
        pp.clear()
    everywhere = RegionalSubject("first", [LoraPart(lora_dir, name="first")], Region(mask=np.ones((64, 64))))
    nowhere = RegionalSubject("second", [LoraPart(other, name="second")], Region(mask=np.zeros((64, 64))))
    composition = pp.add(Composition([everywhere, nowhere]))
    try:
        composed = _pixels(pp.generate(PROMPT, guidance_scale=guidance, **FAST))
        assert any("covers no pixel" in note for note in composition.notes)
    finally:
        pp.clear()
    assert np.abs(composed - alone).max() <= 1


def _routed_delta(pp, composition) -> torch.Tensor:
    """[batch, 16, 16, channels]: what the composition added to one self-attention query at the first UNet call."""
    pp.add(composition)
    layer = pp.pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    seen = {}
    handle = layer.register_forward_hook(
        lambda m, inputs, out: seen.setdefault("delta", (out - m.base_layer(inputs[0])).detach())
    )
    try:
        pp.generate(PROMPT, guidance_scale=1.0, **FAST)
    finally:
        handle.remove()
        pp.clear()
    return seen["delta"].reshape(seen["delta"].shape[0], 16, 16, -1).abs()


def test_each_subjects_lora_acts_only_in_its_region(pp, lora_dir, tmp_path):
    other = _second_lora(lora_dir, tmp_path / "other")
    left = _routed_delta(pp, Composition([regional_subject(lora_dir, "left", name="a")]))
    assert left[:, :, 8:].max() == 0 and left[:, :, :8].max() > 0
    right = _routed_delta(pp, Composition([regional_subject(other, "right", name="b")]))
    assert right[:, :, :8].max() == 0 and right[:, :, 8:].max() > 0
    both = _routed_delta(
        pp,
        Composition(
            [regional_subject(lora_dir, "left", name="a"), regional_subject(other, "right", name="b")]
        ),
    )
    assert both[:, :, :8].max() > 0 and both[:, :, 8:].max() > 0
    # The subjects' peft adapters are gone once read: peft does not compute them a second time.
    assert not any(len(getattr(m, "lora_A", {})) for m in pp.pipe.unet.modules())


def test_pivotal_and_textual_inversion_subjects_share_a_word(pp, lora_dir, tmp_path):
    pivotal = _word_result(pp, tmp_path / "pivotal", seed=1, lora_dir=lora_dir)
    word = _word_result(pp, tmp_path / "word", seed=2)
    bare = _pixels(pp.generate(PROMPT, guidance_scale=4.0, **FAST))
    composition = Composition([regional_subject(pivotal, "left"), regional_subject(word, "right")])
    pp.add(composition)
    try:
        fused = pp.generate(PROMPT, guidance_scale=4.0, **FAST)
        tokenizer = pp.pipe.tokenizer
        assert "zwq" not in tokenizer.get_vocab()  # both learned words live under private names
    finally:
        pp.clear()
    assert np.abs(_pixels(fused) - bare).max() > 0
    assert [s["name"] for s in fused[0].settings["parts"][0]["subjects"]] == ["pivotal", "word"]
    assert "<pimg-pivotal-0>" not in pp.pipe.tokenizer.get_vocab()  # detached: the words are gone
    assert np.array_equal(_pixels(pp.generate(PROMPT, guidance_scale=4.0, **FAST)), bare)


def test_a_learned_word_missing_from_its_region_prompt_is_refused(pp, tmp_path):
    word = _word_result(pp, tmp_path / "word", seed=2)
    pp.add(Composition([regional_subject(word, "left", prompt="a star on a blue background")]))
    try:
        with pytest.raises(InputError, match="does not contain"):
            pp.generate(PROMPT, **FAST)
    finally:
        pp.clear()


def test_a_random_sdxl_pipeline_composes(random_sdxl_dir, tmp_path):
    from peft import LoraConfig

    from pimg.formats.lora import lora_state_dict_from_peft, save_lora
    from pimg.models import load_base

    folders = []
    for seed in (1, 2):
        pipe = load_base(str(random_sdxl_dir))
        torch.manual_seed(seed)
        pipe.unet.add_adapter(
            LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
        )
        with torch.no_grad():
            for name, p in pipe.unet.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.3)
        folder = tmp_path / f"s{seed}"
        save_lora(folder, lora_state_dict_from_peft(pipe.unet, "unet"))
        folders.append(folder)
    pp = PersonalizedPipeline.from_base(str(random_sdxl_dir))
    pp.pipe.set_progress_bar_config(disable=True)
    bare = _pixels(pp.generate("a star", guidance_scale=3.0, height=64, width=64, **FAST))
    pp.add(Composition([regional_subject(folders[0], "top"), regional_subject(folders[1], "bottom")]))
    fused = _pixels(pp.generate("a star", guidance_scale=3.0, height=64, width=64, **FAST))
    pp.clear()
    assert fused.shape == bare.shape and np.abs(fused - bare).max() > 0
    assert np.array_equal(
        _pixels(pp.generate("a star", guidance_scale=3.0, height=64, width=64, **FAST)), bare
    )


def test_a_subject_of_another_family_is_refused(random_tiny_dir, random_sdxl_dir, lora_dir):
    from pimg.errors import ModelLoadError

    pp = PersonalizedPipeline.from_base(str(random_sdxl_dir))
    with pytest.raises((ModelLoadError, InputError)):
        pp.add(Composition([regional_subject(lora_dir, "left")]))
    assert not pp.parts


def test_regions_names_boxes_masks_and_overlaps(tmp_path):
    from PIL import Image

    assert parse_region("left").box == (0.0, 0.0, 0.5, 1.0)
    assert parse_region("0.25,0,0.75,1").box == (0.25, 0.0, 0.75, 1.0)
    Image.fromarray(np.pad(np.full((10, 10), 255, np.uint8), ((0, 0), (0, 10)))).save(tmp_path / "m.png")
    weights, notes = region_weights([parse_region(tmp_path / "m.png")], 64, 64)
    assert "resized" in notes[0] and weights[0, :, :30].min() > 0.9 and weights[0, :, 36:].max() < 0.1
    weights, notes = region_weights([parse_region("left"), parse_region("0.25,0,1,1")], 64, 64)
    assert any("overlap" in n for n in notes)
    assert torch.allclose(weights.sum(0)[:, 16:32], torch.ones(64, 16))  # shared, never more than whole
    soft, _ = region_weights([parse_region("left", feather=0.1)], 64, 64)
    assert 0.1 < float(soft[0, 32, 32]) < 0.9
    assert [r.box for r in default_regions(2)] == [(0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)]
    for bad, message in (
        ("lfet", "Did you mean 'left'"),
        ("0.5,0,0.2,1", "x0 < x1"),
        ("nowhere.png", "not a region"),
    ):
        with pytest.raises(InputError, match=message):
            parse_region(bad)
    with pytest.raises(InputError, match="give each subject a region"):
        default_regions(5)


def test_whole_model_and_empty_subjects_are_refused(lora_dir):
    with pytest.raises(InputError, match="nothing to apply"):
        RegionalSubject("x", [], parse_region("left"))
    with pytest.raises(InputError, match="names must differ"):
        Composition(
            [regional_subject(lora_dir, "left", name="a"), regional_subject(lora_dir, "right", name="a")]
        )


def test_pimg_compose_writes_images(random_tiny_dir, lora_dir, tmp_path):
    from pimg.frontends.cli import main
    from pimg.inference.pipeline import read_png_settings

    other = _second_lora(lora_dir, tmp_path / "other")
    out = tmp_path / "out"
    code = main(
        ["compose", "--base", str(random_tiny_dir), "--subject", f"{lora_dir}:left", "--subject", f"{other}:0.5,0,1,1",
         "--region-prompt", "a zwq star on a blue background", "--prompt", PROMPT, "--steps", "2", "--out", str(out)]
    )  # fmt: skip
    assert code == 0
    settings = read_png_settings(next(out.glob("*.png")))
    subjects = settings["parts"][0]["subjects"]
    assert [s["region"] for s in subjects] == ["left", "0.5,0,1,1"]
    assert subjects[0]["prompt"] == "a zwq star on a blue background"
    code = main(["compose", "--base", str(random_tiny_dir), "--subject", f"{lora_dir}:left", "--subject", str(other),
                 "--prompt", PROMPT, "--out", str(out)])  # fmt: skip
    assert code == 2
