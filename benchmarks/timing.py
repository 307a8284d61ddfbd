"""Wall-clock timing shared by the speed scripts beside it: one run, or the best of several after a warm-up.

GPU work is asynchronous, so each run is bracketed by `torch.cuda.synchronize()` when CUDA is in use.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

# `--dtype` of the speed scripts; on a GPU users run half precision, on a CPU float32.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def seconds(run: Callable[[], object]) -> float:
    """Wall time of one call of `run`, GPU work included."""
    _synchronize()
    began = time.perf_counter()
    run()
    _synchronize()
    return time.perf_counter() - began


def best_of(repeats: int, run: Callable[[], object], warm_up: Callable[[], object] | None = None) -> float:
    """Seconds of the fastest of `repeats` calls of `run`, after one call of `warm_up` (default: `run`)."""
    (warm_up or run)()
    return min(seconds(run) for _ in range(repeats))
