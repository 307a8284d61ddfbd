"""The Part contract (`pimg.inference.parts`), run for every part type pimg ships.

A new part type (a predicted LoRA, an ID adapter, regional fusion) joins the contract by adding a
factory to `PART_FACTORIES`: the same tests then run on it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pimg.errors import InputError
from pimg.formats.safetensors_io import read_safetensors
from pimg.inference.parts import EmbeddingPart, LoraPart, Part, merge_call_arguments
from pimg.inference.pipeline import PersonalizedPipeline

FAST = dict(num_inference_steps=3, guidance_scale=4.0, num_images=2, seed=11)
PROMPT = "a zwq star on a blue background"


def _embedding_file(pp, folder):
    from pimg.formats.embeddings import save_embedding

    torch.manual_seed(3)
    return save_embedding(
        folder / "learned_embeds.safetensors", "zwq", torch.randn(2, pp.pipe.text_encoder.config.hidden_size)
    )


#: Part type -> factory(pp, lora_dir, tmp_path) -> a fresh part. Later parts register here.
PART_FACTORIES = {
    "lora-file": lambda pp, lora_dir, tmp: LoraPart(lora_dir, scale=0.7, name="from_file"),
    "lora-memory": lambda pp, lora_dir, tmp: LoraPart(
        read_safetensors(lora_dir / "pytorch_lora_weights.safetensors"), scale=0.7, name="in_memory"
    ),
    "lora-kohya-memory": lambda pp, lora_dir, tmp: LoraPart(
        read_safetensors(lora_dir / "lora_kohya.safetensors"), name="kohya_in_memory"
    ),
    "embedding": lambda pp, lora_dir, tmp: EmbeddingPart(_embedding_file(pp, tmp)),
    "composition": lambda pp, lora_dir, tmp: _composition(pp, lora_dir, tmp),
    "id-adapter-faceid": lambda pp, lora_dir, tmp: _faceid(pp, tmp),
    "hm-cfg": lambda pp, lora_dir, tmp: _hybrid_guidance(lora_dir),
}


def _hybrid_guidance(lora_dir):
    from pimg.inference.hybrid_guidance import HybridGuidance

    # HM-CFG routes UNet layers only: the fixture LoRA without its text-encoder half
    weights = read_safetensors(lora_dir / "pytorch_lora_weights.safetensors")
    unet_only = {key: value for key, value in weights.items() if key.startswith("unet.")}
    return HybridGuidance(LoraPart(unet_only, name="personalised"), subject_scale=1.5)


def _faceid(pp, folder):
    from conftest import random_faceid_weights

    from pimg.inference.id_adapter import IdAdapterPart

    path = folder / "ip-adapter-faceid_sd15.bin"
    torch.save(random_faceid_weights(pp.pipe.unet), path)
    return IdAdapterPart(path, torch.randn(512, generator=torch.Generator().manual_seed(0)))


def _composition(pp, lora_dir, folder):
    from pimg.fusion import Composition, RegionalSubject, parse_region

    word = EmbeddingPart(_embedding_file(pp, folder))
    return Composition(
        [
            RegionalSubject("left_lora", [LoraPart(lora_dir, name="left_lora")], parse_region("left")),
            RegionalSubject("right_word", [word], parse_region("right")),
        ]
    )


def _pixels(generated) -> np.ndarray:
    return np.stack([np.asarray(g.image, dtype=np.int16) for g in generated])


@pytest.fixture(scope="module")
def pp(random_tiny_dir):
    pipe = PersonalizedPipeline.from_base(str(random_tiny_dir))
    pipe.pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def bare(pp):
    return _pixels(pp.generate(PROMPT, **FAST))


@pytest.fixture(scope="module")
def half_pp(random_tiny_dir):
    """The pipeline in bfloat16, as `pimg` runs on a GPU (CPUs compute bfloat16 too, slowly)."""
    pipe = PersonalizedPipeline.from_base(str(random_tiny_dir), dtype=torch.bfloat16)
    pipe.pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("kind", sorted(PART_FACTORIES))
def test_every_part_generates_in_half_precision(half_pp, lora_dir, tmp_path, kind):
    bare_half = _pixels(half_pp.generate(PROMPT, **FAST))
    part = PART_FACTORIES[kind](half_pp, lora_dir, tmp_path)
    half_pp.add(part)
    try:
        with_part = _pixels(half_pp.generate(PROMPT, **FAST))
    finally:
        half_pp.remove(part.name)
    assert np.abs(with_part - bare_half).max() > 0  # it ran, in bfloat16, and did something


@pytest.mark.parametrize("kind", sorted(PART_FACTORIES))
def test_attach_then_detach_gives_the_images_of_before(pp, bare, lora_dir, tmp_path, kind):
    part = PART_FACTORIES[kind](pp, lora_dir, tmp_path)
    pp.add(part)
    try:
        with_part = pp.generate(PROMPT, **FAST)
        described = with_part[0].settings["parts"]
    finally:
        pp.remove(part.name)
    assert np.abs(_pixels(with_part) - bare).max() > 0  # the part does something
    assert np.array_equal(_pixels(pp.generate(PROMPT, **FAST)), bare)  # and leaves nothing behind
    assert json.loads(json.dumps(described)) == [part.describe()]
    assert described[0]["kind"] == part.kind and described[0]["name"] == part.name


def test_in_memory_lora_equals_the_file(pp, lora_dir):
    from_file = PART_FACTORIES["lora-file"](pp, lora_dir, None)
    pp.add(from_file)
    a = _pixels(pp.generate(PROMPT, **FAST))
    pp.remove(from_file.name)
    memory = PART_FACTORIES["lora-memory"](pp, lora_dir, None)
    pp.add(memory)
    b = _pixels(pp.generate(PROMPT, **FAST))
    pp.remove(memory.name)
    assert np.array_equal(a, b)
    assert memory.describe()["source"].startswith("in memory")
    with pytest.raises(InputError, match="needs a name"):
        LoraPart({"x": torch.zeros(1)})


def test_two_different_parts_work_together(pp, bare, lora_dir, tmp_path):
    lora = PART_FACTORIES["lora-file"](pp, lora_dir, tmp_path)
    word = PART_FACTORIES["embedding"](pp, lora_dir, tmp_path)
    singles = []
    for part in (lora, word):
        pp.add(part)
        singles.append(_pixels(pp.generate(PROMPT, **FAST)))
        pp.remove(part.name)
    pp.add(lora)
    pp.add(word)
    try:
        both = pp.generate(PROMPT, **FAST)
    finally:
        pp.clear()
    assert all(np.abs(_pixels(both) - single).max() > 0 for single in singles)
    assert [p["kind"] for p in both[0].settings["parts"]] == ["lora", "embedding"]
    assert np.array_equal(_pixels(pp.generate(PROMPT, **FAST)), bare)


class OwnAdapterPart(Part):
    """Owns a peft adapter without being a LoraPart (as an ID adapter's companion LoRA does)."""

    kind = "own-adapter"

    def __init__(self, lora_dir):
        super().__init__("companion")
        self.state = read_safetensors(lora_dir / "pytorch_lora_weights.safetensors")

    def attach(self, pipe):
        pipe.load_lora_weights(dict(self.state), adapter_name="companion_lora")

    def detach(self, pipe):
        pipe.delete_adapters("companion_lora")

    def adapters(self):
        return {"companion_lora": 0.5}


def test_adapters_of_every_part_stay_active(pp, lora_dir):
    from peft.tuners.tuners_utils import BaseTunerLayer

    pp.add(OwnAdapterPart(lora_dir))
    pp.add(PART_FACTORIES["lora-file"](pp, lora_dir, None))
    try:
        layer = next(m for m in pp.pipe.unet.modules() if isinstance(m, BaseTunerLayer))
        # Adding the LoraPart did not switch the other part's adapter off.
        assert set(layer.active_adapters) == {"companion_lora", "from_file"}
        assert layer.scaling["companion_lora"] != 0
        with pytest.raises(InputError, match="both claim the peft adapter 'companion_lora'"):
            clash = OwnAdapterPart(lora_dir)
            clash.name = "clash"
            clash.attach = lambda pipe: None
            clash.detach = lambda pipe: None
            pp.add(clash)
        assert "clash" not in pp.parts
    finally:
        pp.clear()


class ArgumentPart(Part):
    """Adds call arguments and a per-step callback, and takes a prompt of its own."""

    kind = "arguments"
    takes_prompt = True

    def __init__(self, name, attention_kwargs, **arguments):
        super().__init__(name)
        self.attention_kwargs, self.arguments = attention_kwargs, arguments
        self.steps: list[int] = []
        self.calls = []

    def attach(self, pipe):
        pass

    def detach(self, pipe):
        pass

    def call_arguments(self, call):
        self.calls.append(call)
        return {"cross_attention_kwargs": dict(self.attention_kwargs), **self.arguments}

    def step_callback(self, call):
        def record(pipe, step, timestep, tensors):
            self.steps.append(step)
            return tensors

        return record


def test_call_arguments_merge_and_conflicts_name_both_parts():
    merged = merge_call_arguments(
        {"prompt": "x", "guidance_scale": 3.0},
        [("a", {"cross_attention_kwargs": {"p": 1}}), ("b", {"cross_attention_kwargs": {"q": 2}})],
    )
    assert merged["cross_attention_kwargs"] == {"p": 1, "q": 2}
    with pytest.raises(InputError, match="'a' and 'b' both set cross_attention_kwargs\\['p'\\]"):
        merge_call_arguments(
            {}, [("a", {"cross_attention_kwargs": {"p": 1}}), ("b", {"cross_attention_kwargs": {"p": 2}})]
        )
    with pytest.raises(
        InputError, match="'the pipeline' and 'b' both set the pipeline argument 'guidance_scale'"
    ):
        merge_call_arguments({"guidance_scale": 3.0}, [("b", {"guidance_scale": 5.0})])
    same = merge_call_arguments({}, [("a", {"eta": 0.0}), ("b", {"eta": 0.0})])
    assert same == {"eta": 0.0}


def test_parts_arguments_callbacks_and_prompts_reach_the_call(pp, bare):
    # Two parts both give cross_attention_kwargs (merged; "scale" 1.0 is the LoRA scale diffusers reads,
    # so the images stay as they were) and each gets its per-step callback, beside the progress callback.
    first = ArgumentPart("first", {"scale": 1.0})
    second = ArgumentPart("second", {"scale": 1.0})
    pp.add(first)
    pp.add(second)
    progress = []
    try:
        images = pp.generate(
            PROMPT, part_prompts={"second": "a zwq circle"}, callback=lambda s, n: progress.append(s), **FAST
        )
        assert np.array_equal(_pixels(images), bare)
        assert first.steps == second.steps == [0, 1, 2] and progress == [1, 2, 3]
        assert second.calls[-1].part_prompts == {"second": "a zwq circle"}
        assert second.calls[-1].prompts == [PROMPT, PROMPT] and second.calls[-1].seeds == [11, 12]
        assert images[0].settings["part_prompts"] == {"second": "a zwq circle"}
        with pytest.raises(InputError, match="prompt was given for part 'nobody'.*first, second"):
            pp.generate(PROMPT, part_prompts={"nobody": "x"}, **FAST)
        pp.add(ArgumentPart("third", {"scale": 0.5}))
        with pytest.raises(
            InputError, match="'first and second' and 'third' both set cross_attention_kwargs"
        ):
            pp.generate(PROMPT, **FAST)
    finally:
        pp.clear()


class NoiseHookPart(Part):
    """Wraps the noise prediction: counts UNet evaluations and optionally scales the prediction."""

    kind = "noise-hook"

    def __init__(self, factor: float = 1.0):
        super().__init__("noise_hook")
        self.factor, self.evaluations, self.batch_sizes = factor, 0, []

    def attach(self, pipe):
        pass

    def detach(self, pipe):
        pass

    def wrap_noise_prediction(self, predict, call):
        def wrapped(sample, timestep, encoder_hidden_states=None, *args, **kwargs):
            self.evaluations += 1
            self.batch_sizes.append(sample.shape[0])
            return predict(sample, timestep, encoder_hidden_states, *args, **kwargs) * self.factor

        return wrapped


def test_noise_prediction_hook_sees_every_step_and_can_change_it(pp, bare):
    unet = pp.pipe.unet
    identity = NoiseHookPart(1.0)
    pp.add(identity)
    try:
        assert np.array_equal(_pixels(pp.generate(PROMPT, **FAST)), bare)
    finally:
        pp.clear()
    # 3 steps, one batched UNet call each: 2 images x (unconditional + conditional) rows.
    assert identity.evaluations == 3 and identity.batch_sizes == [4, 4, 4]
    assert pp.pipe.unet is unet and not Part("x").changes_noise_prediction()
    damped = NoiseHookPart(0.5)
    pp.add(damped)
    try:
        assert np.abs(_pixels(pp.generate(PROMPT, **FAST)) - bare).max() > 0
    finally:
        pp.clear()
    assert pp.pipe.unet is unet


def test_list_of_prompts_with_seeds_matches_single_calls(pp):
    batch = pp.generate([PROMPT, "a zwq circle"], num_inference_steps=3, guidance_scale=4.0, seeds=[5, 9])
    alone = pp.generate("a zwq circle", num_inference_steps=3, guidance_scale=4.0, seed=9)
    assert [g.settings["prompt"] for g in batch] == [PROMPT, "a zwq circle"]
    assert [g.settings["seed"] for g in batch] == [5, 9]
    assert np.abs(_pixels(batch[1:]) - _pixels(alone)).max() <= 1
    with pytest.raises(InputError, match="seeds: 1 given for 2 images"):
        pp.generate([PROMPT, PROMPT], seeds=[1])


@pytest.mark.parametrize("guidance", [float("nan"), float("inf"), -1.0])
def test_non_finite_or_negative_guidance_is_refused(pp, guidance):
    with pytest.raises(InputError, match="guidance_scale must be a finite number >= 0"):
        pp.generate(PROMPT, num_inference_steps=2, guidance_scale=guidance)


def test_a_lora_in_a_folder_named_like_a_module_method_loads(pp, bare, lora_dir, tmp_path):
    # `pimg train` writes to out/train by default; the adapter cannot be called "train" (nn.Module.train).
    folder = tmp_path / "train"
    folder.mkdir()
    (folder / "pytorch_lora_weights.safetensors").write_bytes(
        (lora_dir / "pytorch_lora_weights.safetensors").read_bytes()
    )
    part = pp.add(LoraPart(folder))
    try:
        assert part.name == "train" and list(part.adapters()) == ["train_lora"]
        assert np.abs(_pixels(pp.generate(PROMPT, **FAST)) - bare).max() > 0
    finally:
        pp.remove("train")
    assert np.array_equal(_pixels(pp.generate(PROMPT, **FAST)), bare)
