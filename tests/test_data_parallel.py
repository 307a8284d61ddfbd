"""Data-parallel training: N processes with batch b train as one process with batch N*b.

The global batch of a step is defined once (what one process would draw); process i takes rows
i*b .. (i+1)*b - 1 of its photos and of its noise, the loop averages gradients, and only the main
process writes. The end-to-end test starts two CPU processes (gloo) with torchrun, running this
file as their script (see `__main__` below).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_trainers import KilledAt  # tests/ is on sys.path, under pytest and as a torchrun script

from pimg.errors import InputError
from pimg.formats.safetensors_io import read_safetensors
from pimg.photos import save_photos
from pimg.trainers.diffusion_training import denoising_loss
from pimg.trainers.loop import Shard
from pimg.trainers.subject_training import epoch_indices

#: LoRA weights of 2 processes x batch 1 against 1 process x batch 2, after 3 AdamW steps at lr 1e-3:
#: the same numbers summed in another order (measured: 3.1e-6 on weights of up to 1.06).
TOLERANCE = 1e-5
STEPS, KILLED_AT = 3, 2
RUNS = ("whole", "killed")


@contextlib.contextmanager
def one_thread():
    """One intra-op thread, as each of the two processes runs: the same summation order inside every op
    (and no thread oversubscription on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def photos_dir(tmp_path_factory) -> Path:
    from pimg.toyworld.subjects import EVAL_SUBJECTS

    subject = EVAL_SUBJECTS["ringed_star_rgb"]
    folder = tmp_path_factory.mktemp("photos")
    return save_photos(folder, subject.photos(3, seed=0), ["a {token} {class_noun} on a blue background"] * 3)


def fast_config(method: str, base, photos, out, **overrides):
    """A 3-step run at 64 px checkpointed at step 2 (test_trainers.py's `fast_config`, one step more)."""
    from pimg.trainers.personalize import load_train_config

    values = {
        "base": str(base),
        "photos": str(photos),
        "class_noun": "star",
        "out_dir": str(out),
        "loop.steps": STEPS,
        "loop.learning_rate": 1e-3,
        "loop.checkpoint_every": KILLED_AT,
        "sample_images": 1,
        "num_inference_steps": 2,
        "sample_prompts": ["a {token} {class_noun}"],
        "guidance_scale": 1.5,
    }
    return load_train_config(method, None, {**values, **overrides})


def test_epoch_indices_split_the_global_batch_between_processes():
    for step in range(4):
        for micro in range(2):
            whole = epoch_indices(3, 4, 2, step, micro, seed=7)
            shares = [epoch_indices(3, 2, 2, step, micro, 7, Shard(r, 2)) for r in range(2)]
            assert shares[0] + shares[1] == whole
    assert Shard(1, 2).rows(3) == range(3, 6)
    with pytest.raises(InputError, match="process_index must be in"):
        Shard(2, 2)


def test_two_ranks_draw_their_own_rows_of_the_global_noise():
    """Each rank's noisy latents and timesteps are its rows of what one process draws for the whole batch."""
    from diffusers import DDPMScheduler

    seen = []

    def unet(noisy, timesteps, embeds, added_cond_kwargs=None):
        seen.append((noisy.clone(), timesteps.clone()))
        return SimpleNamespace(sample=torch.zeros_like(noisy))

    scheduler = DDPMScheduler()
    latents = torch.ones(4, 4, 8, 8)  # identical rows: any difference comes from the noise
    cond = SimpleNamespace(prompt_embeds=None, added_cond_kwargs=lambda: None)
    options = {"noise_offset": 0.1, "high_noise_share": 0.5}

    def draw(rows=None, num_rows=None):
        mine = latents if rows is None else latents[: len(rows)]
        generator = torch.Generator().manual_seed(3)  # the same in every process
        losses = denoising_loss(
            unet, scheduler, mine, cond, generator, **options, rows=rows, num_rows=num_rows
        )
        return losses, *seen[-1]

    whole_loss, whole_noisy, whole_t = draw()
    for rank in range(2):
        loss, noisy, t = draw(rows=[2 * rank, 2 * rank + 1], num_rows=4)
        part = slice(2 * rank, 2 * rank + 2)
        assert torch.equal(noisy, whole_noisy[part]) and torch.equal(t, whole_t[part])
        assert torch.equal(loss, whole_loss[part])
    assert not torch.equal(whole_noisy[:2], whole_noisy[2:])
    with pytest.raises(ValueError, match="rows must name one row"):
        draw(rows=[0, 4], num_rows=4)


@pytest.mark.parametrize("method", ["lora", "dreambooth"])
def test_two_ranks_see_different_photos_and_average_to_one_process(
    method, random_tiny_dir, photos_dir, tmp_path
):
    """Rank 0 and rank 1 get other photos in one step; the mean of their losses is one process's loss
    on both halves (DreamBooth: photos and class images, in one UNet call per rank)."""
    from pimg.methods import get_method

    overrides = {"num_class_images": 2, "sample_images": 0} if method == "dreambooth" else {}
    config = fast_config(method, random_tiny_dir, photos_dir, tmp_path, **overrides)
    with one_thread():
        trainer = get_method(method).trainer_class()(config)

    def loss_and_photos(shard: Shard, batch_size: int, step: int):
        trainer.shard, trainer.config.batch_size = shard, batch_size
        batch = trainer.batch(step, 0, seed=0)
        with torch.no_grad(), one_thread():
            loss, _ = trainer.loss(batch, torch.Generator().manual_seed(step))
        return float(loss), batch.latents

    step = 1  # with 3 photos, its global batch (positions 2 and 3) spans two epochs
    one_loss, one_photos = loss_and_photos(Shard(), 2, step)
    (loss0, photos0), (loss1, photos1) = (loss_and_photos(Shard(r, 2), 1, step) for r in range(2))
    assert not torch.equal(photos0, photos1)
    assert torch.equal(torch.cat([photos0, photos1]), one_photos)
    assert (loss0 + loss1) / 2 == pytest.approx(one_loss, rel=1e-5) and loss0 != loss1


def test_two_processes_train_as_one_with_twice_the_batch(random_tiny_dir, photos_dir, tmp_path):
    """torchrun, 2 CPU processes (gloo) x batch 1 == 1 process x batch 2; one bar, one writer; a run
    killed at a checkpoint and resumed under 2 processes ends exactly where the uninterrupted one did."""
    from pimg.methods import get_method
    from pimg.trainers.loop import run_training

    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        __file__,
    ]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*command, str(random_tiny_dir), str(photos_dir), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "Traceback" not in output
    # tqdm's first frame of a bar, before any step: one per bar shown (the "whole" run shows its bar).
    assert len(re.findall(r"train:\s+0%\|[^|]*\| 0/3 \[00:00<\?, \?it/s\]", output)) == 1, output[-4000:]

    writes = [json.loads((tmp_path / f"writes_{rank}.json").read_text()) for rank in range(2)]
    assert writes[1] == [], writes[1][:5]
    written = {Path(p).relative_to(tmp_path).as_posix() for p in writes[0]}
    for name in ("config.json", "samples/sample_0000003.png", "checkpoints/step_0000002", "README.md"):
        assert any(w.startswith(f"whole/{name}") for w in written), (name, sorted(written))
    assert not list(tmp_path.glob("*/checkpoints/.tmp_*"))
    assert sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir()) == [
        "step_0000002",
        "step_0000003",
    ]

    config = fast_config("lora", random_tiny_dir, photos_dir, tmp_path / "one", batch_size=2)
    with one_thread():
        run_training(
            get_method("lora").trainer_class()(config), config.loop, tmp_path / "one", progress=False
        )

    file = "pytorch_lora_weights.safetensors"
    one, two, resumed = (read_safetensors(tmp_path / run / file) for run in ("one", "whole", "killed"))
    assert one.keys() == two.keys() == resumed.keys()
    assert all(torch.equal(two[k], resumed[k]) for k in two)
    diff = max(float((one[k] - two[k]).abs().max()) for k in one)
    moved = max(float(one[k].abs().max()) for k in one if "lora_B" in k)  # B starts at 0
    print(f"max |2 processes x batch 1 - 1 process x batch 2| = {diff:.2e} (largest lora_B {moved:.2e})")
    assert diff <= TOLERANCE and moved > 100 * TOLERANCE


