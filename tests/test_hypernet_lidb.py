"""The LiDB weight space: bases, flat layout, expansion to a LoRA, and per-row application in a UNet call."""

from __future__ import annotations

import pytest
import torch

from pimg.errors import InputError
from pimg.hypernets.lidb import LidbConfig, LidbSpace, apply_per_sample, save_lidb_lora

# Factor scale that makes the LoRA's effect on the random UNet plainly visible (delta weights about the
# size of the base weights), so "equal to peft" cannot pass by both being the base.
FACTOR_STD = 0.3


@pytest.fixture(scope="module")
def pipe(random_tiny_dir):
    from pimg.models import load_base

    pipe = load_base(str(random_tiny_dir))
    pipe.unet.requires_grad_(False)
    return pipe


@pytest.fixture(scope="module")
def space(pipe):
    return LidbSpace.from_unet(pipe.unet, LidbConfig(seed=0))


@pytest.fixture(scope="module")
def unet_inputs(pipe):
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 16, 16, generator=generator)
    text = torch.randn(2, 8, pipe.unet.config.cross_attention_dim, generator=generator)
    return latents, torch.tensor(500), text


def _subject(space, seed, batch=()):
    flat = torch.randn(*batch, space.size, generator=torch.Generator().manual_seed(seed)) * FACTOR_STD
    return space.split(flat)


def _unet(pipe, latents, timestep, text):
    return pipe.unet(latents, timestep, encoder_hidden_states=text).sample


def test_bases_are_orthonormal_and_drawn_from_the_seed(pipe, space):
    assert len(space.layers) > 0 and all(
        layer.name.endswith(("to_q", "to_k", "to_v", "to_out.0")) for layer in space.layers
    )
    assert space.numbers_per_layer == 150 and space.size == 150 * len(space.layers)
    widths = set()
    for i, layer in enumerate(space.layers):
        down, up = space.bases(i)
        assert down.shape == (100, layer.in_features) and up.shape == (layer.out_features, 50)
        widths.add(layer.in_features)
        # Orthonormal rows where they fit (d_down <= in), else orthonormal columns.
        gram = down @ down.T if 100 <= layer.in_features else down.T @ down
        torch.testing.assert_close(gram, torch.eye(len(gram)), atol=1e-5, rtol=0)
        gram = up.T @ up if 50 <= layer.out_features else up @ up.T
        torch.testing.assert_close(gram, torch.eye(len(gram)), atol=1e-5, rtol=0)
    assert min(widths) < 100 < max(widths)  # the tiny UNet exercises both cases

    again = LidbSpace.from_unet(pipe.unet, LidbConfig(seed=0))
    other = LidbSpace.from_unet(pipe.unet, LidbConfig(seed=1))
    for i in range(len(space.layers)):
        assert all(torch.equal(x, y) for x, y in zip(space.bases(i), again.bases(i), strict=True))
        assert not any(torch.allclose(x, y) for x, y in zip(space.bases(i), other.bases(i), strict=True))
    # Same layer name, same basis, whichever other layers are targeted.
    only_k = LidbSpace.from_unet(pipe.unet, LidbConfig(target_modules=("to_k",), seed=0))
    index = [layer.name for layer in space.layers].index(only_k.layers[0].name)
    assert torch.equal(only_k.bases(0)[0], space.bases(index)[0])


def test_split_and_join_are_inverse(space):
    flat = torch.randn(3, space.size)
    factors = space.split(flat)
    assert factors[0][0].shape == (3, 1, 100) and factors[0][1].shape == (3, 50, 1)
    assert torch.equal(space.join(factors), flat)
    # The head layout: [B, layers, numbers_per_layer] is the flat vector.
    per_layer = flat.view(3, len(space.layers), space.numbers_per_layer)
    assert torch.equal(factors[1][0].flatten(-2), per_layer[:, 1, :100])
    with pytest.raises(InputError, match="last dimension"):
        space.split(torch.zeros(space.size + 1))


