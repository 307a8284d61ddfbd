"""The method registry: every personalization method pimg knows, in one plain dict.

A method is its own module (its config class and training class, e.g. `pimg.trainers.lora`) plus
one `Method` entry here. Everything that lists, trains, loads or evaluates methods reads this
registry: `pimg train` (its sub-commands and flags), the demo's method list, `pimg eval toysubject`,
`pimg bench generate` and the demo's subject store. Adding a method touches no front end.

The training half of an entry is named by import path ("module:attribute") and imported only when
that method trains, so `pimg/` never imports the trainers and a method from another package
registers the same way (`register(Method(...))`).

A result folder (what training wrote) becomes pipeline parts through one function, `load_result`;
which method wrote it comes from its `config.json` or, for folders from elsewhere, from the files
it holds.

Example:
    >>> [m.name for m in list_methods()]
    ['lora', 'dreambooth', 'ti', 'id-adapter', 'hypernet']
    >>> result = load_result("out/sks", scale=0.8)
    >>> for part in result.parts: pp.add(part)
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from pimg.errors import InputError, ModelLoadError, did_you_mean

LORA_FILE = "pytorch_lora_weights.safetensors"
#: Textual Inversion files pimg writes or reads: the SD file, its .bin twin from older tools, SDXL's file.
EMBEDDING_FILES = ("learned_embeds.safetensors", "learned_embeds.bin", "embeddings_sdxl.safetensors")
#: A subject made from photos with no training (an ID adapter's embedding of them).
ID_EMBEDDING_FILE = "id_embedding.safetensors"


@dataclass(frozen=True)
class Flag:
    """A method-specific `pimg train METHOD` flag that sets one config key.

    Attributes:
        flag: the option, e.g. "--rank".
        key: the dotted config key it sets, e.g. "rank".
        help: the help text.
        type: the value's type (`int`, `float`, `str`); None for an on/off switch.
        switch: for a switch, the value it sets (True for `--pivotal`, False for `--no-prior`).
    """

    flag: str
    key: str
    help: str
    type: type | None = None
    switch: bool = True


@dataclass(frozen=True)
class Method:
    """One registered method.

    Attributes:
        name: what `pimg train NAME` and config files call it.
        label: how front ends show it ("LoRA").
        summary: one line for `pimg train --help`.
        config: the config dataclass ("module:Class", or the class itself).
        trainer: the training class run by the loop (same forms).
        result_files: files that mark a result folder as this method's, most telling first.
        parts: `parts(folder, *, scale, name, token) -> list[Part]` ("module:function" or the
            function); None when the result is a whole model (`whole_model`).
        whole_model: the result folder is a full pipeline, used as the base (DreamBooth).
        flags: method-specific CLI flags.
        variants: evaluation variants, name -> config overrides (`pimg eval toysubject --method`).
        personalize: for a method whose training is done once for all subjects (an ID adapter, a
            hypernetwork), `personalize(photos, out_dir, *, base, model=None, ...) -> Path`: a subject's
            result folder made from its photos with no training ("module:function" or the function);
            `pimg eval toysubject` and the demo call it instead of training, and pass `finetune_steps`,
            `class_noun` and `pipe` (a loaded base) when it takes them. The folder's `config.json`
            names the word the subject is bound to as `token` ("" for none). None: a subject is trained.
    """

    name: str
    label: str
    summary: str
    config: str | type
    trainer: str | type
    result_files: tuple[str, ...]
    parts: str | Callable | None = None
    whole_model: bool = False
    flags: tuple[Flag, ...] = ()
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    personalize: str | Callable | None = None

    def personalize_function(self) -> Callable | None:
        return None if self.personalize is None else _resolve(self.personalize)

    def config_class(self) -> type:
        return _resolve(self.config)

    def trainer_class(self) -> type:
        return _resolve(self.trainer)

    def has_setting(self, name: str) -> bool:
        """Does the method's config have a top-level field `name` (e.g. DreamBooth's `class_images_dir`)?"""
        return name in {f.name for f in dataclasses.fields(self.config_class())}

    @property
    def preset_stem(self) -> str:
        """How its presets' file names start: the name with "_" for "-" (`id_adapter_tiny.yaml`)."""
        return self.name.replace("-", "_")

    def recognizes(self, folder: Path) -> bool:
        """Does `folder` hold a result of this method?"""
        return any((folder / name).exists() for name in self.result_files)


@dataclass
class SubjectResult:
    """A loaded result folder: its method, the base it replaces (whole models) and the parts to add."""

    method: Method
    folder: Path
    base: str | None
    parts: list = field(default_factory=list)

    @property
    def learned_token(self) -> str | None:
        """The learned word a prompt must contain for the subject to show (TI, pivotal), or None."""
        from pimg.inference.parts import EmbeddingPart

        return next((p.token for p in self.parts if isinstance(p, EmbeddingPart)), None)


