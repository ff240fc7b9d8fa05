"""Tile configurations: autotuned on a GPU, one small fixed configuration under the interpreter.

Triton's interpreter runs every program instance in Python; autotuning there would only multiply
the (slow) test time, and its benchmarking needs a GPU. So each kernel is wrapped by
:func:`launcher`, which autotunes over ``gpu_configs`` for compiled kernels and launches with
``interpreter_meta`` otherwise. Whether a kernel is interpreted is read off the object
``triton.jit`` returned (it decides when the kernel module is imported), not off the environment
now, so the two cannot disagree.
"""

from __future__ import annotations

from typing import Callable

import triton


def is_interpreted(jitted) -> bool:
    """Whether ``triton.jit`` produced an interpreted function (TRITON_INTERPRET was set)."""
    return type(jitted).__name__ == "InterpretedFunction"


def launcher(jitted, gpu_configs: list, key: list[str], interpreter_meta: dict,
             reset_to_zero: list[str] | None = None) -> Callable:
    """``launch(grid_fn, *args, **kwargs)``; ``grid_fn(meta)`` maps the tile sizes to the grid.

    ``key`` names the arguments whose values select a tuned configuration (the problem shape).
    """
    if is_interpreted(jitted):
        def launch(grid_fn, *args, **kwargs):
            return jitted[grid_fn(interpreter_meta)](*args, **kwargs, **interpreter_meta)
    else:
        tuned = triton.autotune(configs=gpu_configs, key=key, reset_to_zero=reset_to_zero)(jitted)

        def launch(grid_fn, *args, **kwargs):
            return tuned[grid_fn](*args, **kwargs)

    launch.kernel = jitted
    launch.configs = list(gpu_configs)  # for ahead-of-time compilation (see .aot)
    return launch


def config(num_warps: int = 4, num_stages: int = 3, **meta) -> triton.Config:
    """A ``triton.Config`` with keyword tile sizes."""
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages)

