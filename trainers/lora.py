"""LoRA on a subject's photos (Hu et al. 2021), optionally with pivotal tuning of new token embeddings.

Low-rank adapters go into the UNet's attention projections (and optionally the text encoder's) via
peft's `LoraConfig` and the models' public `add_adapter`; the base weights stay frozen. With
`pivotal=True` a new token is learned at the same time, its embedding rows only (as in "pivotal
tuning" for LoRA: cloneofsimo/lora, and diffusers' advanced DreamBooth LoRA example), so the
subject is carried by both a word and the adapter.

Output: `pytorch_lora_weights.safetensors` (diffusers layout, `pipe.load_lora_weights`) and its
kohya export `lora_kohya.safetensors`; with pivotal tuning also `learned_embeds.safetensors`
(`pipe.load_textual_inversion`); a README.md model card and the resolved `config.json`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from pimg.errors import InputError
from pimg.trainers.diffusion_training import NewTokens, save_new_tokens
from pimg.trainers.loop import LoopConfig
from pimg.trainers.subject_training import SubjectConfig, SubjectTraining

#: SD/SDXL UNet attention projections, the usual LoRA targets.
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
#: CLIP text encoder attention projections.
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


@dataclass
class LoraTrainConfig(SubjectConfig):
    """Settings of `pimg train lora` (plus the shared `SubjectConfig` fields).

    Attributes:
        rank: LoRA rank r.
        alpha: LoRA alpha; the update is scaled by alpha / rank. None: alpha = rank (scale 1).
        target_modules: UNet layer names (suffixes) that get adapters.
        train_text_encoder: also put adapters on the text encoder(s).
        text_target_modules: text encoder layer names that get adapters.
        pivotal: learn new token embedding(s) for `token` along with the LoRA; `token` must then be
            a new word (e.g. "<sks>").
        n_vectors: vectors of the new token (pivotal only).
        init_word: word the new vectors start from; None: the class noun (a phrase of exactly n_vectors
            tokens starts vector i at token i).
        embedding_learning_rate: learning rate of the new vectors (the LoRA uses `loop.learning_rate`).
        adapter_name: the peft adapter's name.
        init_lora: a UNet LoRA file (either layout) to start from instead of zero, e.g. a hypernetwork's
            prediction; its rank may be lower than `rank` ("rank relaxed", HyperDreamBooth sec. 3.3): its
            factors fill the first ranks, the other ranks start as usual (random A, zero B), so step 0
            generates exactly what the file does.
        loop: the training loop's settings.
    """

    rank: int = 4
    alpha: float | None = None
    target_modules: tuple[str, ...] = UNET_TARGETS
    train_text_encoder: bool = False
    text_target_modules: tuple[str, ...] = TEXT_TARGETS
    pivotal: bool = False
    n_vectors: int = 1
    init_word: str | None = None
    embedding_learning_rate: float = 5e-3
    adapter_name: str = "subject"
    init_lora: str | None = None
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(steps=400, learning_rate=1e-4))

    def __post_init__(self):
        super().__post_init__()
        if self.rank < 1:
            raise InputError(f"rank must be >= 1, got {self.rank}.")
        if self.alpha is not None and self.alpha <= 0:
            raise InputError(f"alpha must be > 0 (or None for alpha = rank), got {self.alpha}.")
        if not self.target_modules:
            raise InputError(
                "target_modules is empty; the UNet needs at least one, e.g. to_q,to_k,to_v,to_out.0."
            )
        if self.n_vectors < 1:
            raise InputError(f"n_vectors must be >= 1, got {self.n_vectors}.")
        if self.n_vectors > 1 and not self.pivotal:
            raise InputError(
                f"n_vectors={self.n_vectors} only applies with pivotal=True (new token vectors)."
            )


def _lora_config(rank: int, alpha: float | None, targets: tuple[str, ...]):
    from peft import LoraConfig

    # Gaussian A and zero B: training starts exactly at the base model.
    return LoraConfig(
        r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian", target_modules=list(targets)
    )


class LoraMethod(SubjectTraining):
    """UNet (and optional text-encoder) LoRA, optionally with pivotal tuning of new token vectors."""

    method_name = "lora"

    def __init__(self, config: LoraTrainConfig):
        super().__init__(
            config,
            seed=config.loop.seed,
            accumulation=config.loop.gradient_accumulation,
            mixed_precision=config.loop.mixed_precision,
        )
        self.trains_text = config.train_text_encoder or config.pivotal
        self.tokens: list[NewTokens] = []
        if config.pivotal:
            self.method_name = "lora (pivotal)"
            init = config.init_word if config.init_word is not None else config.class_noun
            self.tokens = [
                NewTokens(tok, enc, config.token, config.n_vectors, init)
                for tok, enc in zip(self.conditioner.tokenizers, self.conditioner.text_encoders, strict=True)
            ]
        # peft draws the initial A matrices from torch's global generator: seed it (in a fork, leaving the
        # caller's stream alone) so a run, and a resumed run's fresh objects, start from the same LoRA.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.loop.seed)
            self._add_adapters(config)
        if config.init_lora:
            self._start_from(config.init_lora)
        self.finish_setup()

    def _add_adapters(self, config: LoraTrainConfig) -> None:
        try:
            self.pipe.unet.add_adapter(
                _lora_config(config.rank, config.alpha, config.target_modules),
                adapter_name=config.adapter_name,
            )
            if config.train_text_encoder:
                for encoder in self.text_components().values():
                    encoder.add_adapter(
                        _lora_config(config.rank, config.alpha, config.text_target_modules),
                        adapter_name=config.adapter_name,
                    )
        except ValueError as exc:  # peft: "Target modules {...} not found in the base model"
            raise InputError(f"LoRA target modules do not fit this base: {exc}") from exc

    @torch.no_grad()
    def _start_from(self, path: str) -> None:
        """Copy a LoRA file's factors into the first ranks of the adapter (see `init_lora`)."""
        from pimg.formats.lora import load_lora_state_dict

        c = self.config
        state = load_lora_state_dict(path, {"unet": self.pipe.unet, **self.text_components()})
        modules = dict(self.pipe.unet.named_modules())
        for key, down in state.items():
            if not key.endswith(".lora_A.weight"):
                continue
            component, _, name = key.removesuffix(".lora_A.weight").partition(".")
            module = modules.get(name) if component == "unet" else None
            if module is None or c.adapter_name not in getattr(module, "lora_A", {}):
                raise InputError(
                    f"init_lora {path} has a layer ({key.removesuffix('.lora_A.weight')}) this LoRA does not "
                    "train; add it to target_modules (or train_text_encoder) so the start is the file."
                )
            up = state[key.replace(".lora_A.", ".lora_B.")]
            if down.shape[0] > c.rank:
                raise InputError(
                    f"init_lora {path} has rank {down.shape[0]}, above rank {c.rank}: raise rank to at least it."
                )
            a, b = module.lora_A[c.adapter_name].weight, module.lora_B[c.adapter_name].weight
            rank = down.shape[0]
            a[:rank] = down.to(a)
            # the file's lora_B has its scale folded in; peft multiplies by alpha / rank again
            b[:, :rank] = up.to(b) / module.scaling[c.adapter_name]
            b[:, rank:] = 0

    def expand_prompt(self, prompt: str) -> str:
        return self.tokens[0].expand(prompt) if self.tokens else prompt

    def trainable_modules(self):
        modules = {"unet": self.pipe.unet}
        if self.trains_text:
            modules.update(self.text_components())
        return modules

    def trainable_parameters(self):
        lora = [p for m in self.trainable_modules().values() for p in m.parameters() if p.requires_grad]
        vectors = {id(t.vectors) for t in self.tokens}
        groups = [{"params": [p for p in lora if id(p) not in vectors]}]
        if self.tokens:
            groups.append(
                {"params": [t.vectors for t in self.tokens], "lr": self.config.embedding_learning_rate}
            )
        return groups

    def save(self, out_dir: Path) -> None:
        from pimg.formats.lora import lora_state_dict_from_peft, save_lora

        c = self.config
        state = lora_state_dict_from_peft(self.pipe.unet, "unet", c.adapter_name)
        if c.train_text_encoder:
            for name, encoder in self.text_components().items():
                state |= lora_state_dict_from_peft(encoder, name, c.adapter_name)
        components = {"unet": self.pipe.unet, **self.text_components()}
        metadata = {
            "pimg.method": self.method_name,
            "pimg.base": c.base,
            "pimg.token": c.token,
            "pimg.class_noun": c.class_noun,
            "pimg.rank": c.rank,
            "pimg.steps": c.loop.steps,
        }
        save_lora(out_dir, state, kohya_components=components, metadata=metadata)
        files = ["pytorch_lora_weights.safetensors", "lora_kohya.safetensors"]
        load_embedding = ""
        if self.tokens:
            files.append(save_new_tokens(out_dir, c.token, self.tokens))
            load_embedding = f'pipe.load_textual_inversion("{out_dir}/{files[-1]}")\n'
        usage = (
            "from diffusers import DiffusionPipeline\n\n"
            f'pipe = DiffusionPipeline.from_pretrained("{self.base_location}")  # the base it was trained on\n'
            f'pipe.load_lora_weights("{out_dir}", adapter_name="{c.adapter_name}")\n'
            f"{load_embedding}"
            f'image = pipe("{self.prompt(c.prompt_template)}").images[0]\n'
            f"# or: pimg generate --base {c.base} --lora {out_dir}"
            + (f" --embedding {out_dir}/{files[-1]}" if self.tokens else "")
            + f' --prompt "{self.prompt(c.prompt_template)}"'
        )
        self.write_model_card(out_dir, c.loop.steps, files, usage)
