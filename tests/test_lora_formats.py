"""LoRA file layouts: diffusers <-> kohya conversion, alpha folding, validation, loading into diffusers."""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from peft import LoraConfig

from pimg.errors import InputError, ModelLoadError
from pimg.formats.lora import (
    DIFFUSERS_LORA_FILENAME,
    KOHYA_LORA_FILENAME,
    detect_lora_format,
    diffusers_to_kohya,
    kohya_module_map,
    kohya_to_diffusers,
    load_lora_state_dict,
    lora_state_dict_from_peft,
    read_safetensors,
    read_safetensors_metadata,
    save_lora,
    validate_lora,
)

# Letters, digits and a little punctuation, each also as a word end ("a</w>") like CLIP's vocabulary.
_CHARS = string.ascii_lowercase + string.digits + "<>_-.,!*"


def write_tiny_tokenizer(folder: Path) -> int:
    """Write a CLIP vocab.json/merges.txt with single characters only; returns the vocabulary size."""
    tokens = [*_CHARS, *(c + "</w>" for c in _CHARS), "<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return len(tokens)


@dataclass(frozen=True)
class TinySD:
    """Factories for a tiny seeded SD 1.x-shaped model; every call builds a fresh copy with equal weights."""

    tokenizer_dir: Path
    vocab_size: int

    def tokenizer(self):
        from transformers import CLIPTokenizer

        return CLIPTokenizer.from_pretrained(self.tokenizer_dir, model_max_length=77)

    def text_encoder(self):
        from transformers import CLIPTextConfig, CLIPTextModel

        torch.manual_seed(0)
        ids = dict(
            bos_token_id=self.vocab_size - 2,
            eos_token_id=self.vocab_size - 1,
            pad_token_id=self.vocab_size - 1,
        )
        config = CLIPTextConfig(
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            max_position_embeddings=77,
            vocab_size=self.vocab_size,
            **ids,
        )
        return CLIPTextModel(config).eval()

    def unet(self, cross_attention_dim: int = 32):
        from diffusers import UNet2DConditionModel

        torch.manual_seed(0)
        return UNet2DConditionModel(
            block_out_channels=(32, 64),
            layers_per_block=1,
            sample_size=8,
            in_channels=4,
            out_channels=4,
            cross_attention_dim=cross_attention_dim,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=8,
            norm_num_groups=8,
        ).eval()

    def pipeline(self):
        from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline

        torch.manual_seed(0)
        vae = AutoencoderKL(
            block_out_channels=(8,),
            down_block_types=("DownEncoderBlock2D",),
            up_block_types=("UpDecoderBlock2D",),
            latent_channels=4,
            norm_num_groups=8,
        )
        return StableDiffusionPipeline(
            vae=vae,
            text_encoder=self.text_encoder(),
            tokenizer=self.tokenizer(),
            unet=self.unet(),
            scheduler=DDIMScheduler(steps_offset=1, clip_sample=False),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory) -> TinySD:
    folder = tmp_path_factory.mktemp("tiny_tokenizer")
    return TinySD(tokenizer_dir=folder, vocab_size=write_tiny_tokenizer(folder))


UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
Q_KEY = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


def _randomise_lora_b(model: torch.nn.Module, seed: int) -> None:
    # peft starts lora_B at zero, which would make every LoRA a no-op and every comparison pass.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def _unet_out(unet) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(1, 4, 8, 8, generator=generator)
    context = torch.randn(1, 5, unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        return unet(sample, 10, encoder_hidden_states=context).sample


def _text_out(text_encoder) -> torch.Tensor:
    with torch.no_grad():
        return text_encoder(torch.tensor([[88, 3, 5, 7, 89]])).last_hidden_state


@pytest.fixture(scope="module")
def trained(tiny_sd):
    """A 'trained' LoRA: random adapters with lora_alpha != r on the UNet and the text encoder."""
    unet, text_encoder = tiny_sd.unet(), tiny_sd.text_encoder()
    unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=UNET_TARGETS), adapter_name="default")
    text_encoder.add_adapter(
        LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "v_proj"]), adapter_name="te"
    )
    _randomise_lora_b(unet, seed=2)
    _randomise_lora_b(text_encoder, seed=3)
    state_dict = lora_state_dict_from_peft(unet, "unet") | lora_state_dict_from_peft(
        text_encoder, "text_encoder", adapter_name="te"
    )
    return {
        "state_dict": state_dict,
        "unet_out": _unet_out(unet),
        "text_out": _text_out(text_encoder),
        "components": {"unet": tiny_sd.unet(), "text_encoder": tiny_sd.text_encoder()},
    }


