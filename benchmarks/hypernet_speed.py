"""Time one hypernetwork prediction and one HM-CFG generation beside plain CFG, on `tiny` or at SD1.5 scale.

    python benchmarks/hypernet_speed.py                                   # tiny, shipped hypernetwork, CPU
    python benchmarks/hypernet_speed.py --arch sd15 --device cuda         # SD1.5 architecture, random weights

`--arch sd15` builds Stable Diffusion 1.5's architecture with random weights (UNet 320-640-1280-1280,
768-wide cross-attention, ViT-L/14 text encoder, the SD VAE) and a hypernetwork over its 128 attention
projections with a random CLIP ViT-L/14 vision encoder: random weights take the time trained ones do.
Prints which was run, the device, the best of `--repeats`, and the HM-CFG / plain-CFG ratio (HM-CFG's one
UNet call per step has 3 rows per image instead of 2).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from random_bases import random_sd15_pipeline
from timing import DTYPES, best_of

from pimg.inference.hybrid_guidance import HybridGuidance
from pimg.inference.parts import LoraPart
from pimg.inference.pipeline import PersonalizedPipeline
from pimg.toyworld.subjects import EVAL_SUBJECTS

PROMPT = "a sks star on a green background"


def random_sd15(folder: Path) -> tuple[Path, Path]:
    """A random-weight SD1.5-architecture pipeline and a random hypernetwork for it (saved folders)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from pimg.hypernets.lidb import LidbSpace
    from pimg.hypernets.model import HypernetArchitecture, Hypernetwork, PhotoEncoder

    base = random_sd15_pipeline()
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    vision = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=1024,
            intermediate_size=4096,
            num_attention_heads=16,
            num_hidden_layers=24,
            image_size=224,
            patch_size=14,
        )
    )
    vision.save_pretrained(folder / "vision")
    architecture = HypernetArchitecture(width=512, depth=4, heads=8, passes=2)
    hypernet = Hypernetwork(
        LidbSpace.from_unet(unet, architecture.lidb), PhotoEncoder(folder / "vision"), architecture
    )
    with torch.no_grad():  # non-zero b half, so the predicted LoRA is not skipped as zero anywhere
        hypernet.head[1].bias.normal_(0, 1e-3)
    hypernet.save(folder / "hypernet", {"base": str(base), "token": "sks", "guidance_scale": 7.5})
    return base, folder / "hypernet"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=("tiny", "sd15"), default="tiny")
    parser.add_argument(
        "--hypernet", default=None, help="hypernetwork folder (tiny: default the shipped one)"
    )
    parser.add_argument("--photos", type=int, default=4)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--size", type=int, default=None, help="image side (default: the base's)")
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--hm-cfg", type=float, default=1.0, help="subject scale of HM-CFG")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="the pipelines' dtype")
    args = parser.parse_args()

    from pimg.hypernets.model import Hypernetwork
    from pimg.hypernets.predict import default_hypernet, personalize
    from pimg.models import load_base

    scratch = Path(tempfile.mkdtemp(prefix="pimg-hn-bench-"))
    if args.arch == "sd15":
        base, hypernet_folder = random_sd15(scratch)
        base = str(base)
    else:
        base, hypernet_folder = "tiny", Path(args.hypernet) if args.hypernet else default_hypernet("tiny")
    photos = next(iter(EVAL_SUBJECTS.values())).photos(args.photos, seed=0)

    pipe = load_base(base)
    hypernet = Hypernetwork.load(hypernet_folder, pipe.unet).to(args.device)
    predict = best_of(args.repeats, lambda: hypernet.predict(photos))
    subject = personalize(photos, scratch / "subject", base=base, model=hypernet_folder, pipe=pipe)

    plain = PersonalizedPipeline.from_base(base, device=args.device, dtype=DTYPES[args.dtype])
    plain.add(LoraPart(subject))
    hybrid = PersonalizedPipeline.from_base(base, device=args.device, dtype=DTYPES[args.dtype])
    hybrid.add(HybridGuidance(LoraPart(subject), subject_scale=args.hm_cfg))
    size = {"height": args.size, "width": args.size} if args.size else {}

    def generate(pp):
        return lambda: pp.generate(
            PROMPT,
            num_images=args.images,
            guidance_scale=args.guidance,
            num_inference_steps=args.steps,
            **size,
        )

    for pp in (plain, hybrid):
        pp.pipe.set_progress_bar_config(disable=True)
    plain_time = best_of(args.repeats, generate(plain))
    hybrid_time = best_of(args.repeats, generate(hybrid))
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(
        f"run: {args.arch} ({'random weights' if args.arch == 'sd15' else 'shipped hypernetwork'}) on {args.device} ({name}, "
        f"{torch.get_num_threads()} threads), {args.dtype}"
    )
    print(f"prediction from {args.photos} photos: {predict:.3f} s (best of {args.repeats})")
    print(
        f"{args.images} images x {args.steps} steps, guidance {args.guidance:g}: plain CFG with the LoRA "
        f"{plain_time:.2f} s, HM-CFG {hybrid_time:.2f} s, ratio {hybrid_time / plain_time:.2f}x"
    )


if __name__ == "__main__":
    main()
