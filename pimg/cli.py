"""The `pimg` command line: thin commands over library calls, imported lazily per command."""

from __future__ import annotations

import argparse
import sys

from pimg.errors import PimgError


def _spec_with_value(text: str, flag: str) -> tuple[str, str | None]:
    """Split 'PATH[:VALUE]' (a Windows drive letter 'C:\\...' stays part of the path)."""
    head, sep, tail = text.rpartition(":")
    if not sep or not head or "/" in tail or "\\" in tail or (len(head) == 1 and head.isalpha()):
        return text, None
    return head, tail


def _lora_arg(text: str) -> tuple[str, float]:
    path, scale = _spec_with_value(text, "--lora")
    try:
        return path, float(scale) if scale is not None else 1.0
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--lora {text!r}: the scale after ':' must be a number") from exc


def _embedding_arg(text: str) -> tuple[str, str | None]:
    return _spec_with_value(text, "--embedding")


def cmd_generate(args) -> None:
    from pimg.generate import GenerateRequest, run_generate

    request = GenerateRequest(
        base=args.base,
        prompts=args.prompt or [],
        prompt_file=args.prompt_file,
        negative_prompt=args.negative_prompt,
        loras=args.lora or [],
        embeddings=args.embedding or [],
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        scheduler=args.scheduler,
        seed=args.seed,
        num_images=args.num_images,
        height=args.height,
        width=args.width,
        out_dir=args.out,
        device=args.device,
        config_folder=args.config_folder,
    )
    run_generate(request)


def cmd_models(args) -> None:
    from pimg.models import list_models

    for model in list_models():
        state = "present" if (model.folder / "model_index.json").is_file() else "MISSING"
        print(f"{model.name:8s} {model.folder}  [{state}]\n         {model.description}")


def cmd_env(args) -> None:
    from pimg.environment import environment_report

    print(environment_report())


def cmd_train_base(args) -> None:
    from pimg.config import load_config
    from pimg.trainers.toy_base import ToyBaseConfig, train_base

    overrides = {
        "out_dir": args.out,
        "stages": args.stages,
        "clip.loop.steps": args.clip_steps,
        "vae.loop.steps": args.vae_steps,
        "unet.loop.steps": args.unet_steps,
    }
    config = load_config(ToyBaseConfig, args.config, overrides)
    folder = train_base(config, resume=args.resume)
    print(f"model written to {folder}")


def cmd_eval_toybase(args) -> None:
    from pimg.toyworld.evaluate import ToyBaseEvalConfig, evaluate_base

    config = ToyBaseEvalConfig(
        base=args.base,
        num_prompts=args.prompts,
        seeds=args.seeds,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        out_dir=args.out,
    )
    evaluate_base(config)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pimg", description="Personalized text-to-image generation.")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate images from a base model plus LoRAs and embeddings")
    g.add_argument(
        "--base", default="tiny", help="built-in name, diffusers folder, .safetensors file or hub id"
    )
    g.add_argument("--prompt", action="append", help="prompt (repeatable)")
    g.add_argument("--prompt-file", help="text file with one prompt per line")
    g.add_argument("--negative-prompt", default=None)
    g.add_argument("--lora", action="append", type=_lora_arg, metavar="PATH[:SCALE]")
    g.add_argument("--embedding", action="append", type=_embedding_arg, metavar="PATH[:TOKEN]")
    g.add_argument("--steps", type=int, default=25, help="denoising steps")
    g.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    g.add_argument("--scheduler", default=None, help="ddim, dpm++, euler, ... (default: the model's own)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--num-images", type=int, default=1, help="images per prompt")
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--width", type=int, default=None)
    g.add_argument("--out", default="out", help="output folder")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1")
    g.add_argument(
        "--config-folder",
        default=None,
        help="for single-file checkpoints offline: a diffusers folder of the same family",
    )
    g.set_defaults(func=cmd_generate)

    m = sub.add_parser("models", help="list built-in models and where their files are")
    m.set_defaults(func=cmd_models)
    e = sub.add_parser("env", help="print versions for bug reports")
    e.set_defaults(func=cmd_env)

    toy = sub.add_parser("toyworld", help="the toy world: train the tiny base model")
    toy_sub = toy.add_subparsers(dest="toy_command", required=True)
    tb = toy_sub.add_parser("train-base", help="train the tiny base model (stages clip, vae, unet)")
    tb.add_argument("--config", default=None, help="YAML file (a diff from the defaults)")
    tb.add_argument("--out", default=None)
    tb.add_argument("--stages", default=None, help="comma-separated subset of clip,vae,unet")
    tb.add_argument("--clip-steps", type=int, default=None)
    tb.add_argument("--vae-steps", type=int, default=None)
    tb.add_argument("--unet-steps", type=int, default=None)
    tb.add_argument("--resume", action="store_true", help="continue from the newest checkpoints")
    tb.set_defaults(func=cmd_train_base)

    ev = sub.add_parser("eval", help="evaluation commands that print figures")
    ev_sub = ev.add_subparsers(dest="eval_command", required=True)
    etb = ev_sub.add_parser("toybase", help="prompt-following accuracy of a toy-world base model")
    etb.add_argument("--base", default="tiny")
    etb.add_argument("--prompts", type=int, default=240, help="prompts per split")
    etb.add_argument("--seeds", type=int, default=8)
    etb.add_argument("--steps", type=int, default=25)
    etb.add_argument("--guidance", type=float, default=5.0)
    etb.add_argument("--out", default="out/eval-toybase")
    etb.set_defaults(func=cmd_eval_toybase)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except PimgError as exc:
        print(f"pimg: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pimg: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
