"""The `pimg` command line: thin commands over library calls, imported lazily per command."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

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
    from pimg.config import RANDOM_SEED, resolve_seed
    from pimg.inference.generate import GenerateRequest, run_generate

    seed = resolve_seed(args.seed)
    if args.seed == RANDOM_SEED:
        print(f"pimg: --seed -1 drew seed {seed} (recorded in settings.json and each PNG)")
    request = GenerateRequest(
        base=args.base,
        prompts=args.prompt or [],
        prompt_file=args.prompt_file,
        negative_prompt=args.negative_prompt,
        loras=args.lora or [],
        embeddings=args.embedding or [],
        subjects=getattr(args, "subject", None) or [],
        region_prompts=getattr(args, "region_prompt", None) or [],
        feather=getattr(args, "feather", 0.0),
        base_steps=getattr(args, "base_steps", 0),
        id_adapter=getattr(args, "id_adapter", None),
        id_images=getattr(args, "id_image", None) or [],
        id_embedding=getattr(args, "id_embedding", None),
        id_scale=getattr(args, "id_scale", 1.0),
        face_backend=getattr(args, "face_backend", None),
        id_image_encoder=getattr(args, "id_image_encoder", None),
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        scheduler=args.scheduler,
        seed=seed,
        num_images=args.num_images,
        height=args.height,
        width=args.width,
        out_dir=args.out,
        device=args.device,
        config_folder=args.config_folder,
        hm_cfg=getattr(args, "hm_cfg", None),
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
    from pimg.trainers.toy_base import load_recipe, train_phases

    overrides = {
        "out_dir": args.out,
        "stages": args.stages,
        "clip.loop.steps": args.clip_steps,
        "vae.loop.steps": args.vae_steps,
        "unet.loop.steps": args.unet_steps,
        "decoder.loop.steps": args.decoder_steps,
    }
    phases = load_recipe(args.config, overrides, phase=args.phase)
    folder = train_phases(phases, resume=args.resume)
    print(f"result written to {folder}")


def cmd_export_base(args) -> None:
    from pimg.toyworld.architecture import export_model

    print(f"exported to {export_model(args.model, args.to)}")


def _set_arg(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--set {text!r}: write KEY=VALUE, e.g. --set loop.warmup_steps=50")
    return key.strip(), value.strip()


def cmd_train(args) -> None:
    from pimg.trainers.personalize import load_train_config, resolve_preset, resume_config, train

    # Under a launcher every process runs this command; the first one speaks for the run.
    say = print if os.environ.get("RANK", "0") == "0" else (lambda *a, **k: None)
    overrides, sources = _train_overrides(args)
    if args.resume:
        out = overrides.get("out_dir")
        config = resume_config(args.method, out, overrides, sources, config_path=args.config)
        say(f"pimg: settings from {Path(out) / 'config.json'}, the run being resumed")
    else:
        preset = resolve_preset(args.method, args.config, overrides.get("base"))
        say(
            f"pimg: settings from {preset}"
            if preset
            else "pimg: settings from the method's defaults (no preset)"
        )
        config = load_train_config(args.method, preset, overrides, sources)
        if str(overrides.get("loop.seed")) == "-1":
            say(f"pimg: --seed -1 drew seed {config.loop.seed} (recorded in config.json)")
    out = train(args.method, config, resume=args.resume)
    say(f"{args.method} result written to {out}")


def _train_overrides(args) -> tuple[dict, dict]:
    """The config keys the command line gives, and how each was given (for messages): flags whose
    dest starts with "cfg." name a key; --set covers every other key, and wins over a flag."""
    overrides, sources = {}, {}
    for dest, value in vars(args).items():
        if dest.startswith("cfg.") and value is not None:
            flag = args.flag_names[dest]
            overrides[dest[4:]] = value
            sources[dest[4:]] = flag if isinstance(value, bool) else f"{flag} {value}"
    for key, value in args.set or []:
        overrides[key], sources[key] = value, f"--set {key}={value}"
    return overrides, sources


def _add_common_train_arguments(parser, method) -> None:
    """The flags every `pimg train METHOD` shares, each only where the method's config has its key
    (`pimg train id-adapter` takes no --photos: it trains across many subjects)."""

    def add(*flags, **kwargs):
        dest = kwargs.get("dest", "")
        if not dest.startswith("cfg.") or method.has_setting(dest[4:].split(".")[0]):
            parser.add_argument(*flags, **kwargs)

    # None defaults mean "not given": the preset (or the method's default) decides, and --resume
    # keeps the saved value. The help says what that default is.
    add(
        "--base",
        dest="cfg.base",
        metavar="BASE",
        help="built-in name (tiny), diffusers folder, file or hub id (default: tiny)",
    )
    add(
        "--photos",
        dest="cfg.photos",
        metavar="DIR",
        help="folder of the subject's photos (+ optional .txt captions); required",
    )
    add(
        "--token",
        dest="cfg.token",
        metavar="WORD",
        help="word bound to the subject (default: sks; ti: <sks>); ti and --pivotal need a new one, "
        "e.g. '<sks>'",
    )
    add(
        "--class-noun",
        dest="cfg.class_noun",
        metavar="WORD",
        help="what the subject is, e.g. dog; required",
    )
    add(
        "--auto-caption",
        dest="cfg.auto_caption",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="caption photos without a .txt by their setting (e.g. 'on a beach'), chosen by the base "
        "itself from caption_phrases, so the token learns the subject and not its background "
        "(default: the preset's; on for tiny)",
    )
    add(
        "--config",
        default=None,
        help="YAML file or installed preset name (e.g. lora_sd15); default: the built-in base's preset "
        "(configs/<method>_tiny.yaml for tiny), else the method's defaults",
    )
    add(
        "--steps",
        dest="cfg.loop.steps",
        metavar="N",
        type=int,
        help="optimizer steps in all (default: the preset's, e.g. 400 for lora on tiny); with --resume, "
        "more steps train on",
    )
    add(
        "--lr",
        dest="cfg.loop.learning_rate",
        metavar="LR",
        type=float,
        help="peak learning rate (default: the preset's, else the method's)",
    )
    add(
        "--batch-size",
        dest="cfg.batch_size",
        metavar="N",
        type=int,
        help="photos per micro-batch (default: the preset's, e.g. 4 on tiny, else 1)",
    )
    add(
        "--resolution",
        dest="cfg.resolution",
        metavar="PX",
        type=int,
        help="training size, a multiple of 8 (default: the base's: tiny 64, SD 1.5 512, SDXL 1024)",
    )
    add(
        "--mixed-precision",
        dest="cfg.loop.mixed_precision",
        choices=("no", "bf16", "fp16"),
        help="autocast precision (default: no, i.e. fp32; fp16 needs CUDA)",
    )
    add(
        "--seed",
        dest="cfg.loop.seed",
        metavar="N",
        type=int,
        help="seed of every random draw of the run; -1 draws one, printed and saved in config.json "
        "(default: 0)",
    )
    add(
        "--checkpoint-every",
        dest="cfg.loop.checkpoint_every",
        metavar="N",
        type=int,
        help="write a resumable checkpoint every N steps (default: 0, only at the end)",
    )
    add(
        "--sample-every",
        dest="cfg.loop.sample_every",
        metavar="N",
        type=int,
        help="draw sample images every N steps (default: 0, only at the end)",
    )
    add(
        "--out",
        dest="cfg.out_dir",
        metavar="DIR",
        help="output folder (default: out/train); with --resume, the run to continue",
    )
    add(
        "--resume",
        action="store_true",
        help="continue the run in --out from its newest checkpoint with its saved config.json; flags "
        "given again must agree with it, except --steps, --checkpoint-every, --sample-every",
    )
    add(
        "--set",
        action="append",
        type=_set_arg,
        metavar="KEY=VALUE",
        help="any config key, e.g. loop.warmup_steps=50 (repeatable; wins over the flags)",
    )


def _add_train_parser(sub) -> None:
    from pimg.methods import list_methods

    methods = list_methods()
    train = sub.add_parser("train", help=f"learn a subject from photos: {', '.join(m.name for m in methods)}")
    method_parsers = train.add_subparsers(dest="method", required=True)
    for method in methods:
        parser = method_parsers.add_parser(method.name, help=method.summary)
        _add_common_train_arguments(parser, method)
        for flag in method.flags:
            if flag.type is None:
                action = "store_true" if flag.switch else "store_false"
                parser.add_argument(
                    flag.flag, dest=f"cfg.{flag.key}", action=action, default=None, help=flag.help
                )
            else:
                parser.add_argument(
                    flag.flag,
                    dest=f"cfg.{flag.key}",
                    type=flag.type,
                    metavar=flag.key.upper(),
                    help=flag.help,
                )
        # Which flag sets which key, so an error about a value names the flag that gave it.
        names = {a.dest: a.option_strings[0] for a in parser._actions if a.dest.startswith("cfg.")}
        parser.set_defaults(flag_names=names)
    train.set_defaults(func=cmd_train)


def cmd_eval_toysubject(args) -> None:
    from pimg.trainers.toy_subject_eval import ToySubjectEvalConfig, evaluate_subjects

    fields = dict(
        method=args.method,
        base=args.base,
        subjects=args.subjects,
        subject_set=args.subject_set,
        subject_seed=args.subject_seed,
        steps=args.steps,
        images_per_background=args.images,
        guidance_scale=args.guidance,
        out_dir=args.out,
        method_config=args.config,
        photos_per_subject=args.photos,
        scales=tuple(args.scales) if args.scales else None,
        model=args.model,
        beside=args.beside,
        finetune_steps=args.finetune_steps,
        hm_cfg=args.hm_cfg,
        caption_backgrounds=False if args.bare_photos else None,
        placed=args.placed or None,
    )
    config = ToySubjectEvalConfig(**{k: v for k, v in fields.items() if v is not None})
    evaluate_subjects(config, overrides=_checked_set(args.method, args.set or []))


def cmd_eval_toycompose(args) -> None:
    from pimg.trainers.toy_compose_eval import ToyComposeEvalConfig, evaluate_compositions

    config = ToyComposeEvalConfig(
        pairs=args.pairs,
        triples=args.triples,
        subjects=args.subjects,
        subject_seed=args.subject_seed,
        images_per_pair=args.images,
        steps=args.steps,
        region_prompts=not args.global_prompt_only,
        base_steps=args.base_steps,
        guidance_scale=args.guidance,
        out_dir=args.out,
    )
    evaluate_compositions(config)


def _float_list(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"{text!r}: write numbers separated by commas, e.g. 0,0.5,1"
        ) from exc


def _checked_set(variant: str, pairs: list[tuple[str, str]]) -> dict[str, str]:
    """--set pairs for a method's config, checked up front so a bad one names its --set before training."""
    from pimg.config import check_override
    from pimg.methods import evaluation_variants

    config_class = evaluation_variants()[variant][0].config_class()
    for key, value in pairs:
        check_override(config_class, key, value, f"--set {key}={value}")
    return dict(pairs)


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


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _int_csv(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in _csv(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. 0,1,2") from exc


def _from_args(cls, args, **overrides):
    """A config dataclass from the parsed flags whose names match its fields."""
    import dataclasses

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**(values | overrides))


def _metric_device(choice: str) -> str:
    from pimg.models import pick_device

    device, _, reason = pick_device(choice)
    print(f"pimg: {reason.split(' with ')[0]}; metrics are computed in float32")
    return device


def cmd_eval_dreambench(args) -> None:
    from pimg.metrics.evaluate import DreamBenchConfig, evaluate_dreambench

    evaluate_dreambench(_from_args(DreamBenchConfig, args, device=_metric_device(args.device)))


def cmd_eval_real_vs_real(args) -> None:
    from pimg.metrics.real_vs_real import run_real_vs_real

    run_real_vs_real(
        args.dataset,
        args.metric,
        args.backend,
        args.model,
        pretrained=args.pretrained,
        device=_metric_device(args.device),
        batch_size=args.batch_size,
        out=args.out,
    )


def cmd_eval_faces(args) -> None:
    from pimg.metrics.real_vs_real import run_face_verification

    run_face_verification(args.dataset, args.backend, args.model, out=args.out)


def cmd_bench_generate(args) -> None:
    from pimg.metrics.bench import BenchGenerateConfig, generate_bench

    generate_bench(_from_args(BenchGenerateConfig, args))


def _add_metric_parsers(ev_sub) -> None:
    """`pimg eval dreambench | real-vs-real | faces`."""
    db = ev_sub.add_parser("dreambench", help="DINO, CLIP-I, CLIP-T (and face ID) by the DreamBench protocol")
    db.add_argument(
        "--dataset", required=True, help="DreamBench-layout folder (photos + prompts_and_classes.txt)"
    )
    db.add_argument(
        "--generated", required=True, help="folder of {subject}/{prompt:02d}_{k}.png, or manifest.jsonl"
    )
    db.add_argument("--out", required=True, help="folder for report.json/.md, CSVs and per_subject.png")
    db.add_argument(
        "--metrics",
        type=_csv,
        default=("dino", "clip-i", "clip-t", "face-id"),
        help="comma-separated (default dino,clip-i,clip-t,face-id; face-id scores face-class subjects only)",
    )
    db.add_argument("--subjects", type=_csv, default=(), help="comma-separated subset (default: all)")
    db.add_argument(
        "--images-per-prompt", type=int, default=4, help="images per prompt (default: %(default)s)"
    )
    db.add_argument(
        "--token",
        default="sks",
        help="identifier of subjects whose dataset line names none (default: %(default)s)",
    )
    token = db.add_mutually_exclusive_group()
    token.add_argument(
        "--strip-token",
        dest="clip_t_token",
        action="store_const",
        const="strip",
        help="CLIP-T prompt without the identifier token (the default)",
    )
    token.add_argument(
        "--keep-token",
        dest="clip_t_token",
        action="store_const",
        const="keep",
        help="CLIP-T prompt with the identifier token (default: --strip-token)",
    )
    db.add_argument(
        "--clip-backend",
        default="open_clip",
        help="open_clip, transformers, toy, or a local model path (default: %(default)s)",
    )
    db.add_argument(
        "--clip-model",
        default=None,
        help="e.g. ViT-B-32, openai/clip-vit-base-patch32, tiny, a folder (default: the backend's)",
    )
    db.add_argument(
        "--clip-pretrained", default=None, help="open_clip tag or local checkpoint (default openai)"
    )
    db.add_argument(
        "--dino-backend",
        default="transformers",
        help="transformers, toy, or a local model path (default: %(default)s)",
    )
    db.add_argument(
        "--dino-model", default=None, help="hub id or local folder (default facebook/dino-vits16)"
    )
    db.add_argument(
        "--face-backend",
        default="auto",
        help="auto (insightface if installed, else dlib), insightface, dlib (default: %(default)s)",
    )
    db.add_argument(
        "--face-model",
        default=None,
        help="insightface pack name/folder, or a folder of dlib .dat files (default: the backend's)",
    )
    db.add_argument(
        "--batch-size", type=int, default=32, help="images per embedding batch (default: %(default)s)"
    )
    db.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 (default: %(default)s)")
    db.set_defaults(func=cmd_eval_dreambench, clip_t_token="strip")

    rr = ev_sub.add_parser("real-vs-real", help="same-subject vs different-subject similarity of real photos")
    rr.add_argument("--dataset", required=True, help="folder of subject folders (e.g. DreamBench, faces)")
    rr.add_argument(
        "--metric", default="clip-i", help="clip-i, dino, face-id or toy-fidelity (default: %(default)s)"
    )
    rr.add_argument(
        "--backend", default=None, help="backend name or local model path (default: the metric's)"
    )
    rr.add_argument("--model", default=None, help="backbone name, hub id or folder (default: the backend's)")
    rr.add_argument("--pretrained", default=None, help="open_clip tag or checkpoint (default: the backend's)")
    rr.add_argument(
        "--batch-size", type=int, default=32, help="images per embedding batch (default: %(default)s)"
    )
    rr.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 (default: %(default)s)")
    rr.add_argument("--out", default=None, help="JSON file for the full report (default: print only)")
    rr.set_defaults(func=cmd_eval_real_vs_real)

    fa = ev_sub.add_parser("faces", help="same-person vs different-person face verification on real photos")
    fa.add_argument("--dataset", required=True, help="photos by person (identities.csv or one folder each)")
    fa.add_argument("--backend", default="dlib", help="dlib or insightface (default: %(default)s)")
    fa.add_argument(
        "--model",
        default=None,
        help="folder of dlib .dat files, or insightface pack (default: the backend's)",
    )
    fa.add_argument("--out", default=None, help="JSON file for the full report (default: print only)")
    fa.set_defaults(func=cmd_eval_faces)


def _add_bench_parser(sub) -> None:
    """`pimg bench generate`."""
    bench = sub.add_parser("bench", help="benchmark image sets")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    bg = bench_sub.add_parser(
        "generate", help="the DreamBench set (subjects x 25 prompts x 4) for trained subjects"
    )
    bg.add_argument("--dataset", required=True, help="DreamBench-layout folder")
    bg.add_argument(
        "--subject-weights", required=True, help="folder of {subject}/ with a LoRA and/or embedding"
    )
    bg.add_argument("--out", required=True, help="folder for {subject}/{prompt:02d}_{k}.png and bench.json")
    bg.add_argument(
        "--base",
        default="tiny",
        help="built-in name, diffusers folder, file or hub id (default: %(default)s)",
    )
    bg.add_argument(
        "--subjects", type=_csv, default=(), help="comma-separated subset (default: all with weights)"
    )
    bg.add_argument("--prompts", type=_int_csv, default=(), help="prompt indices, e.g. 0,1 (default: all 25)")
    bg.add_argument(
        "--images-per-prompt", type=int, default=4, help="images per prompt (default: %(default)s)"
    )
    bg.add_argument(
        "--token",
        default="sks",
        help="identifier of subjects whose dataset line names none and that have no embedding (default: %(default)s)",
    )
    bg.add_argument(
        "--lora-scale", type=float, default=1.0, help="scale of each subject's LoRA (default: %(default)s)"
    )
    bg.add_argument(
        "--steps",
        dest="num_inference_steps",
        type=int,
        default=25,
        help="denoising steps (default: %(default)s)",
    )
    bg.add_argument(
        "--guidance",
        dest="guidance_scale",
        type=float,
        default=None,
        help="classifier-free guidance (default: each subject's recorded one, else the base's)",
    )
    bg.add_argument("--negative-prompt", default=None, help="what to steer away from (default: none)")
    bg.add_argument(
        "--seed", type=int, default=0, help="image k of each prompt uses seed + k (default: %(default)s)"
    )
    bg.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 (default: %(default)s)")
    bg.set_defaults(func=cmd_bench_generate)


def _add_id_adapter_arguments(g) -> None:
    """`pimg generate`'s tuning-free subject: an ID adapter and a photo (or an embedding)."""
    g.add_argument(
        "--id-adapter",
        metavar="PATH",
        help="IP-Adapter / IP-Adapter-FaceID file or folder (`pimg train id-adapter` output), or a hub file "
        "hf://OWNER/REPO/PATH; 'default' or left out with --id-image: the one shipped for the base (tiny)",
    )
    g.add_argument(
        "--id-image",
        action="append",
        metavar="PHOTO",
        help="photo of the subject or face the ID adapter conditions on (repeatable: embeddings averaged)",
    )
    g.add_argument(
        "--id-embedding",
        metavar="FILE",
        help="a ready embedding (.safetensors or .npy) instead of --id-image",
    )
    g.add_argument(
        "--id-scale",
        type=float,
        default=1.0,
        help="weight of the image prompt, 0 to 1 (default: %(default)s)",
    )
    g.add_argument(
        "--id-image-encoder",
        metavar="FOLDER",
        help="CLIP vision model of an adapter with no image_encoder/ beside it (FaceID Plus / PlusV2: "
        "h94/IP-Adapter's models/image_encoder, ViT-H)",
    )
    g.add_argument(
        "--face-backend",
        choices=("insightface", "dlib"),
        default=None,
        help="face embedder of a FaceID adapter (default: the one it records, else insightface)",
    )


def _add_generation_arguments(g) -> None:
    """The arguments `pimg generate` and `pimg compose` share."""
    g.add_argument(
        "--base",
        default="tiny",
        help="built-in name, diffusers folder, .safetensors file or hub id (default: %(default)s)",
    )
    g.add_argument("--prompt", action="append", help="text to generate (repeatable; or --prompt-file)")
    g.add_argument("--prompt-file", help="text file with one prompt per line (after the --prompt ones)")
    g.add_argument("--negative-prompt", default=None, help="what to steer away from (default: none)")
    g.add_argument(
        "--lora",
        action="append",
        type=_lora_arg,
        metavar="PATH[:SCALE]",
        help="LoRA file, training result folder or hub file hf://OWNER/REPO/PATH, e.g. out/sks:0.8 "
        "(repeatable; default scale 1)",
    )
    g.add_argument(
        "--embedding",
        action="append",
        type=_embedding_arg,
        metavar="PATH[:TOKEN]",
        help="Textual Inversion file (or hub file hf://OWNER/REPO/PATH), optionally bound to another word, "
        "e.g. emb.safetensors:'<zwx>' (repeatable; default: the file's own token)",
    )
    g.add_argument("--steps", type=int, default=25, help="denoising steps (default: %(default)s)")
    g.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="classifier-free guidance scale (default: the lowest the loaded subjects recorded, else "
        "the base's; tiny: 3)",
    )
    g.add_argument("--scheduler", default=None, help="ddim, dpm++, euler, ... (default: the model's own)")
    g.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of a prompt's first image, image k uses seed + k; -1 draws one, printed and "
        "recorded in settings.json and the PNGs (default: %(default)s)",
    )
    g.add_argument("--num-images", type=int, default=1, help="images per prompt (default: %(default)s)")
    g.add_argument(
        "--height", type=int, default=None, help="pixels, a multiple of 8 (default: the base's; tiny 64)"
    )
    g.add_argument(
        "--width", type=int, default=None, help="pixels, a multiple of 8 (default: the base's; tiny 64)"
    )
    g.add_argument("--out", default="out", help="output folder (default: %(default)s)")
    g.add_argument(
        "--device",
        default="auto",
        help="auto (CUDA in bf16/fp16 when present, else CPU fp32), cpu, cuda, cuda:1 (default: %(default)s)",
    )
    g.add_argument(
        "--config-folder",
        default=None,
        help="for single-file checkpoints offline: a diffusers folder of the same family (default: "
        "the family's configs from the hub)",
    )


