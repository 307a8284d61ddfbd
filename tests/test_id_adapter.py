"""The ID adapter (IP-Adapter / IP-Adapter-FaceID): formats, the part against plain diffusers, training.

Plain diffusers is the reference: an image made through pimg's `IdAdapterPart` must be the image
`pipe.load_ip_adapter` + `ip_adapter_image_embeds` (or `ip_adapter_image`) makes from the same file.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pimg.errors import InputError, ModelLoadError
from pimg.formats.ip_adapter import (
    cross_attention_layers,
    describe_ip_adapter,
    read_ip_adapter,
    save_ip_adapter,
)
from pimg.inference.id_adapter import IdAdapterPart, image_embeds_argument
from pimg.inference.parts import LoraPart
from pimg.inference.pipeline import PersonalizedPipeline
from pimg.models import load_base

PROMPT = "a star on a blue background"
FAST = dict(num_inference_steps=3, guidance_scale=4.0, height=64, width=64)


def _plain(pipe, **kwargs) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        PROMPT, generator=[torch.Generator().manual_seed(5)], output_type="pil", **FAST, **kwargs
    ).images
    return np.asarray(images[0], dtype=np.int16)


def _pimg(pp) -> np.ndarray:
    pp.pipe.set_progress_bar_config(disable=True)
    generated = pp.generate(PROMPT, seed=5, **FAST)
    return np.asarray(generated[0].image, dtype=np.int16)


def test_public_faceid_file_gives_the_images_of_plain_diffusers(random_tiny_dir, faceid_file):
    embedding = torch.randn(512, generator=torch.Generator().manual_seed(2))
    pp = PersonalizedPipeline.from_base(str(random_tiny_dir))
    before = _pimg(pp)
    pp.add(IdAdapterPart(faceid_file, embedding, scale=0.7))
    ours = _pimg(pp)

    plain = load_base(str(random_tiny_dir))
    plain.load_ip_adapter(
        str(faceid_file.parent), subfolder="", weight_name=faceid_file.name, image_encoder_folder=None
    )
    plain.set_ip_adapter_scale(0.7)
    embeds = torch.cat([torch.zeros(1, 1, 512), embedding.reshape(1, 1, 512)])
    theirs = _plain(plain, ip_adapter_image_embeds=[embeds])

    assert np.abs(ours - theirs).max() <= 1
    assert np.abs(ours - before).max() > 10  # the adapter changed the image: the comparison is not vacuous
    pp.remove("id_adapter")
    assert np.array_equal(_pimg(pp), before)  # detach gives back the base's images


def test_faceid_lora_stays_active_beside_another_lora(random_tiny_dir, faceid_file, lora_dir):
    from peft.tuners.tuners_utils import BaseTunerLayer

    pp = PersonalizedPipeline.from_base(str(random_tiny_dir))
    pp.add(IdAdapterPart(faceid_file, torch.ones(512)))
    pp.add(LoraPart(lora_dir, name="subject"))
    layer = next(
        m for m in pp.pipe.unet.modules() if isinstance(m, BaseTunerLayer) and "faceid_0" in m.scaling
    )
    assert set(layer.active_adapters) == {"faceid_0", "subject"}
    pp.clear()
    assert "faceid_0" not in getattr(pp.pipe.unet, "peft_config", {})


def test_faceid_file_is_described_and_its_safetensors_form_reads_the_same(faceid_file, tmp_path):
    weights = read_ip_adapter(faceid_file)
    info = describe_ip_adapter(weights)
    assert (info.kind, info.embed_dim, info.cross_attention_dim, info.num_tokens, info.has_lora) == (
        "faceid",
        512,
        128,
        4,
        True,
    )
    copy = save_ip_adapter(tmp_path / "ip_adapter.safetensors", weights)
    again = read_ip_adapter(copy)
    assert all(torch.equal(again[s][k], weights[s][k]) for s in weights for k in weights[s])


@pytest.fixture(scope="module")
def faceid_plus(random_tiny_dir, tmp_path_factory):
    """A random IP-Adapter-FaceID PlusV2 checkpoint in the public key layout (named as h94 names it),
    with the random tiny's CLIP vision tower beside it as image_encoder/; and diffusers' own module."""
    from conftest import random_faceid_plus_weights
    from transformers import CLIPVisionModelWithProjection

    folder = tmp_path_factory.mktemp("faceid_plus")
    encoder = CLIPVisionModelWithProjection.from_pretrained(random_tiny_dir / "clip")
    encoder.save_pretrained(folder / "image_encoder")
    weights = random_faceid_plus_weights(load_base(str(random_tiny_dir)).unet, encoder.config.hidden_size)
    module = weights.pop("module")
    torch.save(weights, folder / "ip-adapter-faceid-plusv2_sd15.bin")
    return folder / "ip-adapter-faceid-plusv2_sd15.bin", module


def test_faceid_plus_file_is_read_as_diffusers_reads_it(random_tiny_dir, faceid_plus):
    path, module = faceid_plus
    weights = read_ip_adapter(path)
    info = describe_ip_adapter(weights)
    assert (info.kind, info.embed_dim, info.num_tokens, info.face_token_dim, info.has_lora) == (
        "faceid-plus",
        512,
        4,
        128,
        True,
    )
    # the fixture's layout is the public one: diffusers' conversion gives back the module it came from
    converted = load_base(str(random_tiny_dir)).unet._convert_ip_adapter_image_proj_to_diffusers(
        weights["image_proj"], low_cpu_mem_usage=False
    )
    assert all(torch.equal(v, converted.state_dict()[k]) for k, v in module.state_dict().items())
    with pytest.raises(InputError, match=r"aligned face's CLIP tokens \[T, 128\]"):
        IdAdapterPart(path, torch.zeros(512))  # a face embedding alone is not enough
    assert IdAdapterPart(path, torch.zeros(512), face_tokens=torch.zeros(5, 128)).shortcut  # named plusv2


def test_faceid_plus_gives_the_images_of_plain_diffusers(random_tiny_dir, faceid_plus):
    from PIL import Image

    from pimg.embedders import ClipImageEmbedder

    path, _ = faceid_plus
    face = np.random.default_rng(3).integers(0, 255, (224, 224, 3), dtype=np.uint8)  # an aligned face crop
    identity = torch.randn(512, generator=torch.Generator().manual_seed(2))
    tokens = ClipImageEmbedder(path.parent / "image_encoder", tokens=True).embed([face])
    pp = PersonalizedPipeline.from_base(str(random_tiny_dir))
    before = _pimg(pp)
    # the unconditional tokens come from the image_encoder/ beside the file, as diffusers makes them
    pp.add(IdAdapterPart(path, identity, scale=0.7, face_tokens=tokens))
    ours = _pimg(pp)
    pp.remove("id_adapter")
    pp.add(IdAdapterPart(path, identity, scale=0.7, face_tokens=tokens, shortcut=False))
    without_shortcut = _pimg(pp)

    plain = load_base(str(random_tiny_dir))  # as diffusers' IP-Adapter guide drives FaceID PlusV2
    plain.load_ip_adapter(str(path.parent), subfolder="", weight_name=path.name)
    plain.set_ip_adapter_scale(0.7)
    projection = plain.unet.encoder_hid_proj.image_projection_layers[0]
    projection.clip_embeds = plain.prepare_ip_adapter_image_embeds(
        [Image.fromarray(face)], None, "cpu", 1, True
    )[0]
    projection.shortcut = True
    embeds = torch.cat([torch.zeros(1, 1, 512), identity.reshape(1, 1, 512)])
    theirs = _plain(plain, ip_adapter_image_embeds=[embeds])

    assert np.abs(ours - theirs).max() <= 1
    assert np.abs(ours - before).max() > 10 and np.abs(ours - without_shortcut).max() > 0


def test_bad_embeddings_and_bases_are_refused(faceid_file, random_sdxl_dir):
    with pytest.raises(InputError, match="has 128 numbers.*512-d ArcFace"):
        IdAdapterPart(faceid_file, torch.zeros(128))
    pp = PersonalizedPipeline.from_base(str(random_sdxl_dir))
    with pytest.raises(ModelLoadError, match="cross-attention width 128.*Use the adapter made for this base"):
        pp.add(IdAdapterPart(faceid_file, torch.zeros(512)))
    assert not pp.parts


def test_not_an_ip_adapter_is_refused(tmp_path, lora_dir):
    with pytest.raises(ModelLoadError, match="not an IP-Adapter file"):
        read_ip_adapter(lora_dir / "pytorch_lora_weights.safetensors")
    with pytest.raises(ModelLoadError, match="holds no IP-Adapter file"):
        read_ip_adapter(tmp_path)


def test_embeds_argument_puts_zero_rows_first_under_guidance():
    e = torch.arange(3.0)
    guided = image_embeds_argument(e, rows=2, guided=True)
    assert guided.shape == (4, 1, 3)
    assert torch.equal(guided[:2], torch.zeros(2, 1, 3)) and torch.equal(guided[2, 0], e)
    assert image_embeds_argument(e, rows=2, guided=False).shape == (2, 1, 3)


@pytest.fixture(
    scope="module",
    params=[("clip", 0), ("clip", 2), ("plus", 0)],
    ids=["ip-adapter", "companion-lora", "plus"],
)
def trained_adapter(random_tiny_dir, tmp_path_factory, request):
    """2 training steps on the random tiny, with its random CLIP's vision tower as the image encoder:
    IP-Adapter, IP-Adapter with the companion LoRA, IP-Adapter Plus (8 tokens)."""
    kind, lora_rank = request.param
    from pimg.trainers.id_adapter import IdAdapterTrainConfig
    from pimg.trainers.loop import LoopConfig
    from pimg.trainers.personalize import train

    out = tmp_path_factory.mktemp("id_train") / "adapter"
    config = IdAdapterTrainConfig(
        base=str(random_tiny_dir),
        image_encoder=str(random_tiny_dir / "clip"),
        out_dir=str(out),
        batch_size=2,
        kind=kind,
        num_tokens=8 if kind == "plus" else 4,
        lora_rank=lora_rank,
        sample_subjects=1,
        num_inference_steps=2,
        loop=LoopConfig(steps=2, learning_rate=1e-3, checkpoint_every=1),
    )
    return train("id-adapter", config, progress=False)


def test_two_training_steps_write_an_adapter_diffusers_loads_with_its_image_encoder(
    random_tiny_dir, trained_adapter
):
    from pimg.formats.ip_adapter import find_ip_adapter_file
    from pimg.inference.id_adapter import embedder_for
    from pimg.toyworld.subjects import EVAL_SUBJECTS

    record = json.loads((trained_adapter / "config.json").read_text())
    assert record["method"] == "id-adapter"
    assert (trained_adapter / "samples").is_dir() and (trained_adapter / "checkpoints").is_dir()
    weights = read_ip_adapter(trained_adapter)
    info = describe_ip_adapter(weights)
    start = load_base(str(random_tiny_dir)).unet
    embedder = embedder_for(find_ip_adapter_file(trained_adapter))
    assert (info.kind, info.num_tokens, info.num_layers) == (
        record["kind"],
        record["num_tokens"],
        len(cross_attention_layers(start)),
    )
    assert info.embed_dim == embedder.dim and embedder.tokens == (info.kind == "plus")
    # what trained moved: the key/value layers started as copies of to_k / to_v
    to_k = dict(start.named_modules())["down_blocks.0.attentions.0.transformer_blocks.0.attn2"].to_k.weight
    assert not torch.equal(weights["ip_adapter"]["1.to_k_ip.weight"], to_k)
    rank = record["lora_rank"]
    assert info.has_lora == (rank > 0)
    if rank:  # the companion LoRA covers self- and cross-attention, and its up factors left zero
        ups = [k for k in weights["ip_adapter"] if k.endswith("_lora.up.weight")]
        assert len(ups) == 4 * len(start.attn_processors)
        assert weights["ip_adapter"]["0.to_q_lora.up.weight"].abs().sum() > 0

    photo = next(iter(EVAL_SUBJECTS.values())).photos(1, seed=0)[0]
    pp = PersonalizedPipeline.from_base(str(random_tiny_dir))
    # no negative= given: a Plus part takes its unconditional tokens from the image encoder itself
    pp.add(IdAdapterPart(trained_adapter, embedder.embed([photo])))
    ours = _pimg(pp)

    from PIL import Image

    plain = load_base(str(random_tiny_dir))
    plain.load_ip_adapter(str(trained_adapter), subfolder="", weight_name="ip_adapter.safetensors")
    theirs = _plain(plain, ip_adapter_image=Image.fromarray(photo))
    assert np.abs(ours - theirs).max() <= 1


def test_trains_on_a_folder_of_subject_folders(random_tiny_dir, tmp_path):
    """Real bases train on `data/<subject>/*.png` (2+ photos each, captions optional), encoded once."""
    from pimg.photos import save_photos
    from pimg.toyworld.subjects import EVAL_SUBJECTS
    from pimg.trainers.id_adapter import IdAdapterTrainConfig
    from pimg.trainers.loop import LoopConfig
    from pimg.trainers.personalize import train

    for subject in list(EVAL_SUBJECTS.values())[:2]:
        save_photos(tmp_path / "data" / subject.name, subject.photos(2, seed=3), None)
    # one photo: nothing to take the loss on, so skipped
    save_photos(tmp_path / "data" / "lonely", subject.photos(1, seed=4), None)
    config = IdAdapterTrainConfig(
        base=str(random_tiny_dir),
        image_encoder=str(random_tiny_dir / "clip"),
        data=str(tmp_path / "data"),
        kind="plus",
        out_dir=str(tmp_path / "out"),
        batch_size=2,
        sample_subjects=1,
        num_inference_steps=2,
        loop=LoopConfig(steps=1),
    )
    weights = read_ip_adapter(train("id-adapter", config, progress=False))
    assert describe_ip_adapter(weights).kind == "plus"


def test_training_resumes_exactly(random_tiny_dir, trained_adapter, tmp_path):
    from pimg.trainers.personalize import load_train_config, resume_config, train

    config = resume_config("id-adapter", str(trained_adapter), {"loop.steps": 3})
    train("id-adapter", config, resume=True, progress=False)
    resumed = read_ip_adapter(trained_adapter)
    record = json.loads((trained_adapter / "config.json").read_text())
    assert record["loop"]["steps"] == 3
    straight = load_train_config(
        "id-adapter",
        None,
        {
            "base": record["base"],
            "image_encoder": record["image_encoder"],
            "batch_size": 2,
            "kind": record["kind"],
            "num_tokens": record["num_tokens"],
            "lora_rank": record["lora_rank"],
            "sample_subjects": 0,
            "out_dir": str(tmp_path / "straight"),
            "loop.steps": 3,
            "loop.learning_rate": 1e-3,
        },
    )
    once = read_ip_adapter(train("id-adapter", straight, progress=False))
    for section in once:
        for key in once[section]:
            torch.testing.assert_close(resumed[section][key], once[section][key], rtol=1e-5, atol=1e-6)


def test_personalized_subject_folder_loads_as_a_result(random_tiny_dir, trained_adapter, tmp_path):
    from pimg.methods import detect_method, load_result
    from pimg.toyworld.subjects import EVAL_SUBJECTS

    subject = next(iter(EVAL_SUBJECTS.values()))
    method = detect_method(trained_adapter)  # the adapter folder names its method...
    assert method.name == "id-adapter"
    with pytest.raises(InputError, match="give it a photo"):
        load_result(trained_adapter)  # ...but is no subject without a photo
    folder = method.personalize_function()(
        subject.photos(2, seed=1), tmp_path / "sub", base="x", model=trained_adapter
    )
    loaded = load_result(folder, scale=0.5)
    (part,) = loaded.parts
    assert isinstance(part, IdAdapterPart) and part.scale == 0.5
    info = describe_ip_adapter(read_ip_adapter(trained_adapter))
    # the mean over the photos: one embedding, or for Plus one set of encoder tokens and the unconditional ones
    if info.kind == "plus":
        assert part.embedding.shape == part.negative.shape and part.embedding.shape[-1] == info.embed_dim
        with pytest.raises(InputError, match=r"takes tokens \[T, D\]"):  # a pooled embedding is no Plus input
            IdAdapterPart(trained_adapter, torch.zeros(info.embed_dim))
    else:
        assert part.embedding.shape == (info.embed_dim,) and part.negative is None


def test_a_plus_adapter_without_its_image_encoder_guides_with_zeros_and_says_so(trained_adapter, tmp_path):
    import shutil

    from pimg.formats.ip_adapter import find_ip_adapter_file
    from pimg.inference.parts import GenerationCall

    info = describe_ip_adapter(read_ip_adapter(trained_adapter))
    if info.kind != "plus":
        pytest.skip("only IP-Adapter Plus takes unconditional tokens from its encoder")
    lone = tmp_path / "ip_adapter.safetensors"  # the file alone, no image_encoder/ beside it
    shutil.copy(find_ip_adapter_file(trained_adapter), lone)
    tokens = torch.randn(8, info.embed_dim)
    part = IdAdapterPart(lone, tokens)
    call = GenerationCall(["a"], None, [0], 2, guidance_scale=3.0, height=32, width=32)
    with pytest.warns(UserWarning, match="zeros"):
        (embeds,) = part.call_arguments(call)["ip_adapter_image_embeds"]
    assert embeds.shape == (2, 1, 8, info.embed_dim)  # [unconditional, conditional] rows
    assert torch.equal(embeds[0, 0], torch.zeros_like(tokens)) and torch.equal(embeds[1, 0], tokens)
    unguided = GenerationCall(["a"], None, [0], 2, guidance_scale=1.0, height=32, width=32)
    assert part.call_arguments(unguided)["ip_adapter_image_embeds"][0].shape[0] == 1


# ------------------------------------------------------------------------------ faces (../shared/faces)


@pytest.mark.shared
def test_face_embedder_says_couple_shows_two_faces_and_which_it_used(shared_dir, caplog):
    pytest.importorskip("dlib", reason="dlib is not installed: pip install 'pimg[face-dlib]'")
    from pimg.embedders import FaceEmbedder
    from pimg.faces import face_backend
    from pimg.toyworld.subjects import EVAL_SUBJECTS

    embedder = FaceEmbedder(face_backend("dlib"))
    couple = shared_dir / "faces" / "multi" / "couple.jpg"
    with caplog.at_level("WARNING"):
        embedding = embedder.embed([couple], [couple.name])
    assert embedding.shape == (1, 128)
    (report,) = embedder.reports
    assert report["faces"] == 2 and len(report["used_box"]) == 4
    assert embedder.aligned[0].shape == (224, 224, 3)  # the used face's chip, for FaceID Plus
    assert "shows 2 faces; using the largest" in caplog.text
    with pytest.raises(InputError, match="no face found in toy.png"):
        embedder.embed([next(iter(EVAL_SUBJECTS.values())).photos(1)[0]], ["toy.png"])


@pytest.mark.shared
def test_generate_drives_faceid_plus_from_a_photo_and_says_which_face(
    shared_dir, random_tiny_dir, tmp_path, capsys
):
    pytest.importorskip("dlib", reason="dlib is not installed: pip install 'pimg[face-dlib]'")
    from conftest import random_faceid_plus_weights
    from transformers import CLIPVisionModelWithProjection

    from pimg.frontends.cli import main

    encoder = CLIPVisionModelWithProjection.from_pretrained(random_tiny_dir / "clip")
    encoder.save_pretrained(tmp_path / "clip_vision")
    weights = random_faceid_plus_weights(
        load_base(str(random_tiny_dir)).unet,
        encoder.config.hidden_size,
        embed_dim=128,  # dlib's size
    )
    weights.pop("module")
    adapter = tmp_path / "adapter" / "ip-adapter-faceid-plus_sd15.bin"  # no image_encoder/ beside it
    adapter.parent.mkdir()
    torch.save(weights, adapter)
    argv = [
        "generate",
        "--base",
        str(random_tiny_dir),
        "--prompt",
        "a person",
        "--steps",
        "2",
        "--guidance",
        "3",
    ]
    argv += ["--id-adapter", str(adapter), "--id-image", str(shared_dir / "faces" / "multi" / "couple.jpg")]
    argv += ["--face-backend", "dlib", "--out", str(tmp_path / "out")]
    assert main(argv) != 0
    assert "--id-image-encoder" in capsys.readouterr().err
    assert main([*argv, "--id-image-encoder", str(tmp_path / "clip_vision")]) == 0
    assert "couple.jpg shows 2 faces; used the largest" in capsys.readouterr().out
    assert len(list((tmp_path / "out").glob("*.png"))) == 1


@pytest.mark.shared
def test_scrfd_detector_finds_every_face_in_shared_photos(shared_dir):
    pytest.importorskip("insightface", reason="pip install 'pimg[face]'")
    from pimg.faces import ScrfdDetector

    faces = shared_dir / "faces"
    detector = ScrfdDetector(faces / "models" / "det_500m.onnx")
    singles = sorted(faces.glob("person_*/*.jpg"))
    counts = [len(detector.detect(p)) for p in singles]
    assert min(counts) >= 1, dict(zip([p.name for p in singles], counts, strict=True))
    couple = detector.detect(faces / "multi" / "couple.jpg")
    assert len(couple) == 2 and couple[0].area >= couple[1].area
    # each face warped upright on its landmarks, FaceID Plus' CLIP input: still a face, filling the crop
    at_crop_size = ScrfdDetector(faces / "models" / "det_500m.onnx", det_size=224)
    for face in couple:
        assert face.aligned.shape == (224, 224, 3) and face.aligned.dtype == np.uint8
        (again,) = at_crop_size.detect(face.aligned)
        assert again.area > 0.2 * 224 * 224


def test_sdxl_faceid_layout_gives_the_images_of_plain_diffusers(random_sdxl_dir, tmp_path):
    from conftest import random_faceid_weights

    plain = load_base(str(random_sdxl_dir))
    path = tmp_path / "ip-adapter-faceid_sdxl.bin"
    torch.save(random_faceid_weights(plain.unet, seed=4), path)
    embedding = torch.randn(512, generator=torch.Generator().manual_seed(3))
    pp = PersonalizedPipeline.from_base(str(random_sdxl_dir))
    pp.add(IdAdapterPart(path, embedding))
    ours = _pimg(pp)
    plain.load_ip_adapter(str(tmp_path), subfolder="", weight_name=path.name, image_encoder_folder=None)
    theirs = _plain(
        plain, ip_adapter_image_embeds=[torch.cat([torch.zeros(1, 1, 512), embedding.reshape(1, 1, 512)])]
    )
    assert np.abs(ours - theirs).max() <= 1


def test_subject_crop_centres_the_subject_and_leaves_busy_photos_alone():
    from pimg.embedders import NEUTRAL, subject_crop
    from pimg.toyworld.subjects import EVAL_SUBJECTS

    subject = next(iter(EVAL_SUBJECTS.values()))
    for photo in subject.photos(3, seed=2):
        crop = subject_crop(photo)
        assert crop.shape == (64, 64, 3)
        assert (crop[0] == NEUTRAL).all() and (crop[:, -1] == NEUTRAL).all()  # the background is gone
        far = np.linalg.norm(crop.astype(float) - NEUTRAL, axis=-1) > 60
        ys, xs = np.nonzero(far)
        assert abs((ys.min() + ys.max()) / 2 - 31.5) <= 1.5 and abs((xs.min() + xs.max()) / 2 - 31.5) <= 1.5
        assert max(ys.max() - ys.min(), xs.max() - xs.min()) + 1 == 48  # scaled to 3/4 of the side
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert np.array_equal(subject_crop(noise), noise)


def test_train_id_adapter_takes_no_subject_flags():
    from pimg.frontends.cli import build_parser
    from pimg.trainers.id_adapter import IdAdapterTrainConfig

    with pytest.raises(InputError, match="has 4 tokens"):
        IdAdapterTrainConfig(num_tokens=8)
    with pytest.raises(InputError, match="no faces"):
        IdAdapterTrainConfig(kind="faceid")  # data "toy"

    parser = build_parser()
    args = parser.parse_args(["train", "id-adapter", "--kind", "clip", "--batch-size", "4", "--steps", "9"])
    assert vars(args)["cfg.kind"] == "clip" and vars(args)["cfg.loop.steps"] == 9
    with pytest.raises(SystemExit):  # it learns across many subjects: there is no --photos to give
        parser.parse_args(["train", "id-adapter", "--photos", "my_star/"])