def test_peft_export_uses_diffusers_key_names(trained):
    keys = trained["state_dict"].keys()
    assert f"{Q_KEY}.lora_A.weight" in keys
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_B.weight" in keys
    # transformers 5 flattened CLIPTextModel; files keep the `text_model.` level for portability.
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight" in keys
    # A and B x (4 targets x 2 attentions x 4 transformer blocks (down 1, mid 1, up 2) + 2 targets x 2 layers)
    assert len(keys) == 2 * (4 * 2 * 4 + 2 * 2)
    assert detect_lora_format(trained["state_dict"]) == "diffusers"


def test_diffusers_kohya_round_trip_is_exact(trained):
    state_dict, components = trained["state_dict"], trained["components"]
    kohya = diffusers_to_kohya(state_dict, components)

    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert f"{name}.lora_down.weight" in kohya and f"{name}.lora_up.weight" in kohya
    assert kohya[f"{name}.alpha"].item() == 4.0
    assert "lora_te_text_model_encoder_layers_1_self_attn_v_proj.alpha" in kohya
    assert "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_out_0.lora_up.weight" in kohya
    assert detect_lora_format(kohya) == "kohya"

    back = kohya_to_diffusers(kohya, components)
    assert back.keys() == state_dict.keys()
    for key, value in state_dict.items():
        assert torch.equal(back[key], value), key


def test_kohya_alpha_is_folded_into_lora_b(trained):
    components = trained["components"]
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"
    down, up = torch.randn(4, 32), torch.randn(32, 4, dtype=torch.float16)
    with_alpha = {
        f"{name}.lora_down.weight": down,
        f"{name}.lora_up.weight": up,
        f"{name}.alpha": torch.tensor(1.0),
    }
    converted = kohya_to_diffusers(with_alpha, components)
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"
    assert torch.equal(converted[f"{key}.lora_A.weight"], down)
    assert converted[f"{key}.lora_B.weight"].dtype == torch.float16
    torch.testing.assert_close(converted[f"{key}.lora_B.weight"], (up.float() * 0.25).half())

    without_alpha = kohya_to_diffusers({k: v for k, v in with_alpha.items() if "alpha" not in k}, components)
    assert torch.equal(without_alpha[f"{key}.lora_B.weight"], up)


def test_kohya_module_map_walks_the_real_tree(tiny_sd):
    mapping = kohya_module_map("lora_te", tiny_sd.text_encoder())
    assert (
        mapping["lora_te_text_model_encoder_layers_0_self_attn_q_proj"] == "encoder.layers.0.self_attn.q_proj"
    )
    unet_map = kohya_module_map("lora_unet", tiny_sd.unet())
    assert unet_map["lora_unet_up_blocks_1_attentions_0_proj_in"] == "up_blocks.1.attentions.0.proj_in"
    assert unet_map["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_out_0"].endswith(
        "to_out.0"
    )


def test_lora_loaded_from_kohya_file_matches_diffusers_dict_and_live_model(trained, tiny_sd, tmp_path):
    state_dict, components = trained["state_dict"], trained["components"]
    save_lora(tmp_path, state_dict, kohya_components=components, metadata={"pimg.rank": 4})

    from_dict = tiny_sd.pipeline()
    from_dict.load_lora_weights(state_dict, adapter_name="subject")
    from_kohya = tiny_sd.pipeline()
    kohya_state_dict = load_lora_state_dict(tmp_path / KOHYA_LORA_FILENAME, components)
    from_kohya.load_lora_weights(kohya_state_dict, adapter_name="subject_kohya")

    out_dict, out_kohya = _unet_out(from_dict.unet), _unet_out(from_kohya.unet)
    assert (out_dict - out_kohya).abs().max() < 1e-5
    assert (out_dict - trained["unet_out"]).abs().max() < 1e-5  # alpha/r = 2 folded correctly
    assert (out_dict - _unet_out(tiny_sd.unet())).abs().max() > 1e-3  # the LoRA does something
    text_dict, text_kohya = _text_out(from_dict.text_encoder), _text_out(from_kohya.text_encoder)
    assert (text_dict - text_kohya).abs().max() < 1e-5
    assert (text_dict - trained["text_out"]).abs().max() < 1e-5
    assert (text_dict - _text_out(tiny_sd.text_encoder())).abs().max() > 1e-3


def test_diffusers_reads_the_saved_folder_directly(trained, tiny_sd, tmp_path):
    # The folder also holds the kohya export; diffusers must still pick pytorch_lora_weights.safetensors,
    # and pimg's metadata must not be read as a LoraConfig (which would rescale the folded weights).
    save_lora(
        tmp_path, trained["state_dict"], kohya_components=trained["components"], metadata={"pimg.rank": 4}
    )
    pipe = tiny_sd.pipeline()
    pipe.load_lora_weights(tmp_path, adapter_name="subject")
    assert (_unet_out(pipe.unet) - trained["unet_out"]).abs().max() < 1e-5
    assert (_text_out(pipe.text_encoder) - trained["text_out"]).abs().max() < 1e-5


