"""Static resource report of both accelerated backends' kernels for a GPU architecture, no GPU.

Every Triton kernel the ops launch (each constexpr variant, dtype and autotuning configuration;
:mod:`bingo_kernels.triton.aot`) and every kernel of the cuda backend (``csrc/kernels/*.cu``
through nvcc, whose ``-Xptxas -v`` report goes beside the SASS) is compiled for ``sm_<arch>``;
the table gives registers per thread, spilled bytes, shared memory, and static counts of the
SASS instructions that tell which units the inner loops use (wgmma / mma tensor cores, FFMA)
and how data moves (cp.async, TMA).
These are compiler facts, not timings: they explain a GPU benchmark, they do not replace one.

    python bench/kernel_resources.py                         # sm_90, triton + cuda, all configs
    python bench/kernel_resources.py --arch 90 80 --configs largest --providers triton
    python bench/kernel_resources.py --sass-dir /tmp/sass    # also write each kernel's SASS

Writes ``results/<name>.csv`` (one row per compiled kernel) and ``results/<name>.md``;
``--json`` also writes the rows as JSON. ``tests/test_triton_aot.py`` runs it in CI.
"""

from __future__ import annotations

import os

# triton.jit decides at import whether kernels are interpreted: compiled ones are wanted here.
os.environ["TRITON_INTERPRET"] = "0"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default, without its warning

import argparse  # noqa: E402
import csv  # noqa: E402
import datetime as _dt  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402

from bench_common import REPO_ROOT, RESULTS_DIR, markdown_table, triton_version  # noqa: E402

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from bingo_kernels import cubin  # noqa: E402
from bingo_kernels.triton import aot  # noqa: E402  (imports no kernel module)

COLUMNS = ["provider", "kernel", "variant", "dtype", "config", "arch", *cubin.RESOURCES,
           "DYNAMIC_SHARED", *cubin.OPCODES, "compiler", "torch_version", "date"]

# Shared memory one block may use (opt-in maximum), by architecture (CUDA programming guide).
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448, 120: 101376}

_CUDA_DTYPES = {"double": "fp64", "float": "fp32", "__half": "fp16", "__nv_bfloat16": "bf16"}


def triton_rows(archs, dtypes, which, only, sass_dir, jobs):
    launches = [launch for launch in aot.example_launches(dtypes)
                if only is None or re.search(only, launch.label)]
    def chosen(configs):
        return configs if which == "all" else [aot.largest_config(configs)]

    work = [(launch, config, arch) for launch in launches for config in chosen(launch.configs)
            for arch in archs]

    def build(job):
        launch, config, arch = job
        compiled = aot.compile_launch(launch, config, arch)
        listing = compiled.sass()
        if sass_dir is not None:
            slug = re.sub(r"[^A-Za-z0-9]+", "-", f"{launch.label}-{compiled.config_text}")
            (sass_dir / f"triton-sm{arch}-{launch.name}-{slug}.sass").write_text(listing)
        return dict(provider="triton", kernel=launch.name, variant=launch.label,
                    dtype=launch.dtype,
                    config=compiled.config_text, arch=f"sm_{arch}", **compiled.resources(),
                    **cubin.opcode_counts(listing), compiler=f"triton {triton_version()}")

    # Triton's compile spends much of its time in ptxas (a subprocess), so threads overlap it.
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(tqdm(pool.map(build, work), total=len(work), desc="triton kernels",
                         unit="kernel"))


def nvcc_path():
    from bingo_kernels.cuda import build

    home = build.cuda_home()  # a toolkit with bin/nvcc, or None
    return str(Path(home) / "bin" / "nvcc") if home else None


def _demangle(names):
    filt = shutil.which("c++filt")
    if filt is None:
        return {name: name for name in names}
    done = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True)
    plain = done.stdout.splitlines() if done.returncode == 0 else names
    return {name: re.sub(r"\(anonymous namespace\)::|bingo::", "", p)
            for name, p in zip(names, plain)}


def cuda_rows(archs, sass_dir, jobs):
    from bingo_kernels.cuda import build

    nvcc = nvcc_path()
    version = re.search(r"release ([\d.]+)", subprocess.run(
        [nvcc, "--version"], capture_output=True, text=True).stdout)
    compiler = f"nvcc {version.group(1) if version else '?'}"
    sources = sorted((REPO_ROOT / "csrc" / "kernels").glob("*.cu"))
    work = [(source, arch) for source in sources for arch in archs]

    def build_one(job):
        source, arch = job
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "kernels.cubin"
            done = subprocess.run(
                [nvcc, *build.NVCC_FLAGS, f"-I{REPO_ROOT / 'csrc'}", "-Xptxas", "-v",
                 f"-gencode=arch=compute_{arch},code=sm_{arch}", "-cubin", "-o", str(out),
                 str(source)], capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"nvcc failed on {source.name} for sm_{arch}:\n"
                                   f"{done.stderr[-3000:]}")
            binary = out.read_bytes()
        listing = cubin.sass(binary)
        if sass_dir is not None:
            (sass_dir / f"cuda-sm{arch}-{source.stem}.sass").write_text(listing)
            (sass_dir / f"cuda-sm{arch}-{source.stem}.ptxas.txt").write_text(
                done.stdout + done.stderr)
        usage = cubin.resource_usage(binary)
        functions = cubin.sass_functions(listing)
        names = _demangle(sorted(usage))
        rows = []
        for mangled in sorted(usage):
            plain = names[mangled]
            kernel = re.split(r"[<(]", plain)[0].split()[-1]
            first = re.split(r"[,>]", plain.partition("<")[2])[0].strip()
            rows.append(dict(provider="cuda", kernel=kernel, variant=plain,
                             dtype=_CUDA_DTYPES.get(first, ""), config=f"{source.name}",
                             arch=f"sm_{arch}", **usage[mangled], DYNAMIC_SHARED=0,
                             **cubin.opcode_counts(functions.get(mangled, "")),
                             compiler=compiler))
        return rows

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        results = list(tqdm(pool.map(build_one, work), total=len(work), desc="cuda sources",
                            unit="file"))
    return [row for rows in results for row in rows]


