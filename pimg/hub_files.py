"""Weights files named on the Hugging Face Hub: `hf://owner/repo[@revision]/path/in/repo`.

Base models are hub ids already (`load_base`); LoRAs, embeddings and IP-Adapters usually sit as one
file among many in a repository (`h94/IP-Adapter` holds a dozen adapters), so they are named by
huggingface_hub's own URL form for a file. `local_file` turns such a name into the file in the hub
cache, downloading it once; anything else is a local path and is returned as it is. Offline, a
file already in the cache is used, and one that is not gets an error that says how to get it.

Example:
    >>> local_file("hf://h94/IP-Adapter/models/ip-adapter_sd15.safetensors", beside=("image_encoder",))
    PosixPath('~/.cache/huggingface/hub/models--h94--IP-Adapter/snapshots/.../models/ip-adapter_sd15.safetensors')
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from pimg.errors import InputError, ModelLoadError

HUB_SCHEME = "hf://"


def is_hub_file(name: str | Path) -> bool:
    return isinstance(name, str) and name.startswith(HUB_SCHEME)


def parse_hub_file(name: str) -> tuple[str, str, str | None]:
    """`hf://owner/repo[@revision]/path/in/repo` -> (repo id, path in the repository, revision or None)."""
    parts = name.removeprefix(HUB_SCHEME).split("/")
    if len(parts) < 3 or not all(parts):
        raise InputError(
            f"{name!r} is no hub file: write hf://OWNER/REPO/PATH/IN/REPO (optionally hf://OWNER/REPO@REVISION/...), "
            "e.g. hf://h94/IP-Adapter/models/ip-adapter_sd15.safetensors."
        )
    owner, repo_and_revision, *path = parts
    repo, _, revision = repo_and_revision.partition("@")
    return f"{owner}/{repo}", "/".join(path), revision or None


def local_file(name: str | Path, beside: tuple[str, ...] = ()) -> Path:
    """The local file `name` stands for: itself, or for a hub file its copy in the hub cache.

    Args:
        name: a local path, or `hf://owner/repo[@revision]/path/in/repo`.
        beside: folders next to the hub file to fetch with it (an IP-Adapter's `image_encoder`).

    Raises:
        ModelLoadError: the repository, revision or file does not exist, or the hub cannot be
            reached and the file is not in the cache.
    """
    if not is_hub_file(name):
        return Path(name)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo_id, filename, revision = parse_hub_file(name)
    folder = PurePosixPath(filename).parent  # "." for a file at the top, and "." / "x" is "x"
    patterns = [filename, *(f"{folder / extra}/*" for extra in beside)]
    try:
        root = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except LocalEntryNotFoundError as exc:
        raise ModelLoadError(
            f"{name} is not in the hub cache and the hub cannot be reached ({exc}). Download it where the hub "
            f"can be reached (`hf download {repo_id} {filename}`), or pass a local file."
        ) from exc
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot fetch {name} from the Hugging Face Hub: {exc}") from exc
    path = root / filename
    if not path.is_file():
        raise ModelLoadError(
            f"{repo_id} has no file {filename!r}{f' at {revision}' if revision else ''}; check the path."
        )
    return path
