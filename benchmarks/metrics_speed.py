"""Throughput of each metric on this machine, in images per second (preprocessing included).

    python benchmarks/metrics_speed.py --toy-model tiny --faces ../shared/faces
    python benchmarks/metrics_speed.py --toy-model tiny --architectures   # + DINO ViT-S/16, CLIP ViT-B/32

Images are decoded beforehand (file reading is not timed); each figure is the median of `--repeats`
runs of `score(images, references)` with `--batch-size`. Toy metrics run on 64x64 toy subject photos;
face identity on the real photos of `--faces` (single-face photos) and on 512 px copies of them.
`--architectures` times DINO ViT-S/16 and open_clip ViT-B/32 with random weights: the same
computation as the released weights, which cannot be downloaded here.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _time(fn, repeats: int) -> float:
    fn()  # warm-up: lazy initialisation and allocator
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _report(name: str, n: int, seconds: float) -> None:
    print(f"{name:44s} {n:5d} images  {seconds:7.3f} s  {n / seconds:8.1f} images/s")


def _toy(args) -> None:
    from pimg.metrics import load_embedder, load_metric
    from pimg.toyworld.subjects import EVAL_SUBJECTS

    subjects = list(EVAL_SUBJECTS.values())
    images = [p for s in subjects for p in s.photos(n=args.toy_images // len(subjects), seed=0)]
    references = subjects[0].photos(n=4, seed=1)
    prompts = [
        f"a sks {s.shape} on a white background"
        for s in subjects
        for _ in range(len(images) // len(subjects))
    ]
    clip = load_embedder("clip-i", "toy", args.toy_model, device=args.device, batch_size=args.batch_size)
    for name, targets in (("clip-i", references), ("clip-t", prompts)):
        metric = load_metric(name, embedder=clip)
        seconds = _time(lambda m=metric, t=targets: m.score(images, t), args.repeats)
        _report(f"toy {name} (toy CLIP, 64 px)", len(images), seconds)
    fidelity = load_metric("toy-fidelity")
    _report(
        "toy-fidelity (pixel checker, 64 px)",
        len(images),
        _time(lambda: fidelity.score(images, references), args.repeats),
    )


def _faces(args) -> None:
    from PIL import Image

    from pimg.metrics import load_metric
    from pimg.metrics.real_vs_real import MULTIPLE, photo_groups

    groups = photo_groups(args.faces)
    photos = [
        Image.open(p).convert("RGB") for name, files in groups.items() if name != MULTIPLE for p in files
    ]
    references = photos[:2]
    face_id = load_metric("face-id", "dlib")
    sizes = sorted({max(p.size) for p in photos})
    _report(
        f"face-id dlib (photos {sizes[0]}-{sizes[-1]} px, max_side 800)",
        len(photos),
        _time(lambda: face_id.score(photos, references), args.repeats),
    )
    small = [
        p.resize((512, round(512 * p.height / p.width)))
        if p.width >= p.height
        else p.resize((round(512 * p.width / p.height), 512))
        for p in photos
    ]
    _report(
        "face-id dlib (512 px)", len(small), _time(lambda: face_id.score(small, references), args.repeats)
    )


def _architectures(args, tmp: str) -> None:
    import numpy as np
    from PIL import Image
    from transformers import ViTConfig, ViTModel

    from pimg.metrics import load_embedder, load_metric

    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)) for _ in range(args.real_images)
    ]
    references = images[:4]
    # facebook/dino-vits16's configuration: ViT-S/16 at 224 px.
    config = ViTConfig(
        image_size=224,
        patch_size=16,
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        intermediate_size=1536,
    )
    ViTModel(config, add_pooling_layer=False).save_pretrained(f"{tmp}/dino")
    dino = load_metric("dino", model=f"{tmp}/dino", device=args.device, batch_size=args.batch_size)
    _report(
        "dino ViT-S/16 (random weights, 512 px in)",
        len(images),
        _time(lambda: dino.score(images, references), args.repeats),
    )
    clip = load_embedder(
        "clip-i", "open_clip", "ViT-B-32", pretrained=None, device=args.device, batch_size=args.batch_size
    )
    clip_i, clip_t = load_metric("clip-i", embedder=clip), load_metric("clip-t", embedder=clip)
    _report(
        "clip-i open_clip ViT-B-32 (random, 512 px in)",
        len(images),
        _time(lambda: clip_i.score(images, references), args.repeats),
    )
    _report(
        "clip-t open_clip ViT-B-32 (random, 512 px in)",
        len(images),
        _time(lambda: clip_t.score(images, "a photo of a dog"), args.repeats),
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--toy-model", default="tiny", help="tiny model folder (with clip/) or 'tiny'")
    parser.add_argument(
        "--faces", default="../shared/faces", help="photos by person; '' to skip face identity"
    )
    parser.add_argument(
        "--architectures", action="store_true", help="also time DINO ViT-S/16 and CLIP ViT-B/32"
    )
    parser.add_argument("--toy-images", type=int, default=256)
    parser.add_argument("--real-images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, batch size {args.batch_size}")
    _toy(args)
    if args.faces:
        _faces(args)
    if args.architectures:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            _architectures(args, tmp)


if __name__ == "__main__":
    main()