def test_save_lora_writes_metadata_atomically(trained, tmp_path):
    path = save_lora(tmp_path / "run", trained["state_dict"], metadata={"pimg.base": "sd15", "pimg.rank": 4})
    assert path == tmp_path / "run" / DIFFUSERS_LORA_FILENAME
    assert sorted(p.name for p in path.parent.iterdir()) == [DIFFUSERS_LORA_FILENAME]  # no temp file left
    assert read_safetensors_metadata(path) == {"pimg.base": "sd15", "pimg.rank": "4"}
    assert read_safetensors(path).keys() == trained["state_dict"].keys()

    with pytest.raises(InputError, match="lora_adapter_metadata"):
        save_lora(tmp_path, trained["state_dict"], metadata={"lora_adapter_metadata": "{}"})
    with pytest.raises(InputError, match="kohya_to_diffusers"):
        save_lora(tmp_path, diffusers_to_kohya(trained["state_dict"], trained["components"]))


def test_validate_names_first_layer_of_a_lora_for_another_unet(tiny_sd, trained):
    other = tiny_sd.unet(cross_attention_dim=48)
    other.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=UNET_TARGETS))
    foreign = lora_state_dict_from_peft(other, "unet")

    with pytest.raises(ModelLoadError) as error:
        validate_lora(foreign, trained["components"])
    message = str(error.value)
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight" in message
    assert "expected shape [4, 32], found [4, 48]" in message
    assert "--base" in message


def test_kohya_lora_for_another_base_is_refused(trained, tmp_path, tiny_sd):
    other = tiny_sd.unet(cross_attention_dim=48)
    other.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=UNET_TARGETS))
    save_lora(tmp_path, lora_state_dict_from_peft(other, "unet"), kohya_components={"unet": other})
    with pytest.raises(ModelLoadError, match="attn2.to_k.lora_A.weight"):
        load_lora_state_dict(tmp_path / KOHYA_LORA_FILENAME, trained["components"])


@pytest.mark.parametrize(
    ("state_dict", "match"),
    [
        (
            {"text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 32)},
            "SDXL",
        ),
        (
            {"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 32)},
            "SDXL",
        ),
        ({"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.zeros(4, 32)}, "SGM"),
        ({"lora_unet_no_such_layer.lora_down.weight": torch.zeros(4, 32)}, "names no layer"),
        ({"lora_unet_mid_block_attentions_0_proj_in.hada_w1_a": torch.zeros(4, 32)}, "LyCORIS"),
        ({"model.diffusion_model.input_blocks.0.weight": torch.zeros(1)}, "first keys: 'model.diffusion"),
    ],
)
def test_foreign_layouts_fail_with_a_reason(trained, state_dict, match):
    with pytest.raises(ModelLoadError, match=match):
        if detect_lora_format(state_dict) == "kohya":
            kohya_to_diffusers(state_dict, trained["components"])
        else:
            validate_lora(state_dict, trained["components"])


def test_older_diffusers_spelling_is_accepted(trained, tmp_path):
    old = {
        k.replace(".lora_A.weight", ".lora.down.weight").replace(".lora_B.weight", ".lora.up.weight"): v
        for k, v in trained["state_dict"].items()
    }
    assert detect_lora_format(old) == "diffusers"
    from safetensors.torch import save_file

    save_file(old, tmp_path / "old.safetensors")
    loaded = load_lora_state_dict(tmp_path / "old.safetensors", trained["components"])
    assert loaded.keys() == trained["state_dict"].keys()


@pytest.mark.parametrize("damage", ["truncated", "empty", "text", "missing", "pickle"])
def test_damaged_files_raise_model_load_error(trained, tmp_path, damage):
    good = save_lora(tmp_path / "good", trained["state_dict"])
    bad = tmp_path / "bad.safetensors"
    if damage == "truncated":
        data = good.read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        bad.write_bytes(b"")
    elif damage == "text":
        bad.write_text("this is a README, not weights\n" * 20)
    elif damage == "pickle":
        bad = tmp_path / "bad.bin"
        torch.save({"a": object}, bad)  # a pickled class: refused by weights_only
    with pytest.raises(ModelLoadError, match="bad\\.(safetensors|bin)"):
        load_lora_state_dict(bad, trained["components"])


def test_folder_without_lora_file_lists_what_is_there(trained, tmp_path):
    (tmp_path / "other.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="other.safetensors"):
        load_lora_state_dict(tmp_path, trained["components"])


def test_peft_export_refuses_unknown_adapter(tiny_sd):
    unet = tiny_sd.unet()
    unet.add_adapter(LoraConfig(r=4, target_modules=UNET_TARGETS), adapter_name="subject")
    with pytest.raises(InputError, match="adapters: subject"):
        lora_state_dict_from_peft(unet, "unet", adapter_name="default")
