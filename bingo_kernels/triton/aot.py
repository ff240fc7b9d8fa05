"""Ahead-of-time compilation of the Triton kernels for a named GPU architecture, with no GPU.

Why this exists: CI checks the kernels' *results* under ``TRITON_INTERPRET=1``, but the
interpreter runs them with numpy and never meets the compiler. What only the compiler checks
(``tl.dot``'s shape and dtype rules, tile sizes that do not fit shared memory, register spills)
and what the design relies on (tensor-core instructions for fp16/bf16, Hopper's ``wgmma``) would
otherwise first show on a GPU. Triton compiles for a target it is told, without a driver, down to
a cubin (its own ptxas); :mod:`bingo_kernels.cubin` reads back registers, spills and SASS.

How: :func:`capture` runs a function that calls the Triton wrappers (:mod:`.linear`, ...) on CPU
tensors with every launcher replaced by a recorder, so the real wrappers choose the kernels,
arguments and constexpr variants; :func:`compile_launch` then compiles one recorded launch with
one of its autotuning configurations for ``sm_<arch>``. :func:`example_launches` covers every
kernel, variant and dtype the ops can launch. ``bench/kernel_resources.py`` tabulates the result
(and the cuda backend's, from nvcc) and ``tests/test_triton_aot.py`` compiles them in CI.

The kernel modules must have been imported with ``TRITON_INTERPRET`` unset or 0 (``triton.jit``
decides at import): under the interpreter there is nothing to compile, and :func:`capture` says so.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import triton

from .. import cubin
from ._launch import is_interpreted

KERNEL_MODULES = ("linear", "linear_metrics", "metrics", "unit_sums")
"""Modules of :mod:`bingo_kernels.triton` whose launchers :func:`capture` records."""

_POINTER_TYPES = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32",
                  torch.float64: "*fp64", torch.int64: "*i64", torch.int32: "*i32",
                  torch.int8: "*i8", torch.uint8: "*u8", torch.bool: "*i1"}


@dataclass
class Launch:
    """One kernel launch a wrapper asked for, as :func:`capture` recorded it."""

    kernel: Any
    """The ``triton.jit`` function."""
    configs: list
    """Its autotuning configurations (``triton.Config``)."""
    arguments: dict[str, Any]
    """Argument name -> value, as the wrapper passed them (tensors are CPU stand-ins)."""
    label: str = ""
    """What the example was (op, variant, dtype)."""
    dtype: str = ""
    """Its floating-point data's dtype (a key of :data:`DTYPES`)."""

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__


@dataclass
class CompiledLaunch:
    """One launch compiled with one configuration for one architecture."""

    launch: Launch
    config: Any
    arch: int
    shared_bytes: int
    binary: bytes = field(repr=False)
    """The cubin."""

    @property
    def config_text(self) -> str:
        return config_text(self.config)

    def resources(self) -> dict[str, int]:
        """Registers, spills and shared memory (:func:`bingo_kernels.cubin.resource_usage`) plus
        Triton's dynamic shared memory (``DYNAMIC_SHARED``), which the cubin does not record."""
        (usage,) = cubin.resource_usage(self.binary).values()
        return {**usage, "DYNAMIC_SHARED": self.shared_bytes}

    def sass(self) -> str:
        return cubin.sass(self.binary)


def config_text(config) -> str:
    """A configuration as one line: tile sizes, warps, pipeline stages."""
    tiles = " ".join(f"{k}={v}" for k, v in config.kwargs.items())
    return f"{tiles} warps={config.num_warps} stages={config.num_stages}"


def largest_config(configs):
    """The configuration with the most warps, then the largest tile: the likeliest to run out
    of registers or shared memory."""
    def size(config):
        tiles = 1
        for value in config.kwargs.values():
            tiles *= int(value)
        return config.num_warps, tiles
    return max(configs, key=size)


# --- capturing the launches the wrappers make ----------------------------------------------------

def kernel_modules() -> list:
    return [importlib.import_module(f"{__package__}.{name}") for name in KERNEL_MODULES]


def launchers() -> list[tuple[Any, str, Callable]]:
    """``(module, attribute, launcher)`` of every :func:`._launch.launcher` in the kernel
    modules (importing them)."""
    return [(module, attr, launch) for module in kernel_modules()
            for attr, launch in vars(module).items()
            if callable(launch) and hasattr(launch, "kernel") and hasattr(launch, "configs")]


@contextlib.contextmanager
def capture() -> Iterator[list[Launch]]:
    """Within the block, Triton wrappers record their launches instead of running them.

    Yields the list the launches are appended to. The wrappers' outputs are then uninitialised
    buffers: only what they launch matters.
    """
    launches: list[Launch] = []
    replaced = launchers()
    if any(is_interpreted(launch.kernel) for _, _, launch in replaced):
        raise RuntimeError(
            "the Triton kernels were imported under TRITON_INTERPRET=1: there is nothing to "
            "compile ahead of time (import them with TRITON_INTERPRET=0, e.g. in a fresh process)")
    for module, attr, launch in replaced:
        setattr(module, attr, _recorder(launch, launches))
    try:
        yield launches
    finally:
        for module, attr, launch in replaced:
            setattr(module, attr, launch)


def _recorder(launch, launches: list[Launch]) -> Callable:
    parameters = inspect.signature(launch.kernel.fn)

    def record(grid_fn, *args, **kwargs):
        bound = parameters.bind_partial(*args, **kwargs)
        bound.apply_defaults()
        launches.append(Launch(launch.kernel, list(launch.configs), dict(bound.arguments)))

    return record


