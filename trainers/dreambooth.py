"""DreamBooth (Ruiz et al. 2023): fine-tune the whole UNet (optionally the text encoder) on a subject.

Prior preservation (Ruiz et al., eq. 2; `SubjectTraining`, shared with LoRA) is on by default: the
base first draws `num_class_images` images of the bare class ("a star"), cached on disk and reused by
later runs with the same base, prompt and size, and each step adds their denoising loss, weighted by
`prior_weight`, so the class noun keeps meaning what it meant and the subject does not leak into
every "star".

Output: a full diffusers pipeline folder (`StableDiffusionPipeline.from_pretrained(out_dir)`), a
README.md model card and the resolved `config.json`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from pimg.trainers.loop import LoopConfig
from pimg.trainers.subject_training import SubjectConfig, SubjectTraining


@dataclass
class DreamBoothConfig(SubjectConfig):
    """Settings of `pimg train dreambooth` (plus the shared `SubjectConfig` fields, prior preservation's
    among them: on here).

    Attributes:
        train_text_encoder: fine-tune the text encoder(s) too.
        loop: the training loop's settings.
    """

    train_text_encoder: bool = False
    prior_preservation: bool = True
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(steps=400, learning_rate=5e-6))


class DreamBoothMethod(SubjectTraining):
    """Full UNet fine-tuning with optional prior preservation and text-encoder training."""

    method_name = "dreambooth"

    def __init__(self, config: DreamBoothConfig):
        super().__init__(
            config,
            seed=config.loop.seed,
            accumulation=config.loop.gradient_accumulation,
            mixed_precision=config.loop.mixed_precision,
        )
        self.trains_text = config.train_text_encoder
        self.pipe.unet.requires_grad_(True)
        if config.train_text_encoder:
            for encoder in self.text_components().values():
                encoder.requires_grad_(True)
        self.finish_setup()

    def trainable_modules(self):
        modules = {"unet": self.pipe.unet}
        if self.trains_text:
            modules.update(self.text_components())
        return modules

    def trainable_parameters(self):
        return [p for m in self.trainable_modules().values() for p in m.parameters() if p.requires_grad]

    def save(self, out_dir: Path) -> None:
        c = self.config
        # On CUDA with mixed precision the frozen parts sit in half precision (`finish_setup`). Saved so,
        # the text encoder's config would name that dtype, and transformers 5 loads a model in the dtype
        # its config names while diffusers loads the UNet in float32: `from_pretrained(out_dir)` without a
        # dtype would fail at the first call. The folder is written in float32, as the base was loaded
        # (half to float32 is exact), then the training dtypes come back.
        training_dtypes = {n: m.dtype for n, m in self.components().items() if m.dtype != torch.float32}
        for name in training_dtypes:
            getattr(self.pipe, name).to(torch.float32)
        try:
            self.pipe.save_pretrained(str(out_dir), safe_serialization=True)
        finally:
            for name, dtype in training_dtypes.items():
                getattr(self.pipe, name).to(dtype)
        prompt = self.prompt(c.prompt_template)
        usage = (
            "from diffusers import DiffusionPipeline\n\n"
            f'pipe = DiffusionPipeline.from_pretrained("{out_dir}")\n'
            f'image = pipe("{prompt}").images[0]\n'
            f'# or: pimg generate --base {out_dir} --prompt "{prompt}"'
        )
        files = ["model_index.json", "unet/", "text_encoder/", "vae/", "tokenizer/", "scheduler/"]
        self.write_model_card(out_dir, c.loop.steps, files, usage)