def _record_writes(root: Path) -> list[str]:
    """Paths under `root` this process opens for writing, creates, renames or removes (audit events)."""
    written: list[str] = []
    changes = ("os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree")

    def audit(event, args):
        if event == "open":
            path, mode, flags = args
            if not (mode and any(c in mode for c in "wax+")) and not (flags or 0) & (os.O_WRONLY | os.O_RDWR):
                return
        elif event not in changes:
            return
        path = args[0]
        if isinstance(path, str | bytes | os.PathLike):
            path = os.fsdecode(path)
            if any(path.startswith(str(root / run)) for run in RUNS):
                written.append(path)

    sys.addaudithook(audit)
    return written


def _two_process_runs(base: str, photos: str, root: Path) -> None:
    """Each of torchrun's processes: a whole run (bar shown), then one killed at step 2 and resumed."""
    from pimg.methods import get_method
    from pimg.trainers.loop import process_state, run_training
    from pimg.trainers.personalize import result_record

    torch.set_num_threads(1)
    written = _record_writes(root)

    def fresh(run: str):
        config = fast_config("lora", base, photos, root / run, batch_size=1)
        return get_method("lora").trainer_class()(config), config

    method, config = fresh("whole")
    run_training(method, config.loop, root / "whole", resolved_config=result_record("lora", config))
    method, config = fresh("killed")
    try:
        run_training(KilledAt(method, KILLED_AT), config.loop, root / "killed", progress=False)
    except KeyboardInterrupt:
        pass
    state = process_state()
    state.wait_for_everyone()  # a new launch would start after the killed one is gone
    method, config = fresh("killed")
    run_training(method, config.loop, root / "killed", resume=True, progress=False)
    (root / f"writes_{state.process_index}.json").write_text(json.dumps(written))


if __name__ == "__main__":
    _two_process_runs(sys.argv[1], sys.argv[2], Path(sys.argv[3]))