def summary(rows):
    """One line per (provider, kernel, dtype, arch): what the configurations have in common."""
    groups = {}
    for row in rows:
        groups.setdefault((row["provider"], row["kernel"], row["dtype"], row["arch"]),
                          []).append(row)
    lines = []
    for (provider, kernel, dtype, arch), group in sorted(groups.items()):
        limit = SHARED_LIMIT.get(int(arch[3:]))
        shared = [r["SHARED"] + r["DYNAMIC_SHARED"] for r in group]
        lines.append(dict(
            provider=provider, kernel=kernel, dtype=dtype or "-", arch=arch, compiled=len(group),
            registers=f"{min(r['REG'] for r in group)}-{max(r['REG'] for r in group)}",
            spilling=sum(r["STL"] > 0 for r in group),
            shared_max=max(shared),
            over_shared_limit=sum(s > limit for s in shared) if limit else "?",
            wgmma=sum(r["HGMMA"] > 0 for r in group), mma=sum(r["HMMA"] > 0 for r in group),
            cp_async=sum(r["LDGSTS"] > 0 for r in group)))
    return lines


def _table(records):
    return markdown_table(list(records[0]), [list(r.values()) for r in records]) if records else ""


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, nargs="+", default=[90],
                        help="compute capabilities as numbers (90 = sm_90, Hopper)")
    parser.add_argument("--providers", nargs="+", default=["triton", "cuda"],
                        choices=["triton", "cuda"])
    parser.add_argument("--dtypes", nargs="+", default=list(aot.DTYPES), choices=list(aot.DTYPES),
                        help="dtypes of the Triton launches")
    parser.add_argument("--configs", choices=["all", "largest"], default="all",
                        help="every autotuning configuration, or only the largest tile per launch")
    parser.add_argument("--only", help="regular expression the Triton launch labels must match")
    parser.add_argument("--sass-dir", type=Path, help="also write each kernel's SASS here")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--name", default=f"kernel-resources-{_dt.date.today().isoformat()}")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)

    if args.sass_dir is not None:
        args.sass_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    if "triton" in args.providers:
        rows += triton_rows(args.arch, args.dtypes, args.configs, args.only, args.sass_dir,
                            args.jobs)
    notes = []
    if "cuda" in args.providers:
        if nvcc_path() is None:
            notes.append("The cuda backend's kernels were not compiled: nvcc not found "
                         "(CUDA_HOME / PATH).")
            print(f"kernel_resources: {notes[-1]}", file=sys.stderr)
        else:
            rows += cuda_rows(args.arch, args.sass_dir, args.jobs)
    stamp = dict(torch_version=torch.__version__, date=_dt.date.today().isoformat())
    rows = [{**row, **stamp} for row in rows]

    args.out_dir.mkdir(parents=True, exist_ok=True)
    with open(args.out_dir / f"{args.name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    compilers = sorted({row["compiler"] for row in rows})
    command = " ".join(argv if argv is not None else sys.argv[1:])
    text = [f"# Kernel resources ({', '.join(f'sm_{a}' for a in args.arch)}), compiled without "
            f"a GPU", "",
            f"{stamp['date']}; {', '.join(compilers)}; torch {stamp['torch_version']}; "
            f"`python bench/kernel_resources.py {command}`. "
            "Static facts of the compiled code (registers per thread, spilled bytes, shared "
            "memory per block, instructions in the SASS), not timings.", "", *notes, "",
            "## Summary", "",
            _table(summary(rows)), "",
            "`spilling`, `over_shared_limit`, `wgmma`, `mma`, `cp_async`: how many of the "
            "compiled kernels spill registers (STL instructions; STACK holds the spilled "
            "bytes per thread), need more shared memory than one block may have on "
            "that architecture, or contain Hopper wgmma (HGMMA), mma.sync/WMMA (HMMA) or "
            "cp.async (LDGSTS) instructions.", "", "## Every compiled kernel", "",
            _table([{k: row[k] for k in COLUMNS[:-3]} for row in rows]), ""]
    (args.out_dir / f"{args.name}.md").write_text("\n".join(text))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))
    print(f"{len(rows)} kernels -> {args.out_dir / args.name}.csv/.md")


if __name__ == "__main__":
    main()