def _subject_arg(text: str) -> tuple[str, str | None]:
    # The region follows the last colon (a box has commas, not colons); none: the default layout.
    path, sep, region = text.rpartition(":")
    if not sep or not path or "/" in region and not Path(region).suffix:
        return text, None
    return path, region


def _add_compose_parser(sub) -> None:
    c = sub.add_parser(
        "compose",
        help="several subjects in one image, each subject's LoRA confined to its region",
        description="Each --subject is a result folder (LoRA, pivotal or Textual Inversion) and a region: "
        "left, right, top, bottom, center, top-left, ..., a box x0,y0,x1,y1 in 0-1, or a mask image. "
        "Regions overlap in proportion; pixels outside every region follow the global --prompt.",
    )
    c.add_argument(
        "--subject",
        action="append",
        required=True,
        type=_subject_arg,
        metavar="PATH[:REGION]",
        help="a result folder and its region, e.g. out/dog:left or out/cat:0.5,0,1,1 (repeatable; no regions: "
        "left/right, thirds or quadrants by count)",
    )
    c.add_argument(
        "--region-prompt",
        action="append",
        default=None,
        help="a subject's own prompt, in --subject order (repeatable; default: the global --prompt)",
    )
    c.add_argument(
        "--feather",
        type=float,
        default=0.0,
        help="soft region edges, a share of the image side (default: %(default)s)",
    )
    c.add_argument(
        "--base-steps",
        type=int,
        default=0,
        help="first steps in which the base lays out the scene alone (default: %(default)s)",
    )
    _add_generation_arguments(c)
    c.set_defaults(func=cmd_generate)


