"""The one training loop every pimg method runs on.

A method is a small object (see `TrainingMethod`): it names its trainable modules, yields batches,
computes a loss, draws samples and saves its output. The loop owns everything else: accelerate
(mixed precision, gradient accumulation, several processes through `accelerate launch` or
`torchrun`), the optimizer and LR schedule, optional EMA, atomic checkpoints, exact resume, sample
images, TensorBoard logs and the progress bar.

Exact resume rests on one rule: everything random in step k (the batch, the noise, the timesteps)
is drawn from generators seeded by (seed, k), never from a stream carried across steps. A run
restarted from the checkpoint of step k therefore sees the same step k+1 as an uninterrupted run.

Data parallelism keeps that rule and adds one: the global batch of a step is defined once, as one
process would draw it, and process i of N takes its rows i*b .. (i+1)*b - 1 (see `Shard`). Every
process gets the same generator and draws the noise of the whole global batch, keeping its own rows.
The loop averages the gradients over the processes, so N processes with batch b train, up to float
rounding, as one process with batch N*b; only the main process writes (config, checkpoints, samples,
logs, the result) and shows the progress bar.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save_file

from pimg.errors import InputError, TrainingError

LR_SCHEDULES = ("constant", "cosine", "linear")
MIXED_PRECISION = ("no", "bf16", "fp16")


@dataclass
class LoopConfig:
    """Settings of the training loop shared by every method.

    Attributes:
        steps: optimizer steps to run in total.
        learning_rate: peak learning rate.
        lr_schedule: one of `LR_SCHEDULES`; decays after the warm-up.
        warmup_steps: linear warm-up from 0 to `learning_rate`.
        weight_decay: AdamW weight decay.
        gradient_accumulation: micro-batches per optimizer step.
        mixed_precision: "no", "bf16" or "fp16" (fp16 needs CUDA; bf16 also speeds up recent CPUs).
        max_grad_norm: gradient clipping norm (0 disables).
        use_8bit_adam: bitsandbytes' AdamW8bit when installed (CUDA only).
        gradient_checkpointing: trade compute for memory in modules that support it.
        ema_decay: keep an exponential moving average of the trainable weights (None: off).
        checkpoint_every: write a resumable checkpoint every N steps (0: only at the end).
        keep_checkpoints: how many checkpoints to keep on disk.
        sample_every: draw sample images every N steps (0: only at the end).
        log_every: write scalars to TensorBoard every N steps.
        seed: seeds every random draw of the run (see module docstring).
    """

    steps: int = 1000
    learning_rate: float = 1e-4
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 1e-2
    gradient_accumulation: int = 1
    mixed_precision: str = "no"
    max_grad_norm: float = 1.0
    use_8bit_adam: bool = False
    gradient_checkpointing: bool = False
    ema_decay: float | None = None
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    sample_every: int = 0
    log_every: int = 10
    seed: int = 0

    def __post_init__(self):
        if self.steps < 1:
            raise InputError(f"steps must be >= 1, got {self.steps}.")
        if self.lr_schedule not in LR_SCHEDULES:
            raise InputError(f"lr_schedule {self.lr_schedule!r} is not one of {LR_SCHEDULES}.")
        if self.mixed_precision not in MIXED_PRECISION:
            raise InputError(f"mixed_precision {self.mixed_precision!r} is not one of {MIXED_PRECISION}.")
        if self.gradient_accumulation < 1:
            raise InputError(f"gradient_accumulation must be >= 1, got {self.gradient_accumulation}.")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise InputError(f"ema_decay must be in (0, 1) or None, got {self.ema_decay}.")


class TrainingMethod(Protocol):
    """What a method gives the loop. Methods never import each other; shared code lives in `pimg/`."""

    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        """Modules with trainable parameters, by name (checkpointed and optimized)."""

    def trainable_parameters(self) -> list[torch.nn.Parameter] | list[dict]:
        """The parameters to optimize (a subset of `trainable_modules`' parameters).

        Parts that need their own learning rate come as torch parameter groups instead:
        `[{"params": [...]}, {"params": [...], "lr": 5e-3}]`; the LR schedule scales every group alike.
        """

    def batch(self, step: int, micro: int, seed: int) -> Any:
        """The batch of micro-batch `micro` of optimizer step `step`, a pure function of its arguments.

        Under several processes: this process's rows of the global batch (`Shard.of_process()`).
        """

    def loss(self, batch: Any, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss to minimise (a mean over the batch) and scalars to log. Draw all noise from `generator`.

        Every process gets the same generator: draw for the whole global batch and keep this process's
        rows (as `denoising_loss(rows=...)` does), so the draws do not depend on the number of processes.
        """

    def sample(self, step: int, out_dir: Path) -> Path | None:
        """Save sample images for `step` under `out_dir`; return the file written, if any."""

    def save(self, out_dir: Path) -> None:
        """Write the finished result in its ecosystem format."""


@dataclass(frozen=True)
class Shard:
    """This process's share of every global batch: process `process_index` of `num_processes`.

    With per-process batch b, the global batch of a micro-step is the `num_processes * b` rows one
    process with that batch would draw; this process takes rows `rows(b)` of it.

    Example:
        >>> Shard(1, 2).rows(3)
        range(3, 6)
    """

    process_index: int = 0
    num_processes: int = 1

    def __post_init__(self):
        if not 0 <= self.process_index < self.num_processes:
            raise InputError(f"process_index must be in [0, {self.num_processes}), got {self.process_index}.")

    @classmethod
    def of_process(cls) -> Shard:
        """The shard of the running process (one shard of one outside a launcher)."""
        state = process_state()
        return cls(state.process_index, state.num_processes)

    def rows(self, batch_size: int) -> range:
        """This process's rows of a global batch of `num_processes * batch_size` rows."""
        return range(self.process_index * batch_size, (self.process_index + 1) * batch_size)


def process_state():
    """accelerate's `PartialState`, set up for the launcher that started this process.

    `PartialState()` alone reads no `ACCELERATE_USE_CPU` (only `Accelerator` does), and on a machine
    without GPUs it takes the processes of `torchrun --nproc_per_node N` or `accelerate launch
    --multi_gpu` for N unrelated single-process runs, each training alone and writing the same result.
    Here the flag is read, and processes started by a launcher with no GPU for them run on the CPU
    (gloo), as the launch asked for N processes.
    """
    from accelerate import PartialState
    from accelerate.state import AcceleratorState
    from accelerate.utils import get_int_from_env, parse_flag_from_env

    launched = get_int_from_env(["WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"], 1)
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    if launched > 1 and state.num_processes == 1:
        # Made earlier without the flag (or found no GPU): one process where the launcher started several.
        AcceleratorState._reset_state(reset_partial_state=True)
        state = PartialState(cpu=True)
    return state


def step_generator(seed: int, step: int, micro: int = 0) -> torch.Generator:
    """A CPU generator for one (step, micro-batch), so a resumed run draws exactly the same numbers."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 1_009 + micro) % (2**63))


def _lr_lambda(config: LoopConfig):
    # Not diffusers' `get_scheduler`: its warm-up ramps as step / warmup (the first step runs at lr 0),
    # ours as (step + 1) / warmup, and its linear decay differs in the last bit at some steps. Compared
    # over 50 steps, they agree only for "constant" and "cosine" without warm-up; switching would change
    # every other run and what a resumed run of an existing checkpoint continues with.
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        span = max(1, config.steps - config.warmup_steps)
        progress = min(1.0, (step - config.warmup_steps) / span)
        if config.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if config.lr_schedule == "linear":
            return 1.0 - progress
        return 1.0

    return factor


def _average_gradients(params: list[torch.nn.Parameter], accelerator, bucket: int = 2**25) -> None:
    """Replace every gradient by its mean over the processes, as DDP would.

    Not DDP's wrapper: it averages only the gradients of calls through its own `forward`, and methods
    call their modules directly (and their other methods, such as a VAE's `encode`), so its hooks never
    fire. Gradients travel in flat buckets of at most `bucket` elements, one all-reduce each.
    """
    grads = [p.grad for p in params if p.grad is not None]
    while grads:
        kind = (grads[0].device, grads[0].dtype)
        group, size, rest = [], 0, []
        for g in grads:
            if (g.device, g.dtype) == kind and (not group or size + g.numel() <= bucket):
                group.append(g)
                size += g.numel()
            else:
                rest.append(g)
        flat = accelerator.reduce(torch.cat([g.reshape(-1) for g in group]), reduction="mean")
        for g, part in zip(group, flat.split([g.numel() for g in group]), strict=True):
            g.copy_(part.view_as(g))
        grads = rest


def _mean_over_processes(logs: dict[str, float], accelerator) -> dict[str, float]:
    """The logged scalars of the global batch: each process's, averaged (equal shares, so the mean)."""
    if accelerator.num_processes == 1 or not logs:
        return logs
    values = torch.tensor(list(logs.values()), dtype=torch.float64, device=accelerator.device)
    return dict(zip(logs, accelerator.reduce(values, reduction="mean").tolist(), strict=True))


def _broadcast_from_main(params: list[torch.nn.Parameter], accelerator) -> None:
    """Start every process from the main process's weights, as DDP does when it wraps a model."""
    from accelerate.utils import broadcast

    if accelerator.num_processes > 1:
        with torch.no_grad():
            for p in params:
                p.copy_(broadcast(p.detach().clone(), from_process=0))


def _param_groups(given: list) -> tuple[list[dict], list[torch.nn.Parameter]]:
    """Parameters or parameter groups -> (groups for the optimizer, all parameters in one flat list)."""
    if not any(isinstance(g, dict) for g in given):
        groups = [{"params": list(given)}]  # one group, as the optimizer would make (old checkpoints load)
    else:
        groups = [
            dict(g, params=list(g["params"])) if isinstance(g, dict) else {"params": [g]} for g in given
        ]
    return groups, [p for g in groups for p in g["params"]]


def _make_optimizer(params: list[dict], config: LoopConfig) -> torch.optim.Optimizer:
    if config.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise InputError(
                "use_8bit_adam needs bitsandbytes: pip install bitsandbytes (CUDA only), or turn it off."
            ) from exc
        return bnb.optim.AdamW8bit(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)


class EMA:
    """Exponential moving average of parameters (shadow copies in fp32).

    Not diffusers' `EMAModel`: that one copies the weights at its first update (decay 0), then ramps the
    decay as (1 + step) / (10 + step) up to `decay`, and keeps its shadow in the parameters' dtype. This one
    averages at `decay` from the first step in fp32, as the runs and checkpoints (`ema.safetensors`) so far.
    """

    def __init__(self, params: list[torch.nn.Parameter], decay: float):
        self.params = params
        self.decay = decay
        self.shadow = [p.detach().float().clone() for p in params]

    @torch.no_grad()
    def update(self) -> None:
        for s, p in zip(self.shadow, self.params, strict=True):
            s.lerp_(p.detach().float(), 1.0 - self.decay)

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange live and averaged weights (call twice to restore)."""
        for s, p in zip(self.shadow, self.params, strict=True):
            live = p.detach().float().clone()
            p.copy_(s.to(p.dtype))
            s.copy_(live)


def _checkpoint_dir(out_dir: Path) -> Path:
    return out_dir / "checkpoints"


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete checkpoint folder under `out_dir`, or None."""
    folder = _checkpoint_dir(out_dir)
    if not folder.is_dir():
        return None
    done = [p for p in folder.glob("step_*") if (p / "state.json").is_file()]
    return max(done, key=lambda p: int(p.name.split("_")[1]), default=None)


def _trained_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint keeps of a module: its trainable parameters and persistent buffers.

    A LoRA or Textual Inversion run trains a few thousand weights inside a frozen model of millions;
    the frozen weights are re-read from the base on resume, so they are not copied into every checkpoint.
    """
    frozen = {n for n, p in module.named_parameters() if not p.requires_grad}
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items() if k not in frozen}


def _save_checkpoint(out_dir: Path, step: int, modules, optimizer, scheduler, ema, keep: int) -> None:
    """Write the checkpoint to a temporary folder, then rename: a kill mid-write leaves the old one intact."""
    root = _checkpoint_dir(out_dir)
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp_step_{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, module in modules.items():
        save_file(_trained_state(module), str(tmp / f"{name}.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    if ema is not None:
        save_file({str(i): s for i, s in enumerate(ema.shadow)}, str(tmp / "ema.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"step": step}))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(root.glob("step_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(path: Path, modules, optimizer, scheduler, ema) -> int:
    for name, module in modules.items():
        state = load_file(str(path / f"{name}.safetensors"))
        missing, unexpected = module.load_state_dict(state, strict=False)
        lacking = sorted(set(missing) & set(_trained_state(module)))
        if lacking or unexpected:
            raise TrainingError(
                f"checkpoint {path} does not fit the {name!r} being trained (missing {lacking[:3]}, unexpected "
                f"{unexpected[:3]}); was it written with another configuration? Start without --resume."
            )
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    if ema is not None:
        shadow = load_file(str(path / "ema.safetensors"))
        for i, s in enumerate(ema.shadow):
            s.copy_(shadow[str(i)])
    return json.loads((path / "state.json").read_text())["step"]


def run_training(
    method: TrainingMethod,
    config: LoopConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    resolved_config: dict | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Train `method` for `config.steps` optimizer steps and save its result under `out_dir`.

    Args:
        method: the method object (see `TrainingMethod`).
        config: loop settings.
        out_dir: where checkpoints, samples, logs and the result go.
        resume: continue from the newest checkpoint in `out_dir` (error if there is none).
        resolved_config: the full configuration, written beside the output as `config.json`.
        progress: show a tqdm bar.
    Returns:
        The last logged scalars plus `wall_time_s`.
    """
    from accelerate.utils import send_to_device
    from torch.utils.tensorboard import SummaryWriter
    from tqdm.auto import tqdm

    out = Path(out_dir)
    accelerator = _accelerator(config)
    main = accelerator.is_main_process
    if main:
        out.mkdir(parents=True, exist_ok=True)
        if resolved_config is not None:
            (out / "config.json").write_text(json.dumps(resolved_config, indent=2, default=str))
    modules = method.trainable_modules()
    if config.gradient_checkpointing:
        for module in modules.values():
            if hasattr(module, "enable_gradient_checkpointing"):  # diffusers
                module.enable_gradient_checkpointing()
            elif getattr(module, "supports_gradient_checkpointing", False):  # transformers
                module.gradient_checkpointing_enable()
    groups, params = _param_groups(method.trainable_parameters())
    if not params:
        raise TrainingError("the method has no trainable parameters; check its configuration.")
    optimizer = _make_optimizer(groups, config)
    # Stepped by the loop once per optimizer step: accelerate's wrapper would step it once per process.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config))
    # The modules stay owned by the method, which calls them itself; accelerate places them and applies
    # mixed precision, without a DDP wrapper (its hooks would never fire: see `_average_gradients`).
    wrapped = [accelerator.prepare_model(m, evaluation_mode=True) for m in modules.values()]
    optimizer = accelerator.prepare_optimizer(optimizer)
    _broadcast_from_main(params, accelerator)
    ema = EMA(params, config.ema_decay) if config.ema_decay else None

    start = 0
    if resume:
        checkpoint = latest_checkpoint(out)
        if checkpoint is None:
            raise TrainingError(f"--resume was given but {out} holds no checkpoint; start without --resume.")
        start = _load_checkpoint(checkpoint, modules, optimizer, scheduler, ema)
        accelerator.print(f"resumed from {checkpoint} at step {start}")
    # Every process has set up (and read any checkpoint) before the main one writes anything.
    accelerator.wait_for_everyone()

    writer = SummaryWriter(str(out / "logs")) if main else None
    # One bar per machine under `accelerate launch`, not one per process.
    hidden = not progress or not accelerator.is_local_main_process
    bar = tqdm(total=config.steps, initial=start, disable=hidden, desc="train", dynamic_ncols=True)
    logs: dict[str, float] = {}
    began = time.time()
    for step in range(start, config.steps):
        for micro in range(config.gradient_accumulation):
            # Methods may build batches on the CPU; the modules sit where accelerate put them.
            batch = send_to_device(method.batch(step, micro, config.seed), accelerator.device)
            with accelerator.accumulate(*wrapped), accelerator.autocast():
                loss, logs = method.loss(batch, step_generator(config.seed, step, micro))
                if not _finite_everywhere(loss, accelerator):
                    raise _non_finite_loss(
                        loss, step, out, modules, params, optimizer, scheduler, ema, config, accelerator
                    )
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    if accelerator.num_processes > 1:
                        _average_gradients(params, accelerator)
                    if config.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                if accelerator.sync_gradients and not optimizer.step_was_skipped:  # fp16 overflow
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update()
        done = step + 1
        logs = _mean_over_processes({"loss": float(loss.detach()), **logs}, accelerator)
        logs["lr"] = scheduler.get_last_lr()[0]
        bar.set_postfix(loss=f"{logs['loss']:.4f}")
        bar.update(1)
        if writer is not None and (done % config.log_every == 0 or done == config.steps):
            for key, value in logs.items():
                writer.add_scalar(f"train/{key}", value, done)
        if main and config.checkpoint_every and done % config.checkpoint_every == 0 and done < config.steps:
            _save_checkpoint(out, done, modules, optimizer, scheduler, ema, config.keep_checkpoints)
        if main and config.sample_every and done % config.sample_every == 0 and done < config.steps:
            _sample(method, done, out, ema, writer)
    bar.close()
    if main:
        # Live weights and the EMA shadow, before the swap: a later run with more steps resumes from here.
        _save_checkpoint(out, config.steps, modules, optimizer, scheduler, ema, config.keep_checkpoints)
    if ema is not None:
        ema.swap()  # the finished model is the averaged one
    if main:
        _sample(method, config.steps, out, None, writer)
        method.save(out)
    if writer is not None:
        writer.close()
    # No process returns before the result is written.
    accelerator.wait_for_everyone()
    logs["wall_time_s"] = time.time() - began
    return logs


def _accelerator(config: LoopConfig):
    """An Accelerator for this run. accelerate keeps its state in a process-wide singleton that refuses
    a second mixed-precision setting; one process running several trainings in turn (the demo, the
    toy-world stages, `pimg eval toysubject`) resets it between runs. Under `accelerate launch`
    (several processes) the launcher's settings stand and are never reset."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if (
        state
        and process_state().num_processes == 1
        and state.get("_mixed_precision") != config.mixed_precision
    ):
        AcceleratorState._reset_state(reset_partial_state=True)
    process_state()  # before `Accelerator`, so it finds the launcher's processes (see `process_state`)
    return Accelerator(
        mixed_precision=config.mixed_precision, gradient_accumulation_steps=config.gradient_accumulation
    )


def _finite_everywhere(loss: torch.Tensor, accelerator) -> bool:
    """Is the loss finite in every process? All of them must stop together, or the others would hang."""
    finite = bool(torch.isfinite(loss.detach()))
    if accelerator.num_processes == 1:
        return finite
    flag = torch.tensor(0.0 if finite else 1.0, device=accelerator.device)
    return float(accelerator.reduce(flag, reduction="sum")) == 0.0


def _non_finite_loss(
    loss, step, out, modules, params, optimizer, scheduler, ema, config, accelerator
) -> TrainingError:
    """Keep what can be resumed and say how to go on.

    Finite weights (the loss overflowed, e.g. in fp16) are checkpointed at this step; weights that are
    already inf/NaN are not, since resuming them would fail again: the newest earlier checkpoint stays.
    The weights are the same in every process; the main one writes.
    """
    weights_ok = all(bool(torch.isfinite(p).all()) for p in params)
    if weights_ok and accelerator.is_main_process:
        _save_checkpoint(out, step, modules, optimizer, scheduler, ema, config.keep_checkpoints + 1)
    accelerator.wait_for_everyone()
    kept = latest_checkpoint(out)
    if kept is None:
        where = "No checkpoint could be kept: the weights were not finite before the first checkpoint"
    else:
        where = f"The newest resumable checkpoint is {kept}"
        if not weights_ok:
            where += " (this step's weights were already not finite, so they were not saved)"
    value = loss.item()
    what = f"loss became {value}" if not math.isfinite(value) else "loss became not finite in another process"
    return TrainingError(
        f"{what} at step {step}. {where}. Lower the learning rate (now "
        f"{config.learning_rate}) or use mixed_precision='no', then resume (or start again)."
    )


def _sample(method: TrainingMethod, step: int, out: Path, ema: EMA | None, writer) -> None:
    if ema is not None:
        ema.swap()
    try:
        path = method.sample(step, out / "samples")
    finally:
        if ema is not None:
            ema.swap()
    if path is not None and writer is not None:
        import numpy as np
        from PIL import Image

        writer.add_image("samples", np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")