def _resolve(ref):
    if not isinstance(ref, str):
        return ref
    module, _, attribute = ref.partition(":")
    return getattr(importlib.import_module(module), attribute)


# ------------------------------------------------------------------------------------------ parts


def lora_parts(folder: Path, *, scale: float = 1.0, name: str | None = None, token: str | None = None):
    """A LoRA result: its adapter, and its learned token when pivotal tuning wrote one."""
    from pimg.inference.parts import EmbeddingPart, LoraPart

    parts = [LoraPart(folder / LORA_FILE, scale=scale, name=name)]
    if (folder / EMBEDDING_FILES[0]).is_file():
        parts.append(EmbeddingPart(folder / EMBEDDING_FILES[0], token=token))
    return parts


def embedding_parts(folder: Path, *, scale: float = 1.0, name: str | None = None, token: str | None = None):
    """A Textual Inversion result: its embedding (a word has no scale: only 1 is accepted)."""
    from pimg.inference.parts import EmbeddingPart

    if scale != 1.0:
        raise InputError(f"{folder} is a Textual Inversion word, which has no scale; use scale 1.")
    path = next((folder / n for n in EMBEDDING_FILES if (folder / n).is_file()), None)
    if path is None:  # config.json names the method, but the weights are gone
        raise ModelLoadError(
            f"{folder} holds no embedding file ({', '.join(EMBEDDING_FILES)}); train it again."
        )
    return [EmbeddingPart(path, token=token)]


# ------------------------------------------------------------------------------------------ registry

_TEXT_ENCODER = Flag(
    "--train-text-encoder", "train_text_encoder", "also train the text encoder (default: off)"
)

#: Method name -> entry, in the order front ends list them (the first is the demo's default). A LoRA
#: result may hold a learned word too (pivotal), so LoRA is recognised before Textual Inversion.
METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add `method`; its name, label and variant names must be new."""
    taken = set(METHODS) | {v for m in METHODS.values() for v in m.variants}
    for name in (method.name, *method.variants):
        if name in taken:
            raise InputError(f"a method or variant named {name!r} is already registered.")
    if method.label in {m.label for m in METHODS.values()}:
        raise InputError(f"a method labelled {method.label!r} is already registered.")
    METHODS[method.name] = method
    return method


def unregister(name: str) -> None:
    """Remove a registered method (tests and plugins that register temporarily)."""
    METHODS.pop(get_method(name).name)


register(
    Method(
        name="lora",
        label="LoRA",
        summary="LoRA adapters (optionally with pivotal tuning)",
        config="pimg.trainers.lora:LoraTrainConfig",
        trainer="pimg.trainers.lora:LoraMethod",
        result_files=(LORA_FILE,),
        parts=lora_parts,
        flags=(
            Flag("--rank", "rank", "LoRA rank r (default: the preset's, 8 on tiny; else 4)", type=int),
            Flag("--pivotal", "pivotal", "also learn the token (give a new one, e.g. '<sks>'; default: off)"),
            Flag(
                "--prior",
                "prior_preservation",
                "add DreamBooth's prior preservation: the loss of class images the base draws from "
                "class_prompts (default: off)",
            ),
            _TEXT_ENCODER,
        ),
        variants={"pivotal": {"pivotal": True, "token": "<sks>"}},
    )
)
register(
    Method(
        name="dreambooth",
        label="DreamBooth",
        summary="fine-tune the UNet (prior preservation on)",
        config="pimg.trainers.dreambooth:DreamBoothConfig",
        trainer="pimg.trainers.dreambooth:DreamBoothMethod",
        result_files=("model_index.json",),
        whole_model=True,
        flags=(
            Flag(
                "--no-prior",
                "prior_preservation",
                "train without prior preservation (default: with it, on generated class images)",
                switch=False,
            ),
            _TEXT_ENCODER,
        ),
        variants={"dreambooth-noprior": {"prior_preservation": False}},
    )
)
register(
    Method(
        name="ti",
        label="Textual Inversion",
        summary="textual inversion: a new token only",
        config="pimg.trainers.ti:TiTrainConfig",
        trainer="pimg.trainers.ti:TextualInversionMethod",
        result_files=EMBEDDING_FILES,
        parts=embedding_parts,
        flags=(
            Flag(
                "--vectors",
                "n_vectors",
                "vectors of the new token (default: the preset's, 2 on tiny; else 1)",
                type=int,
            ),
            Flag(
                "--init-word",
                "init_word",
                "word the token starts from (default: class noun); a phrase of exactly N tokens "
                "gives each of N vectors its own word",
                type=str,
            ),
        ),
    )
)

register(
    Method(
        name="id-adapter",
        label="ID adapter",
        summary="train a tuning-free ID adapter (IP-Adapter / FaceID layout) across many subjects",
        config="pimg.trainers.id_adapter:IdAdapterTrainConfig",
        trainer="pimg.trainers.id_adapter:IdAdapterMethod",
        result_files=(ID_EMBEDDING_FILE, "ip_adapter.safetensors"),
        parts="pimg.inference.id_adapter:id_adapter_parts",
        personalize="pimg.inference.id_adapter:personalize",
        flags=(
            Flag(
                "--kind",
                "kind",
                "clip (IP-Adapter, any subject), plus (IP-Adapter Plus: more image tokens) or faceid "
                "(a face embedding)",
                type=str,
            ),
        ),
    )
)
register(
    Method(
        name="hypernet",
        label="Hypernetwork",
        summary="train a hypernetwork that predicts a subject's LoRA from its photos in one pass",
        config="pimg.hypernets.training:HypernetTrainConfig",
        trainer="pimg.hypernets.training:HypernetMethod",
        result_files=("hypernet.safetensors",),
        parts="pimg.hypernets.predict:hypernet_parts",
        personalize="pimg.hypernets.predict:personalize",
    )
)


def list_methods() -> list[Method]:
    """The registered methods, in registration order."""
    return list(METHODS.values())


def get_method(name: str) -> Method:
    """The method called `name` (or labelled `name`); an InputError listing the valid names otherwise."""
    if name in METHODS:
        return METHODS[name]
    for method in METHODS.values():
        if method.label == name:
            return method
    raise InputError(
        f"unknown method {name!r}; the methods are {', '.join(METHODS)}.{did_you_mean(name, METHODS)}"
    )


def evaluation_variants() -> dict[str, tuple[Method, dict[str, Any]]]:
    """What `pimg eval toysubject --method` takes: each method as it is, then its variants."""
    out: dict[str, tuple[Method, dict[str, Any]]] = {m.name: (m, {}) for m in METHODS.values()}
    for method in METHODS.values():
        out.update({name: (method, overrides) for name, overrides in method.variants.items()})
    return out


# ------------------------------------------------------------------------------------------ results


def detect_method(folder: str | Path) -> Method:
    """The method that wrote `folder`: the `method` its config.json records, else by the files it holds."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(
            f"{folder} is not a folder; pass the folder training wrote (the one with config.json)."
        )
    try:
        recorded = json.loads((folder / "config.json").read_text()).get("method")
    except (OSError, ValueError, AttributeError):
        recorded = None
    if isinstance(recorded, str) and recorded in METHODS:
        return METHODS[recorded]
    for method in METHODS.values():
        if method.recognizes(folder):
            return method
    expected = "; ".join(f"{m.name}: {', '.join(m.result_files)}" for m in METHODS.values())
    raise ModelLoadError(f"{folder} holds no result pimg can load (expected one of these files, {expected}).")


