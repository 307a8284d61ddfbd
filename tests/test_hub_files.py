"""`hf://OWNER/REPO/PATH` weights files, with the hub replaced by a local stand-in (no network here)."""

from __future__ import annotations

import shutil
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
import pytest

from pimg.errors import InputError, ModelLoadError
from pimg.hub_files import local_file, parse_hub_file


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """`snapshot_download` over local folders: {repo id: folder}; copies what the patterns allow,
    into a snapshot folder, as the real one does (and, like it, returns the folder even when
    nothing matched). Records each call's patterns."""
    import huggingface_hub

    repos: dict[str, Path] = {}
    calls: list[list[str]] = []

    def snapshot_download(repo_id, revision=None, allow_patterns=None):
        calls.append(list(allow_patterns))
        if repo_id not in repos:
            from huggingface_hub.errors import LocalEntryNotFoundError

            raise LocalEntryNotFoundError("no connection")
        root = tmp_path / "hub" / repo_id.replace("/", "--") / (revision or "main")
        for file in repos[repo_id].rglob("*"):
            relative = file.relative_to(repos[repo_id]).as_posix()
            if file.is_file() and any(fnmatch(relative, p) for p in allow_patterns):
                (root / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(file, root / relative)
        root.mkdir(parents=True, exist_ok=True)
        return str(root)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return repos, calls


def test_hub_file_names():
    assert parse_hub_file("hf://h94/IP-Adapter/models/a.safetensors") == (
        "h94/IP-Adapter",
        "models/a.safetensors",
        None,
    )
    assert parse_hub_file("hf://me/loras@v2/sks.safetensors") == ("me/loras", "sks.safetensors", "v2")
    for bad in ("hf://me/loras", "hf://me//a.bin", "hf://"):
        with pytest.raises(InputError, match="OWNER/REPO/PATH"):
            parse_hub_file(bad)
    assert local_file("out/sks") == Path("out/sks")  # a local path is left as it is


def test_generate_takes_a_lora_from_the_hub(fake_hub, random_tiny_dir, lora_dir, tmp_path):
    from pimg.inference.generate import GenerateRequest, run_generate

    repos, calls = fake_hub
    repos["me/loras"] = lora_dir
    common = dict(base=str(random_tiny_dir), prompts=["a red star"], num_inference_steps=2, seed=3)
    local = run_generate(GenerateRequest(**common, loras=[(str(lora_dir), 0.8)], out_dir=str(tmp_path / "a")))
    hub = "hf://me/loras/pytorch_lora_weights.safetensors"
    fetched = run_generate(GenerateRequest(**common, loras=[(hub, 0.8)], out_dir=str(tmp_path / "b")))
    assert calls == [["pytorch_lora_weights.safetensors"]]  # that one file, not the whole repository
    assert np.array_equal(np.asarray(_image(local[0])), np.asarray(_image(fetched[0])))
    with pytest.raises(ModelLoadError, match="has no file 'missing.safetensors'"):
        local_file("hf://me/loras/missing.safetensors")
    with pytest.raises(ModelLoadError, match="hf download other/repo x.safetensors"):
        local_file("hf://other/repo/x.safetensors")  # not cached, hub out of reach


def test_an_id_adapter_from_the_hub_brings_its_image_encoder(fake_hub):
    from pimg.formats.ip_adapter import find_ip_adapter_file
    from pimg.inference.id_adapter import default_adapter, embedder_for, resolve_adapter

    repos, calls = fake_hub
    shipped = find_ip_adapter_file(default_adapter("tiny"))
    repos["h94/IP-Adapter"] = shipped.parent.parent  # the adapter one folder down, as h94 keeps its models/
    folder = shipped.parent.name
    adapter = resolve_adapter(f"hf://h94/IP-Adapter/{folder}/{shipped.name}", "tiny")
    assert calls == [[f"{folder}/{shipped.name}", f"{folder}/image_encoder/*"]]
    assert adapter.read_bytes() == shipped.read_bytes()
    assert embedder_for(adapter).dim == embedder_for(shipped).dim  # found its image_encoder/ beside it


def _image(path):
    from PIL import Image

    return Image.open(path)
