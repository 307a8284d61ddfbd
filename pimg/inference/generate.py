"""`pimg generate`: prompts in, PNGs plus the exact settings out."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pimg.errors import InputError
from pimg.hub_files import is_hub_file


@dataclass
class GenerateRequest:
    """Everything one `pimg generate` run needs.

    Attributes:
        base: built-in name, diffusers folder, single checkpoint file or hub id.
        prompts: prompts given directly; `prompt_file` adds one prompt per non-empty line.
        loras: (path, scale) pairs.
        embeddings: (path, token or None) pairs.
        guidance_scale: None picks the one the loaded subjects recorded, else the base's (see
            `pimg.inference.guidance.choose_guidance`).
        num_images: images per prompt; image k of a prompt uses seed `seed + k`.
        subjects: (result folder, region or None) pairs composed in one image (`pimg compose`),
            each subject's LoRA confined to its region (`pimg.fusion`); regions left out: the
            default layout for that many subjects.
        region_prompts: the subjects' own prompts, in the order of `subjects` (fewer: the rest
            read the global prompt).
        feather: soft region edges, as a share of the image side.
        base_steps: steps the base lays out the scene alone before the subjects act.
        id_adapter: an ID adapter (IP-Adapter / FaceID file or folder; "default": the base's shipped one).
        id_images: photos the ID adapter conditions on (their embeddings are averaged).
        id_embedding: a ready embedding file instead of `id_images`.
        id_scale: the ID adapter's weight.
        face_backend: a FaceID adapter's face embedder (None: the one it records, else insightface).
        id_image_encoder: the CLIP vision model (folder) of an IP-Adapter, Plus or FaceID Plus adapter
            that has no `image_encoder/` beside it.
        device: "auto" picks CUDA with half precision when present, else CPU fp32.
        hm_cfg: sample the `loras` with Hybrid-Model CFG at this subject scale (the base's scale is
            the guidance; `pimg.inference.hybrid_guidance`); None: they apply to every row, plain CFG.
    """

    base: str = "tiny"
    prompts: list[str] = field(default_factory=list)
    prompt_file: str | None = None
    negative_prompt: str | None = None
    loras: list[tuple[str, float]] = field(default_factory=list)
    embeddings: list[tuple[str, str | None]] = field(default_factory=list)
    subjects: list[tuple[str, str | None]] = field(default_factory=list)
    region_prompts: list[str] = field(default_factory=list)
    feather: float = 0.0
    base_steps: int = 0
    id_adapter: str | None = None
    id_images: list[str] = field(default_factory=list)
    id_embedding: str | None = None
    id_scale: float = 1.0
    face_backend: str | None = None
    id_image_encoder: str | None = None
    num_inference_steps: int = 25
    guidance_scale: float | None = None
    scheduler: str | None = None
    seed: int = 0
    num_images: int = 1
    height: int | None = None
    width: int | None = None
    out_dir: str = "out"
    device: str = "auto"
    config_folder: str | None = None
    hm_cfg: float | None = None

    def validate(self) -> None:
        """Cheap checks before any model loads, so a typo fails in a second, not after loading.

        Raises:
            InputError: naming the flag and its value: a non-finite or negative `--guidance`, a
                non-finite `--lora` scale, a size that is no multiple of 8, a missing file, ...
        """
        if self.guidance_scale is not None and not (
            isinstance(self.guidance_scale, int | float)
            and math.isfinite(self.guidance_scale)
            and self.guidance_scale >= 0
        ):
            # nan and inf parse as floats; they would draw an unguided or an all-black image.
            raise InputError(
                f"--guidance must be a finite number >= 0, got {self.guidance_scale!r}; 1 turns guidance off, "
                "and leaving --guidance out takes the subjects' recorded value, else the base's."
            )
        for path, scale in self.loras:
            if not isinstance(scale, int | float) or not math.isfinite(scale):
                raise InputError(
                    f"--lora {path}:{scale}: the scale must be a finite number (1 = as trained, 0 = off), "
                    f"got {scale!r}."
                )
        if self.num_inference_steps < 1:
            raise InputError(f"--steps must be >= 1, got {self.num_inference_steps}.")
        for name, value in (("height", self.height), ("width", self.width)):
            if value is not None and (value <= 0 or value % 8):
                raise InputError(
                    f"--{name} must be a positive multiple of 8, got {value}; try {max(8, value // 8 * 8)}."
                )
        for path, _ in [*self.loras, *self.embeddings, *self.subjects]:
            if not is_hub_file(path) and not Path(path).exists():  # a hub file is checked as it is fetched
                raise InputError(
                    f"{path} does not exist; check the path given to --lora / --embedding / --subject."
                )
        if len(self.region_prompts) > len(self.subjects):
            raise InputError(
                f"{len(self.region_prompts)} --region-prompt given for {len(self.subjects)} --subject; give at most "
                "one per subject, in the same order."
            )
        placed = [region is not None for _, region in self.subjects]
        if any(placed) and not all(placed):
            missing = [path for path, region in self.subjects if region is None]
            raise InputError(
                f"some subjects have a region and {', '.join(missing)} has none: give every --subject a region "
                "(PATH:left, PATH:0,0,0.5,1 or PATH:mask.png), or none to take the default layout."
            )
        if self.subjects and not 0 <= self.base_steps < self.num_inference_steps:
            raise InputError(
                f"--base-steps must be between 0 and --steps - 1 ({self.num_inference_steps - 1}), got {self.base_steps}."
            )
        if self.num_images < 1:
            raise InputError(f"--num-images must be >= 1, got {self.num_images}.")
        if self.id_adapter is not None and not (self.id_images or self.id_embedding):
            raise InputError(
                "--id-adapter needs the subject: pass --id-image PHOTO (or --id-embedding FILE)."
            )
        if self.hm_cfg is not None and not self.loras:
            raise InputError("--hm-cfg needs the subject as --lora (its LoRA is the personalised model).")
        if self.id_images and self.id_embedding:
            raise InputError("give --id-image or --id-embedding, not both.")
        if not math.isfinite(self.id_scale) or self.id_scale < 0:
            raise InputError(
                f"--id-scale must be a finite number >= 0 (0 = off, 1 = full), got {self.id_scale}."
            )
        for path in [*self.id_images, *([self.id_embedding] if self.id_embedding else [])]:
            if not Path(path).is_file():
                raise InputError(
                    f"{path} does not exist; check the path given to --id-image / --id-embedding."
                )

    def all_prompts(self) -> list[str]:
        prompts = list(self.prompts)
        if any(not p.strip() for p in prompts):
            raise InputError(
                'an empty --prompt was given; write the text to generate, e.g. --prompt "a red star".'
            )
        if self.prompt_file:
            path = Path(self.prompt_file)
            if not path.is_file():
                raise InputError(f"--prompt-file {path} does not exist.")
            prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            raise InputError("no prompt given: pass --prompt TEXT (repeatable) or --prompt-file FILE.")
        return prompts


def run_generate(request: GenerateRequest) -> list[Path]:
    """Generate every prompt's images into `request.out_dir`; returns the PNG paths.

    Writes `NNN_seedS.png` files (settings in their PNG text chunks) and `settings.json` with the
    request and each image's settings.
    """
    from tqdm.auto import tqdm

    from pimg.inference.guidance import choose_guidance
    from pimg.inference.parts import EmbeddingPart, LoraPart
    from pimg.inference.pipeline import PersonalizedPipeline
    from pimg.models import pick_device

    request.validate()
    prompts = request.all_prompts()
    device, dtype, reason = pick_device(request.device)
    print(f"pimg: {reason}")
    pp = PersonalizedPipeline.from_base(
        request.base,
        device=device,
        dtype=dtype,
        scheduler=request.scheduler,
        config_folder=request.config_folder,
    )
    pp.pipe.set_progress_bar_config(disable=True)
    for path, token in request.embeddings:
        pp.add(EmbeddingPart(path, token))
    loras = [LoraPart(path, scale) for path, scale in request.loras]
    if request.hm_cfg is not None:
        from pimg.inference.hybrid_guidance import HybridGuidance

        pp.add(HybridGuidance(loras, subject_scale=request.hm_cfg))
    else:
        for lora in loras:
            pp.add(lora)
    if request.id_images or request.id_embedding:
        from pimg.inference.id_adapter import part_from_request

        pp.add(part_from_request(request))
    composition = _composition(request) if request.subjects else None
    if composition is not None:
        pp.add(composition)
    subjects = [path for path, _ in [*request.loras, *request.embeddings, *request.subjects]]
    guidance, source = choose_guidance(request.base, subjects, request.guidance_scale)
    source = "--guidance" if source == "given" else source
    print(f"pimg: guidance {guidance:g} ({source})")
    out = Path(request.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    records = []
    bar = tqdm(total=len(prompts) * request.num_inference_steps, desc="generate", unit="step")
    for i, prompt in enumerate(prompts):
        images = pp.generate(
            prompt,
            negative_prompt=request.negative_prompt,
            num_images=request.num_images,
            num_inference_steps=request.num_inference_steps,
            guidance_scale=guidance,
            seed=request.seed,
            height=request.height,
            width=request.width,
            callback=lambda step, total: bar.update(1),
        )
        for k, generated in enumerate(images):
            path = generated.save(out / f"{i:03d}_{k:02d}_seed{generated.settings['seed']}.png")
            written.append(path)
            records.append({"file": path.name, **generated.settings})
    bar.close()
    for note in composition.notes if composition is not None else []:
        print(f"pimg: {note}")
    settings = {"request": asdict(request), "device": device, "dtype": str(dtype), "images": records}
    (out / "settings.json").write_text(json.dumps(settings, indent=2))
    print(f"pimg: wrote {len(written)} images and settings.json to {out}")
    return written


def _composition(request: GenerateRequest):
    """The `--subject` results as one `Composition` part, each in its region."""
    from pimg.fusion import Composition, default_regions, parse_region, regional_subject

    if all(region is None for _, region in request.subjects):
        regions = default_regions(len(request.subjects), feather=request.feather)
    else:
        regions = [parse_region(region, feather=request.feather) for _, region in request.subjects]
    prompts = list(request.region_prompts) + [None] * (len(request.subjects) - len(request.region_prompts))
    members, names = [], set()
    for index, ((path, _), region, prompt) in enumerate(zip(request.subjects, regions, prompts, strict=True)):
        folder = Path(path) if Path(path).is_dir() else Path(path).parent
        name = folder.name if folder.name not in names else f"{folder.name}_{index}"
        names.add(name)
        members.append(regional_subject(path, region, prompt=prompt, name=name))
    return Composition(members, base_steps=request.base_steps)