def load_result(
    path: str | Path, *, scale: float = 1.0, name: str | None = None, token: str | None = None
) -> SubjectResult:
    """A training result as the base it replaces and the parts that apply it.

    Args:
        path: the result folder, or a weights file inside it.
        scale: the subject's weight (LoRA scale; whole models and words take only 1).
        name: name of the parts (adapter names); None derives them from the files.
        token: bind a learned embedding to this word instead of the file's own.

    Example:
        >>> result = load_result("out/db")            # a DreamBooth folder
        >>> result.base, result.parts
        ('out/db', [])
    """
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"the result {path} is missing; train it again or check the path.")
    folder = path if path.is_dir() else path.parent
    method = detect_method(folder)
    if method.whole_model:
        if scale != 1.0:
            raise InputError(
                f"{folder} is a {method.label} result (a whole model), which has no scale; use 1."
            )
        return SubjectResult(method, folder, str(folder), [])
    parts = _resolve(method.parts)(folder, scale=scale, name=name, token=token)
    return SubjectResult(method, folder, None, parts)


# ------------------------------------------------------------------------------------------ presets


def preset_names() -> list[str]:
    """The YAML presets installed with pimg (`configs/` of the repository)."""
    return sorted(p.name for p in resources.files("pimg.configs").iterdir() if p.name.endswith(".yaml"))


def preset_path(name: str) -> Path:
    """The installed preset `name` ("lora_tiny" or "lora_tiny.yaml"); an InputError listing them otherwise."""
    found = _installed_preset(name if name.endswith(".yaml") else f"{name}.yaml")
    if found is None:
        raise InputError(f"no preset named {name!r}; the presets are {', '.join(preset_names())}.")
    return found


def builtin_preset(method: str, base: str) -> Path | None:
    """The preset `<method>_<base>.yaml` (`Method.preset_stem`) when `base` is a built-in model that has
    one, else None.

    Front ends that train without a YAML start from it, so a subject trained there gets the settings
    `pimg eval toysubject` measured, not the dataclass defaults.
    """
    from pimg.models import BUILTIN_MODELS

    if base not in BUILTIN_MODELS:
        return None
    return _installed_preset(f"{get_method(method).preset_stem}_{base}.yaml")


def _installed_preset(file: str) -> Path | None:
    found = resources.files("pimg.configs") / file
    return Path(str(found)) if found.is_file() else None
