"""The method registry (`pimg.methods`): one entry reaches every front end; result folders -> parts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pimg.errors import InputError, ModelLoadError
from pimg.inference.parts import Part
from pimg.methods import Flag, Method, get_method, load_result, register, unregister

REPO = Path(__file__).resolve().parents[1]


class MarkerPart(Part):
    """Applies nothing; says which result folder it came from."""

    kind = "marker"

    def __init__(self, name):
        super().__init__(name)

    def attach(self, pipe):
        pass

    def detach(self, pipe):
        pass


@pytest.fixture
def throwaway():
    """A method registered in a few lines, with no other file edited."""
    method = register(
        Method(
            name="echo",
            label="Echo",
            summary="a throw-away method for the registry test",
            config="pimg.trainers.lora:LoraTrainConfig",
            trainer="pimg.trainers.lora:LoraMethod",
            result_files=("echo.safetensors",),
            parts=lambda folder, scale=1.0, name=None, token=None: [
                MarkerPart(name or f"echo_{folder.name}")
            ],
            flags=(Flag("--echo-rank", "rank", "rank of the echo", type=int),),
            variants={"echo-loud": {"rank": 8}},
        )
    )
    yield method
    unregister("echo")


def test_a_registered_method_reaches_every_front_end(throwaway, tmp_path):
    from pimg.frontends.cli import build_parser
    from pimg.frontends.demo import method_labels
    from pimg.frontends.subject_store import SavedSubject, SubjectStore, load_subjects
    from pimg.metrics.bench import subject_result
    from pimg.trainers.toy_subject_eval import ToySubjectEvalConfig

    parser = build_parser()
    # pimg train --help lists it, and its own flag sets its config key.
    train_help = parser._subparsers._group_actions[0].choices["train"].format_help()
    assert "echo" in train_help and "a throw-away method" in train_help
    args = parser.parse_args(["train", "echo", "--echo-rank", "3", "--photos", "p", "--class-noun", "x"])
    assert vars(args)["cfg.rank"] == 3 and args.method == "echo"
    # The demo lists it; pimg eval toysubject takes it and its variant.
    assert "Echo" in [label for _, label in method_labels()]
    assert parser.parse_args(["eval", "toysubject", "--method", "echo-loud"]).method == "echo-loud"
    ToySubjectEvalConfig(method="echo")
    # The bench and the subject store load its results through its own parts function.
    folder = tmp_path / "subjects" / "backpack"
    folder.mkdir(parents=True)
    (folder / "echo.safetensors").write_bytes(b"")
    result = subject_result(folder, None, 1.0)
    assert result.method is throwaway and [p.kind for p in result.parts] == ["marker"]
    store = SubjectStore(tmp_path / "store")
    store.create("mine")
    (store.folder("mine") / "train").mkdir()
    (store.folder("mine") / "train" / "echo.safetensors").write_bytes(b"")
    subject = SavedSubject("mine", "echo", "sks", "star", "tiny", "train")
    store.save(subject)
    [(loaded, result)] = load_subjects([(store.load("mine"), 1.0)], store)
    assert loaded.method == "echo" and result.parts[0].name == "mine"


def test_unregistered_names_are_refused_with_the_valid_ones():
    from pimg.frontends.subject_store import SavedSubject

    with pytest.raises(
        InputError,
        match="unknown method 'loar'; the methods are lora, dreambooth, ti, id-adapter, hypernet. Did you mean 'lora'",
    ):
        get_method("loar")
    with pytest.raises(InputError, match="the methods are"):
        SavedSubject("x", "hyperdream", "sks", "star", "tiny", "train")
    with pytest.raises(InputError, match="already registered"):
        register(get_method("lora"))


def test_result_folders_become_parts(lora_dir, tmp_path):
    from pimg.formats.embeddings import save_embedding

    lora = load_result(lora_dir, scale=0.5, name="mine")
    assert lora.method.name == "lora" and lora.base is None
    assert [(p.kind, p.name, p.scale) for p in lora.parts] == [("lora", "mine", 0.5)]
    # A file inside the folder names the folder; a pivotal LoRA brings its learned word.
    save_embedding(tmp_path / "learned_embeds.safetensors", "<sks>", torch.zeros(1, 8))
    (tmp_path / "pytorch_lora_weights.safetensors").write_bytes(
        (lora_dir / "pytorch_lora_weights.safetensors").read_bytes()
    )
    pivotal = load_result(tmp_path / "pytorch_lora_weights.safetensors")
    assert [p.kind for p in pivotal.parts] == ["lora", "embedding"] and pivotal.learned_token == "<sks>"
    # The method config.json records wins over the files (a TI folder holding a stray LoRA file).
    (tmp_path / "config.json").write_text(json.dumps({"method": "ti"}))
    assert load_result(tmp_path).method.name == "ti"
    with pytest.raises(InputError, match="has no scale"):
        load_result(tmp_path, scale=0.5)
    whole = tmp_path / "db"
    whole.mkdir()
    (whole / "model_index.json").write_text("{}")
    assert load_result(whole).base == str(whole)
    gone = tmp_path / "gone"
    gone.mkdir()
    (gone / "config.json").write_text(json.dumps({"method": "ti"}))
    with pytest.raises(ModelLoadError, match="holds no embedding file"):
        load_result(gone)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="holds no result pimg can load"):
        load_result(tmp_path / "empty")
    with pytest.raises(ModelLoadError, match="missing"):
        load_result(tmp_path / "nothing")


def test_training_records_its_method(tmp_path):
    from pimg.trainers.personalize import result_record
    from pimg.trainers.ti import TiTrainConfig

    assert result_record("ti", TiTrainConfig(photos="p", class_noun="x", token="<t>"))["method"] == "ti"


def test_presets_travel_with_the_package_and_tiny_uses_its_own(capsys):
    from pimg.frontends.cli import main
    from pimg.methods import builtin_preset, preset_names, preset_path

    assert {"lora_tiny.yaml", "ti_tiny.yaml", "dreambooth_tiny.yaml"} <= set(preset_names())
    assert builtin_preset("lora", "tiny") == preset_path("lora_tiny")
    with pytest.raises(InputError, match="no preset named 'lora_tyni'.*lora_tiny.yaml"):
        preset_path("lora_tyni")
    # Without --config, a built-in base's preset is used, and the CLI says which.
    assert main(["train", "lora", "--photos", "/no/such/folder", "--class-noun", "heart"]) == 2
    out = capsys.readouterr()
    assert "settings from" in out.out and "lora_tiny.yaml" in out.out
    assert main(["train", "lora", "--config", "lora_sd15", "--photos", "/no/such", "--class-noun", "x"]) == 2
    assert "lora_sd15.yaml" in capsys.readouterr().out


def test_method_names_are_literals_only_in_the_registry_and_the_methods():
    """`grep` for the method names as string literals outside the places that may name them."""
    allowed = {"pimg/methods.py", "trainers/lora.py", "trainers/dreambooth.py", "trainers/ti.py"}
    allowed |= {"trainers/id_adapter.py", "pimg/inference/id_adapter.py"}
    # the hypernetwork's modules; its fine-tune continues with the LoRA method by name
    allowed |= {"hypernets/training.py", "hypernets/predict.py"}
    pattern = r"[\"'](lora|dreambooth|ti|pivotal|dreambooth-noprior|id-adapter)[\"']"
    found = subprocess.run(
        ["grep", "-rnE", pattern, "pimg", "trainers", "metrics", "hypernets", "app.py", "--include=*.py"],
        cwd=REPO,
        capture_output=True,
        text=True,
    ).stdout.splitlines()
    offending = [
        line
        for line in found
        if line.split(":", 1)[0] not in allowed and ">>>" not in line and "kind = " not in line
    ]
    assert offending == [], "\n".join(offending)


def test_pimg_app_is_a_command():
    out = subprocess.run(
        [sys.executable, "-m", "pimg.frontends.cli", "app", "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert out.returncode == 0 and "--output-dir" in out.stdout