def test_expand_writes_a_lora_that_saves_with_its_kohya_export(pipe, space, tmp_path):
    from pimg.formats.lora import load_lora_state_dict

    state_dict = space.expand(_subject(space, 0))
    layer = space.layers[0]
    assert state_dict[f"unet.{layer.name}.lora_A.weight"].shape == (1, layer.in_features)
    assert state_dict[f"unet.{layer.name}.lora_B.weight"].shape == (layer.out_features, 1)
    assert len(state_dict) == 2 * len(space.layers)

    components = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    path = save_lidb_lora(tmp_path, space, _subject(space, 0), components, {"pimg.method": "hypernet"})
    for name in (path.name, "lora_kohya.safetensors"):
        loaded = load_lora_state_dict(tmp_path / name, components)
        assert loaded.keys() == state_dict.keys()
        assert all(torch.equal(loaded[k], state_dict[k]) for k in state_dict)
    with pytest.raises(InputError, match="no batch dimension"):
        space.expand(_subject(space, 0, batch=(2,)))


def test_per_sample_hooks_equal_the_expanded_lora_through_peft(pipe, space, unet_inputs):
    latents, timestep, text = (x[:1] if x.dim() else x for x in unet_inputs)
    factors = _subject(space, 0)
    with torch.no_grad():
        base = _unet(pipe, latents, timestep, text)
        with apply_per_sample(pipe.unet, space, [(a[None], b[None]) for a, b in factors]):
            hooked = _unet(pipe, latents, timestep, text)
        after = _unet(pipe, latents, timestep, text)
        pipe.load_lora_weights(space.expand(factors), adapter_name="lidb")
        try:
            through_peft = _unet(pipe, latents, timestep, text)
        finally:
            pipe.delete_adapters("lidb")

    assert (hooked - base).abs().mean() > 0.05 * base.abs().mean()  # the LoRA does something
    assert (hooked - through_peft).abs().max() <= 1e-4
    assert torch.equal(after, base)  # hooks gone


def test_each_row_gets_its_own_subject_with_cfg_style_repeats(pipe, space, unet_inputs):
    latents, timestep, text = unet_inputs
    subjects = [_subject(space, 0), _subject(space, 1)]
    batch = [
        (torch.stack([a0, a1]), torch.stack([b0, b1])) for (a0, b0), (a1, b1) in zip(*subjects, strict=True)
    ]
    with torch.no_grad():
        single = []
        for i, factors in enumerate(subjects):
            with apply_per_sample(pipe.unet, space, [(a[None], b[None]) for a, b in factors]):
                single.append(_unet(pipe, latents[i : i + 1], timestep, text[i : i + 1]))
        # Four rows as classifier-free guidance stacks them: [block 1 (subjects 0, 1), block 2 (0, 1)].
        with apply_per_sample(pipe.unet, space, batch):
            rows = _unet(pipe, latents.repeat(2, 1, 1, 1), timestep, text.repeat(2, 1, 1))

    assert (single[0] - single[1]).abs().mean() > 0.05  # two different subjects
    for j in range(4):
        torch.testing.assert_close(rows[j : j + 1], single[j % 2], atol=1e-4, rtol=0)
    with pytest.raises(InputError, match="not a multiple"), apply_per_sample(pipe.unet, space, batch):
        _unet(pipe, latents[:1], timestep, text[:1])


def test_gradients_reach_the_factors(pipe, space, unet_inputs):
    latents, timestep, text = (x[:1] if x.dim() else x for x in unet_inputs)
    flat = (
        torch.randn(1, space.size, generator=torch.Generator().manual_seed(2)) * FACTOR_STD
    ).requires_grad_()
    with apply_per_sample(pipe.unet, space, space.split(flat)):
        loss = _unet(pipe, latents, timestep, text).square().mean()
    loss.backward()
    per_layer = flat.grad.view(len(space.layers), space.numbers_per_layer)
    assert torch.isfinite(per_layer).all()
    assert (per_layer[:, :100].abs().sum(-1) > 0).all() and (per_layer[:, 100:].abs().sum(-1) > 0).all()
