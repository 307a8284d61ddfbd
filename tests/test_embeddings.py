"""Textual Inversion files: diffusers and A1111 forms, checks, and loading with diffusers."""

from __future__ import annotations

import json
import string

import pytest
import torch
from safetensors.torch import save_file

from pimg.errors import InputError, ModelLoadError
from pimg.formats.embeddings import check_embedding, multi_vector_tokens, read_embedding_file, save_embedding

# Single characters (and their word-end forms, "a</w>") plus the whole word "sks", built by two merges,
# so one test can meet a token that already exists.
_CHARS = string.ascii_lowercase + string.digits + "<>_-.,!*"
_MERGES = [("s", "k"), ("sk", "s</w>")]


class TinyClip:
    """A tiny CLIP tokenizer + text encoder, fresh and equal on every call (tests add tokens to them)."""

    def __init__(self, folder):
        tokens = [*_CHARS, *(c + "</w>" for c in _CHARS), *("".join(m) for m in _MERGES)]
        tokens += ["<|startoftext|>", "<|endoftext|>"]
        (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
        (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in _MERGES))
        self.folder, self.vocab_size = folder, len(tokens)

    def tokenizer(self):
        from transformers import CLIPTokenizer

        return CLIPTokenizer.from_pretrained(self.folder, model_max_length=77)

    def text_encoder(self):
        from transformers import CLIPTextConfig, CLIPTextModel

        torch.manual_seed(0)
        # vocab_size == len(tokenizer): load_textual_inversion resizes the table to len(tokenizer) + new
        # tokens, which would cut a larger table.
        n = self.vocab_size
        config = CLIPTextConfig(
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            max_position_embeddings=77,
            vocab_size=n,
            bos_token_id=n - 2,
            eos_token_id=n - 1,
            pad_token_id=n - 1,
        )
        return CLIPTextModel(config).eval()

    def pipeline(self):
        """The smallest pipeline diffusers' TextualInversionLoaderMixin works on: a tokenizer and a text encoder."""
        from diffusers import DiffusionPipeline
        from diffusers.loaders import TextualInversionLoaderMixin

        class TextOnlyPipeline(DiffusionPipeline, TextualInversionLoaderMixin):
            def __init__(self, tokenizer, text_encoder):
                super().__init__()
                self.register_modules(tokenizer=tokenizer, text_encoder=text_encoder)

        return TextOnlyPipeline(self.tokenizer(), self.text_encoder())


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory) -> TinyClip:
    return TinyClip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="module")
def vectors() -> torch.Tensor:
    return torch.randn(2, 32, generator=torch.Generator().manual_seed(0))


def test_diffusers_and_a1111_forms_read_the_same(tmp_path, vectors):
    diffusers_file = save_embedding(tmp_path / "learned_embeds.safetensors", "<cat>", vectors)
    a1111_file = tmp_path / "foo.pt"
    torch.save(
        {"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": "foo", "step": 100},
        a1111_file,
    )
    bin_file = tmp_path / "learned_embeds.bin"
    torch.save({"<cat>": vectors}, bin_file)
    emb_params_file = tmp_path / "my-style.safetensors"
    save_file({"emb_params": vectors}, emb_params_file)

    assert read_embedding_file(a1111_file).keys() == {"foo"}
    assert read_embedding_file(emb_params_file).keys() == {"my-style"}
    assert read_embedding_file(tmp_path).keys() == {"<cat>"}  # a folder holding learned_embeds.safetensors
    for path in (diffusers_file, a1111_file, bin_file, emb_params_file):
        read = read_embedding_file(path, token="<x>")
        assert read.keys() == {"<x>"}
        assert torch.equal(read["<x>"], vectors), path.name


def test_single_vector_becomes_one_row(tmp_path):
    path = tmp_path / "one.bin"
    torch.save({"<one>": torch.ones(32)}, path)
    assert read_embedding_file(path)["<one>"].shape == (1, 32)


@pytest.mark.parametrize("form", ["truncated", "text", "two_keys", "sdxl", "pickle"])
def test_unreadable_or_unknown_files_raise_model_load_error(tmp_path, vectors, form):
    path = tmp_path / "bad.safetensors"
    if form == "truncated":
        data = save_embedding(tmp_path / "good.safetensors", "<cat>", vectors).read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif form == "text":
        path.write_text("not an embedding\n" * 20)
    elif form == "two_keys":
        save_file({"a": vectors, "b": vectors.clone()}, path)
    elif form == "sdxl":
        save_file({"clip_l": vectors, "clip_g": vectors.clone()}, path)
    elif form == "pickle":
        path = tmp_path / "bad.pt"
        torch.save({"string_to_param": {"*": vectors}, "cls": object}, path)  # refused by weights_only
    with pytest.raises(ModelLoadError, match="bad\\.(safetensors|pt)"):
        read_embedding_file(path)


def test_existing_tokens_are_refused(tiny_sd, vectors):
    tokenizer, text_encoder = tiny_sd.tokenizer(), tiny_sd.text_encoder()
    check_embedding(tokenizer, text_encoder, "<new>", vectors)  # free token: no error

    with pytest.raises(InputError, match="token 'sks' already exists .* --embedding PATH:NEWTOKEN"):
        check_embedding(tokenizer, text_encoder, "sks", vectors)  # a whole word of the vocabulary ("sks</w>")
    tokenizer.add_tokens(["<cat>_1"])
    with pytest.raises(InputError, match="'<cat>_1'"):
        check_embedding(tokenizer, text_encoder, "<cat>", vectors)  # second vector's token is taken
    check_embedding(tokenizer, text_encoder, "<cat>", vectors[:1])  # one vector needs only "<cat>"


def test_wrong_width_names_both_widths(tiny_sd):
    with pytest.raises(ModelLoadError, match="width 768.*width 32.*SD 1.x"):
        check_embedding(tiny_sd.tokenizer(), tiny_sd.text_encoder(), "<new>", torch.zeros(1, 768))


def test_saved_embedding_loads_with_diffusers(tiny_sd, tmp_path, vectors):
    pipe = tiny_sd.pipeline()
    check_embedding(pipe.tokenizer, pipe.text_encoder, "<cat>", vectors)
    path = save_embedding(tmp_path / "run", "<cat>", vectors)
    rows_before = pipe.text_encoder.get_input_embeddings().weight.shape[0]

    pipe.load_textual_inversion(str(path))

    table = pipe.text_encoder.get_input_embeddings().weight
    assert table.shape[0] == rows_before + 2
    for token, vector in zip(multi_vector_tokens("<cat>", 2), vectors, strict=True):
        assert torch.equal(table[pipe.tokenizer.convert_tokens_to_ids(token)], vector)
    # diffusers expands the token to its vectors in prompts
    assert pipe.maybe_convert_prompt("a <cat> toy", pipe.tokenizer) == "a <cat> <cat>_1 toy"
    with pytest.raises(InputError, match="'<cat>' already exists"):
        check_embedding(pipe.tokenizer, pipe.text_encoder, "<cat>", vectors)
