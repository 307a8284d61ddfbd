"""Reading and writing weight files safely: errors a person can act on, no pickled code, atomic writes.

LoRA and embedding files come from downloads that stop half-way, from other tools, and from runs
killed mid-save; every reader here turns those cases into one `ModelLoadError` that names the file
and says what to do, instead of a raw safetensors or pickle exception. `check_finite` refuses weights
holding NaN or Inf (a diverged training's), which would otherwise draw black images without an error.

Example:
    >>> tensors = read_safetensors("out/pytorch_lora_weights.safetensors", what="LoRA file")
    >>> write_safetensors_atomically("out/copy.safetensors", tensors, {"format": "pt"})
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from pimg.errors import ModelLoadError


def read_safetensors(path: str | os.PathLike, *, what: str = "weights file") -> dict[str, torch.Tensor]:
    """Read every tensor of a safetensors file onto the CPU.

    Args:
        path: the `.safetensors` file.
        what: how the message names the file, e.g. "LoRA file" or "embedding file".

    Returns:
        The tensors by name.

    Raises:
        ModelLoadError: the file is missing, empty, truncated or not a safetensors file.

    Example:
        >>> tensors = read_safetensors("out/pytorch_lora_weights.safetensors", what="LoRA file")
    """
    path = _checked_file(path, what)
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise _unreadable(path, what, error) from error


def read_safetensors_metadata(path: str | os.PathLike, *, what: str = "weights file") -> dict[str, str]:
    """Read the string metadata of a safetensors file (base model, token, rank, ... for pimg LoRAs).

    Args:
        path: the `.safetensors` file.
        what: how the message names the file.

    Returns:
        The metadata without safetensors' own `format` entry; empty when the file has none.

    Example:
        >>> read_safetensors_metadata("out/pytorch_lora_weights.safetensors")["pimg.rank"]
        '4'
    """
    path = _checked_file(path, what)
    try:
        with safe_open(path, framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError) as error:
        raise _unreadable(path, what, error) from error
    metadata.pop("format", None)
    return metadata


def read_torch_weights(path: str | os.PathLike, *, what: str = "weights file") -> dict:
    """Read a `.bin`/`.pt` file with `torch.load(weights_only=True)`: tensors, numbers, strings, no code.

    Args:
        path: the torch file.
        what: how the message names the file.

    Returns:
        The dictionary stored in the file (possibly nested, as in A1111 embeddings).

    Raises:
        ModelLoadError: the file is missing, damaged, holds pickled objects beyond plain data, or is not a dict.

    Example:
        >>> read_torch_weights("learned_embeds.bin", what="embedding file")
    """
    path = _checked_file(path, what)
    try:
        contents = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for damaged or non-weights pickles
        raise ModelLoadError(
            f"{what} '{path}' cannot be read as a torch weights file ({type(error).__name__}: {error}). "
            "It is damaged, or holds Python objects beyond tensors: download it again, or export it "
            "again as .safetensors."
        ) from error
    if not isinstance(contents, dict):
        raise ModelLoadError(
            f"{what} '{path}' holds a {type(contents).__name__}, not a dictionary of tensors. "
            "Export it again as .safetensors."
        )
    return contents


def write_safetensors_atomically(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> Path:
    """Write tensors to a safetensors file through a temporary file and a rename.

    A reader never sees a half-written file, and a crash leaves the previous file in place.

    Args:
        path: the target file; its folder must exist.
        tensors: the tensors, moved to the CPU and made contiguous on the way.
        metadata: string metadata for the header.

    Returns:
        The path written.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def check_finite(tensors: Mapping[str, object], what: str) -> None:
    """Refuse weights holding NaN or Inf, naming the first such tensor.

    A diverged training writes NaN or Inf weights without complaint, and a pipeline then draws black
    or unguided images with no error, so readers refuse them. Nested dictionaries (A1111 embeddings)
    are searched too, their tensors named `outer.inner`; values that are not floating-point tensors
    are skipped.

    Args:
        tensors: name -> tensor, in the order the file lists them.
        what: how the message names the source, e.g. "LoRA file 'out/x.safetensors'".

    Raises:
        ModelLoadError: naming the first tensor with a non-finite value, what it holds and how many.

    Example:
        >>> check_finite(read_safetensors(path), f"LoRA file '{path}'")
    """
    for name, tensor in _floating_tensors(tensors):
        finite = torch.isfinite(tensor)
        if bool(finite.all()):
            continue
        bad = tensor[~finite]
        kinds = [k for k, found in (("NaN", bad.isnan().any()), ("Inf", bad.isinf().any())) if found]
        raise ModelLoadError(
            f"{what} holds {' and '.join(kinds)} in tensor '{name}' ({bad.numel()} of {tensor.numel()} "
            "values; the first such tensor). Such weights give black or unguided images. The training "
            "that wrote it diverged, or the file is damaged: use an earlier checkpoint, or train again "
            "with a lower learning rate."
        )


def _floating_tensors(tensors: Mapping[str, object], prefix: str = ""):
    for name, value in tensors.items():
        if isinstance(value, Mapping):
            yield from _floating_tensors(value, f"{prefix}{name}.")
        elif isinstance(value, torch.Tensor) and (value.is_floating_point() or value.is_complex()):
            yield f"{prefix}{name}", value.detach()


def _checked_file(path: str | os.PathLike, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{what} '{path}' does not exist. Check the path, or download the file again.")
    if path.is_dir():
        raise ModelLoadError(f"{what} '{path}' is a folder, not a file. Pass the file inside it.")
    if path.stat().st_size == 0:
        raise ModelLoadError(
            f"{what} '{path}' is empty (0 bytes), most likely from an interrupted download or save. "
            "Download it again, or export it again from the run that trained it."
        )
    return path


def _unreadable(path: Path, what: str, error: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"{what} '{path}' ({path.stat().st_size} bytes) cannot be read as safetensors ({error}). "
        "It is truncated, damaged or in another format: download it again, or export it again "
        "from the run that trained it."
    )
