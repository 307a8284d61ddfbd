"""Time generation with the ID adapter against plain generation of the base, on the same prompts.

    python benchmarks/id_adapter_speed.py [--adapter default] [--base tiny] [--images 8] [--steps 25]
    python benchmarks/id_adapter_speed.py --arch sd15 --device cuda --dtype bfloat16 --images 4

Both run in one process, interleaved, at the same guidance; prints the best of `--repeats` runs and
the ratio (the issue's bound: at most 1.15x). `--arch sd15` times Stable Diffusion 1.5's architecture
with random weights and a random adapter in IP-Adapter-FaceID's layout (the MLP projection, `to_k_ip` /
`to_v_ip` on its 16 cross-attention layers, and the rank-128 companion LoRA of
`ip-adapter-faceid_sd15.bin`), driven by a random 512-d face embedding: timings need the shapes only.
A real base takes an adapter made for it: `--base FOLDER --adapter ip-adapter-faceid_sd15.bin`.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from random_bases import random_sd15_pipeline
from timing import DTYPES, seconds

from pimg.inference.id_adapter import IdAdapterPart, resolve_adapter
from pimg.inference.pipeline import PersonalizedPipeline
from pimg.toyworld.subjects import EVAL_SUBJECTS

PROMPT = "a star on a green background"
FACEID_LORA_RANK = 128  # the companion LoRA's rank in h94's ip-adapter-faceid_sd15.bin


def random_sd15_faceid(folder: Path) -> tuple[str, Path]:
    """The random SD1.5-architecture base and a random FaceID adapter for it, saved as the public .bin."""
    from diffusers import UNet2DConditionModel

    from pimg.trainers.id_adapter import initial_adapter

    base = random_sd15_pipeline()
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    weights = initial_adapter(unet, "faceid", 512, 4, seed=0, lora_rank=FACEID_LORA_RANK)
    for key, value in weights["ip_adapter"].items():
        if key.endswith("_lora.up.weight"):  # non-zero, so no LoRA delta is skipped as empty
            weights["ip_adapter"][key] = torch.randn_like(value) * 1e-3
    adapter = folder / "ip-adapter-faceid_sd15.bin"
    torch.save(weights, adapter)
    return str(base), adapter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=("tiny", "sd15"), default="tiny", help="sd15: random weights")
    parser.add_argument("--base", default="tiny", help="with --arch tiny: the base to load")
    parser.add_argument(
        "--adapter", default="default", help="adapter file or folder (default: the shipped one)"
    )
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="the pipelines' dtype")
    args = parser.parse_args()
    if args.arch == "sd15":
        base, adapter = random_sd15_faceid(Path(tempfile.mkdtemp(prefix="pimg-id-bench-")))
        embedding = torch.randn(512)
    else:
        from pimg.inference.id_adapter import embedder_for

        base, adapter = args.base, resolve_adapter(args.adapter, args.base)
        embedder = embedder_for(adapter)
        photo = next(iter(EVAL_SUBJECTS.values())).photos(1, seed=0)[0]
        embedding = embedder.embed([photo]) if embedder.kind == "clip" else torch.randn(embedder.dim)
    dtype = DTYPES[args.dtype]
    plain = PersonalizedPipeline.from_base(base, device=args.device, dtype=dtype)
    adapted = PersonalizedPipeline.from_base(base, device=args.device, dtype=dtype)
    adapted.add(IdAdapterPart(adapter, embedding))

    def generate(pp, steps: int):
        return lambda: pp.generate(
            PROMPT, num_images=args.images, guidance_scale=args.guidance, num_inference_steps=steps
        )

    for pp in (plain, adapted):
        pp.pipe.set_progress_bar_config(disable=True)
        generate(pp, 2)()  # warm-up
    times = {"plain": [], "adapter": []}
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits both alike
        times["plain"].append(seconds(generate(plain, args.steps)))
        times["adapter"].append(seconds(generate(adapted, args.steps)))
    best = {k: min(v) for k, v in times.items()}
    print(
        f"{args.arch if args.arch == 'sd15' else args.base} on {args.device}, {args.dtype}, {args.images} images, "
        f"{args.steps} steps, guidance {args.guidance:g}: plain {best['plain']:.2f} s; with the ID adapter "
        f"{best['adapter']:.2f} s ({best['adapter'] / best['plain']:.3f}x)"
    )


if __name__ == "__main__":
    main()