def cmd_hypernet_predict(args) -> None:
    import json

    from pimg.hypernets.predict import personalize

    out = personalize(
        args.photos,
        args.out,
        base=args.base,
        model=args.hypernet,
        finetune_steps=args.finetune_steps,
        class_noun=args.class_noun or "",
    )
    record = json.loads((out / "config.json").read_text())
    tuned = f", fine-tune {record['finetune_seconds']:.1f} s" if record.get("finetune_seconds") else ""
    print(
        f"pimg: predicted from {record['photos']} photo(s) in {record['predict_seconds']:.2f} s (loading "
        f"{record['load_seconds']:.1f} s{tuned}); the subject is a LoRA bound to '{record['token']}': {out}"
    )


def _add_hypernet_parser(sub) -> None:
    hn = sub.add_parser("hypernet", help="a subject's LoRA from its photos in one pass (hypernetwork)")
    hn_sub = hn.add_subparsers(dest="hypernet_command", required=True)
    p = hn_sub.add_parser(
        "predict", help="predict a subject's LoRA from its photos; writes a LoRA result folder"
    )
    p.add_argument("--photos", required=True, help="folder of the subject's photos (1 or more)")
    p.add_argument("--out", required=True, help="the result folder (LoRA, kohya export, model card, config)")
    p.add_argument("--base", default="tiny", help="base model (default: %(default)s)")
    p.add_argument(
        "--hypernet", default=None, help="hypernetwork folder (default: the one shipped for the base)"
    )
    p.add_argument(
        "--finetune-steps",
        type=int,
        default=0,
        help="continue with this many LoRA steps (default: %(default)s)",
    )
    p.add_argument(
        "--class-noun", default=None, help="the subject's class noun, for the fine-tune's captions"
    )
    p.set_defaults(func=cmd_hypernet_predict)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pimg", description="Personalized text-to-image generation.")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate images from a base model plus LoRAs and embeddings")
    _add_generation_arguments(g)
    _add_id_adapter_arguments(g)
    g.add_argument(
        "--hm-cfg",
        type=float,
        default=None,
        metavar="SCALE",
        help="sample the --lora subjects with Hybrid-Model CFG at this subject scale (the base's scale is "
        "--guidance); default: plain guidance",
    )
    g.set_defaults(func=cmd_generate)
    _add_compose_parser(sub)

    _add_train_parser(sub)
    _add_hypernet_parser(sub)

    m = sub.add_parser("models", help="list built-in models and where their files are")
    m.set_defaults(func=cmd_models)
    e = sub.add_parser("env", help="print versions for bug reports")
    e.set_defaults(func=cmd_env)

    toy = sub.add_parser("toyworld", help="the toy world: train the tiny base model")
    toy_sub = toy.add_subparsers(dest="toy_command", required=True)
    tb = toy_sub.add_parser(
        "train-base",
        help="train the tiny base model (stages clip, vae, unet, decoder; a recipe's phases in order)",
        description="Without --config: the shipped tiny's first phase; configs/toy_base.yaml: all five.",
    )
    tb.add_argument(
        "--config",
        default=None,
        help="YAML file (a diff from the defaults); its `phases:` run in order (default: the shipped "
        "tiny's first phase)",
    )
    tb.add_argument(
        "--phase",
        default=None,
        metavar="NAME",
        help="run only this phase of the --config recipe, e.g. binding",
    )
    tb.add_argument(
        "--out",
        default=None,
        help="run folder (with several phases: only with --phase; default: the recipe's, e.g. runs/tiny)",
    )
    tb.add_argument(
        "--stages",
        default=None,
        help="comma-separated subset of clip,vae,unet,decoder (default: the recipe's, else all four)",
    )
    for stage in ("clip", "vae", "unet", "decoder"):
        tb.add_argument(
            f"--{stage}-steps",
            type=int,
            default=None,
            help=f"steps of the {stage} stage, for every phase run (default: the recipe's)",
        )
    tb.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest checkpoints; finished stages and phases are skipped",
    )
    tb.set_defaults(func=cmd_train_base)
    ex = toy_sub.add_parser("export", help="re-save a trained model folder in fp16 (as `tiny` ships)")
    ex.add_argument("--model", required=True, help="the trained model folder, e.g. runs/tiny/unet/model")
    ex.add_argument("--to", required=True, help="the folder to write, e.g. pimg/assets/tiny")
    ex.set_defaults(func=cmd_export_base)

    ev = sub.add_parser("eval", help="evaluation commands that print figures")
    ev_sub = ev.add_subparsers(dest="eval_command", required=True)
    etb = ev_sub.add_parser("toybase", help="prompt-following accuracy of a toy-world base model")
    etb.add_argument(
        "--base",
        default="tiny",
        help="built-in name or toy-world model folder (with clip/) (default: %(default)s)",
    )
    etb.add_argument(
        "--prompts", type=int, default=240, help="prompts per split (seen, held-out) (default: %(default)s)"
    )
    etb.add_argument("--seeds", type=int, default=8, help="images per prompt (default: %(default)s)")
    etb.add_argument("--steps", type=int, default=25, help="denoising steps (default: %(default)s)")
    etb.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="default: a built-in's recommended guidance; for a folder, tiny's",
    )
    etb.add_argument(
        "--out",
        default="out/eval-toybase",
        help="folder for report.json and samples.png (default: %(default)s)",
    )
    etb.set_defaults(func=cmd_eval_toybase)
    ets = ev_sub.add_parser(
        "toysubject", help="train on toy-world subjects; print fidelity, backgrounds, drift"
    )
    from pimg.methods import evaluation_variants

    ets.add_argument("--method", required=True, choices=list(evaluation_variants()), help="method or variant")
    ets.add_argument("--base", default=None, help="default: tiny")
    ets.add_argument("--subjects", type=int, default=None, help="evaluation subjects to train on (default 5)")
    ets.add_argument(
        "--subject-set",
        choices=("eval", "held-out"),
        default=None,
        help="the fixed evaluation subjects, or fresh held-out ones no cross-subject training saw "
        "(default: eval)",
    )
    ets.add_argument(
        "--subject-seed", type=int, default=None, help="seed of the held-out subjects (default 0)"
    )
    ets.add_argument("--steps", type=int, default=None, help="training steps (default: the method preset's)")
    ets.add_argument("--images", type=int, default=None, help="images per background (default 4)")
    ets.add_argument(
        "--guidance", type=float, default=None, help="default: the method config's, else the base's"
    )
    ets.add_argument("--config", default=None, help="method YAML (default: configs/<method>_tiny.yaml)")
    ets.add_argument(
        "--set",
        action="append",
        type=_set_arg,
        metavar="KEY=VALUE",
        help="a method config key for every subject's training, e.g. rank=4 (repeatable)",
    )
    ets.add_argument("--photos", type=int, default=None, help="photos per subject (default 4)")
    ets.add_argument(
        "--bare-photos",
        action="store_true",
        help="trained methods get photos without the helper captions naming their backgrounds, as a "
        "user gives them (the tiny presets caption them themselves; --set auto_caption=false: not)",
    )
    ets.add_argument(
        "--placed",
        action="store_true",
        help="prompts also name a size and a position (a large sks circle at the left on ...); "
        "prints how often the object is placed as asked",
    )
    ets.add_argument(
        "--scales",
        type=_float_list,
        default=None,
        help="also score at these scales, e.g. 0,0.25,0.5,0.75,1 (LoRA or ID adapter scale)",
    )
    ets.add_argument(
        "--model",
        default=None,
        help="ID adapter or hypernetwork file or folder (default: the one shipped for the base)",
    )
    ets.add_argument(
        "--finetune-steps",
        type=int,
        default=None,
        help="hypernet: fine-tune each prediction this many LoRA steps (default 0)",
    )
    ets.add_argument(
        "--hm-cfg",
        type=float,
        default=None,
        metavar="SCALE",
        help="sample with Hybrid-Model CFG at this subject scale (default: plain guidance)",
    )
    ets.add_argument(
        "--beside", default=None, help="report.json of another method on the same subjects, shown beside"
    )
    ets.add_argument("--out", default=None, help="default: out/eval-toysubject-<method>")
    ets.set_defaults(func=cmd_eval_toysubject)
    etc = ev_sub.add_parser(
        "toycompose", help="two or three toy subjects in one image: fusion beside the baselines, by pixels"
    )
    etc.add_argument("--pairs", type=int, default=6, help="subject pairs (default: %(default)s)")
    etc.add_argument(
        "--triples", type=int, default=2, help="three-subject compositions (default: %(default)s)"
    )
    etc.add_argument(
        "--subjects",
        choices=("eval", "generated"),
        default="eval",
        help="the fixed evaluation subjects, or subjects from the generator (default: %(default)s)",
    )
    etc.add_argument(
        "--subject-seed", type=int, default=0, help="seed of generated subjects (default: %(default)s)"
    )
    etc.add_argument("--images", type=int, default=16, help="images per pair (default: %(default)s)")
    etc.add_argument("--steps", type=int, default=None, help="LoRA training steps (default: the preset's)")
    etc.add_argument(
        "--base-steps", type=int, default=0, help="steps the base lays out alone (default: %(default)s)"
    )
    etc.add_argument(
        "--global-prompt-only", action="store_true", help="regions read the global prompt, not their own"
    )
    etc.add_argument("--guidance", type=float, default=None, help="default: the LoRAs' recorded guidance")
    etc.add_argument("--out", default=None, help="default: out/eval-toycompose (subjects' LoRAs are reused)")
    etc.set_defaults(func=cmd_eval_toycompose)
    _add_metric_parsers(ev_sub)
    _add_bench_parser(sub)

    # Listed for `pimg --help`; `main` hands `pimg app ...` to the demo's own parser.
    sub.add_parser("app", help="start the web demo (pimg app --help lists its options)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["app"]:  # the demo parses its own options (`pimg app --help` lists them)
        from pimg.frontends.app import main as app_main

        app_main(argv[1:])
        return 0
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