# --- compiling ---------------------------------------------------------------------------------

def _argument_type(name: str, value: Any) -> str:
    if isinstance(value, torch.Tensor):
        if value.dtype not in _POINTER_TYPES:
            raise TypeError(f"argument {name}: no Triton pointer type for {value.dtype}")
        return _POINTER_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"argument {name}: cannot type {type(value).__name__} for compilation")


def compile_launch(launch: Launch, config, arch: int = 90) -> CompiledLaunch:
    """Compile ``launch`` with ``config`` for ``sm_<arch>`` (no GPU needed).

    Every non-constexpr argument is typed from its value (pointers by dtype, ints as i32 unless
    they need i64), without the divisibility specialisations a real launch adds: the compiled
    code is the general variant of what a GPU run would build.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    values = {**launch.arguments, **config.kwargs}
    signature, constexprs = {}, {}
    for param in launch.kernel.params:
        value = values[param.name]
        if param.is_constexpr or value is None:
            signature[param.name], constexprs[param.name] = "constexpr", value
        else:
            signature[param.name] = _argument_type(param.name, value)
    source = ASTSource(fn=launch.kernel, signature=signature, constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=config.num_warps,
                                           num_stages=config.num_stages))
    return CompiledLaunch(launch, config, arch, int(compiled.metadata.shared),
                          compiled.asm["cubin"])


# --- the launches the ops can make -------------------------------------------------------------

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def example_launches(dtypes=("fp32", "fp16", "bf16")) -> list[Launch]:
    """Every kernel and constexpr variant the four ops launch, for each of ``dtypes``.

    Small CPU stand-in tensors (shapes do not change the compiled code: they are runtime
    arguments). Labels name op, variant and dtype.
    """
    from . import linear, linear_metrics, metrics, unit_sums

    generator = torch.Generator().manual_seed(0)

    def tensor(*shape, dtype):
        return torch.randn(*shape, generator=generator).to(dtype)

    recorded: list[Launch] = []
    hashed = dict(explicit_masks=None, prob=None, prob_scalar=0.3, seed=1, search=2, k_start=0,
                  num_subsets=4, unit_offset=0)
    with capture() as launches:
        def note(label: str, call: Callable[[], Any], dtype: str) -> None:
            start = len(launches)
            call()
            for launch in launches[start:]:
                launch.label, launch.dtype = label, dtype
            recorded.extend(launches[start:])

        for dname in dtypes:
            dtype = DTYPES[dname]
            w, w0 = tensor(24, 40, dtype=dtype), tensor(24, 40, dtype=dtype)
            b, b0 = tensor(24, dtype=dtype), tensor(24, dtype=dtype)
            shared, per_subset = tensor(8, 40, dtype=dtype), tensor(4, 8, 40, dtype=dtype)
            explicit = dict(hashed, explicit_masks=torch.rand(4, 24, generator=generator) < .5)
            per_unit = dict(hashed, prob=torch.rand(24, generator=generator))
            per_weight = dict(hashed, prob=torch.rand(24 * 40, generator=generator))
            variants = [  # (label, x, init weights and biases?, bias?, mask description, unit)
                ("shared x, neuron, reset to init", shared, True, True, hashed, "neuron"),
                ("shared x, neuron, reset to zero", shared, False, True, hashed, "neuron"),
                ("shared x, neuron, explicit masks", shared, True, False, explicit, "neuron"),
                ("per-subset x, neuron, reset to init", per_subset, True, True, hashed,
                 "neuron"),
                ("per-subset x, neuron, reset to zero", per_subset, False, False, hashed,
                 "neuron"),
                ("per-subset x, neuron, explicit masks", per_subset, True, True, explicit,
                 "neuron"),
                ("per-subset x, neuron, per-unit p", per_subset, True, True, per_unit, "neuron"),
                ("shared x, weight, reset to init", shared, True, True, hashed, "weight"),
                ("per-subset x, weight, reset to zero", per_subset, False, False, hashed,
                 "weight"),
                ("per-subset x, weight, per-unit p", per_subset, True, True, per_weight,
                 "weight"),
            ]
            for label, x, init, with_bias, masks, unit in variants:
                note(f"masked_reset_linear: {label}, {dname}", lambda: linear.masked_reset_linear(
                    x, w, w0 if init else None, b if with_bias else None,
                    b0 if init and with_bias else None, **masks, granularity=unit), dname)
            targets = torch.randint(0, 24, (8,), generator=generator)
            for label, masks, unit in [("neuron", hashed, "neuron"),
                                       ("neuron, explicit masks", explicit, "neuron"),
                                       ("weight", hashed, "weight")]:
                note(f"subset_linear_metrics: {label}, {dname}",
                     lambda: linear_metrics.subset_linear_metrics(
                         per_subset, w, w0, b, b0, targets, **masks, granularity=unit,
                         ignore_index=-100, chunk=0), dname)
            note(f"subset_metrics, {dname}",
                 lambda: metrics.subset_metrics(tensor(4, 8, 24, dtype=dtype), targets, -100),
                 dname)
        values = torch.randn(4, 3, generator=generator)
        unit_hashed = {k: v for k, v in hashed.items() if k != "num_subsets"}
        for label, masks in [("hashed", unit_hashed),
                             ("per-unit p", dict(unit_hashed, prob=torch.rand(24))),
                             ("explicit masks", dict(unit_hashed, explicit_masks=torch.rand(
                                 4, 24, generator=generator) < .5))]:
            note(f"subset_unit_sums: {label}",
                 lambda: unit_sums.subset_unit_sums(values, **masks, num_units=24), "fp32")
    return recorded
