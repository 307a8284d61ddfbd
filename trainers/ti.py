"""Textual Inversion (Gal et al. 2022): learn a new word for the subject, nothing else.

A new token (n vectors: `<t>`, `<t>_1`, ... as diffusers spells multi-vector embeddings) starts
from a word's embedding (the class noun by default) and is trained through the frozen text encoder
and UNet with the denoising loss (Gal et al., eq. 2). Only the new rows exist as parameters, so no
other word can move.

Output: `learned_embeds.safetensors` in the diffusers form (`pipe.load_textual_inversion`; SDXL:
`embeddings_sdxl.safetensors` with `clip_l` / `clip_g`), a README.md model card and `config.json`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pimg.errors import InputError
from pimg.trainers.diffusion_training import NewTokens, save_new_tokens
from pimg.trainers.loop import LoopConfig
from pimg.trainers.subject_training import SubjectConfig, SubjectTraining


@dataclass
class TiTrainConfig(SubjectConfig):
    """Settings of `pimg train ti` (plus the shared `SubjectConfig` fields).

    Attributes:
        token: the new word; it must not be in the tokenizer yet (hence the brackets).
        n_vectors: vectors the word is made of (more capture more detail, and overfit sooner).
        init_word: word the vectors start from; None: the class noun. A phrase of exactly n_vectors
            tokens ("red and blue striped" for 4) starts vector i at token i.
        loop: the training loop's settings (TI wants a far higher learning rate than weight tuning).
    """

    token: str = "<sks>"
    n_vectors: int = 1
    init_word: str | None = None
    loop: LoopConfig = field(
        default_factory=lambda: LoopConfig(steps=1000, learning_rate=5e-3, weight_decay=0.0)
    )

    def __post_init__(self):
        super().__post_init__()
        if self.n_vectors < 1:
            raise InputError(f"n_vectors must be >= 1, got {self.n_vectors}.")
        if self.prior_preservation:
            raise InputError(
                "prior_preservation does nothing for Textual Inversion: it trains the token's vectors only, "
                "and class prompts never use the token. Leave it off (use LoRA or DreamBooth for a prior)."
            )


class TextualInversionMethod(SubjectTraining):
    """New token vectors trained through a frozen text encoder and UNet."""

    method_name = "textual inversion"
    trains_text = True

    def __init__(self, config: TiTrainConfig):
        super().__init__(
            config,
            seed=config.loop.seed,
            accumulation=config.loop.gradient_accumulation,
            mixed_precision=config.loop.mixed_precision,
        )
        init = config.init_word if config.init_word is not None else config.class_noun
        self.tokens = [
            NewTokens(tok, enc, config.token, config.n_vectors, init)
            for tok, enc in zip(self.conditioner.tokenizers, self.conditioner.text_encoders, strict=True)
        ]
        self.finish_setup()

    def expand_prompt(self, prompt: str) -> str:
        return self.tokens[0].expand(prompt)

    def trainable_modules(self):
        return self.text_components()

    def trainable_parameters(self):
        return [t.vectors for t in self.tokens]

    def save(self, out_dir: Path) -> None:
        c = self.config
        filename = save_new_tokens(out_dir, c.token, self.tokens)
        prompt = self.prompt(c.prompt_template)
        load = f'pipe.load_textual_inversion("{out_dir}/{filename}")\n'
        if len(self.tokens) == 2:  # SDXL: each part goes into its own text encoder, under the same tokens
            load = (
                "from safetensors.torch import load_file\n\n"
                f'state = load_file("{out_dir}/{filename}")\n'
                f"tokens = {self.tokens[0].names!r}\n"
                'pipe.load_textual_inversion(state["clip_l"], token=tokens, text_encoder=pipe.text_encoder, '
                "tokenizer=pipe.tokenizer)\n"
                'pipe.load_textual_inversion(state["clip_g"], token=tokens, text_encoder=pipe.text_encoder_2, '
                "tokenizer=pipe.tokenizer_2)\n"
            )
        usage = (
            "from diffusers import DiffusionPipeline\n\n"
            f'pipe = DiffusionPipeline.from_pretrained("{self.base_location}")  # the base it was trained on\n'
            f"{load}"
            f'image = pipe("{prompt}").images[0]\n'
            f'# or: pimg generate --base {c.base} --embedding {out_dir}/{filename} --prompt "{prompt}"'
        )
        self.write_model_card(out_dir, c.loop.steps, [filename], usage)
