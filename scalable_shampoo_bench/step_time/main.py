"""The command line of the step-time benchmark: its flags, the sections it runs, the JSON file it writes."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..machine import CpuLoad, device_name, source_info
from .batched import batched_summary, bench_batched
from .flops import flop_bounds, gemm_rate
from .models import MODELS, model_dims
from .report import report
from .roots import bench_roots
from .steps import bench_end_to_end, bench_step_time

SECTIONS = ("steps", "e2e", "roots", "flops", "batched", "compile", "packed")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="shampoo-bench step-time",
        description="Shampoo vs AdamW optimizer-step time (interleaved), root cost, FLOP bound.",
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads for everything but --root-threads")
    p.add_argument("--out", default="step_time.json", help="JSON output file")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of a few seconds")
    p.add_argument("--models", type=_names, default=None, help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--block-sizes", type=_ints, default=None, help="comma list (default 256,1024)")
    p.add_argument("--frequencies", type=_ints, default=None, help="precondition_frequency list (default 10,100)")
    p.add_argument("--start-step", type=int, default=1, help="start_preconditioning_step (default 1)")
    p.add_argument("--periods", type=int, default=2, help="measured precondition_frequency periods (≥ 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps before measuring (default 3)")
    p.add_argument("--chunk", type=int, default=None, help="steps per interleaved chunk (default 10)")
    p.add_argument("--compile-elementwise", action="store_true", help="Shampoo(compile_elementwise=True)")
    p.add_argument("--bf16-roots", action="store_true", help="Shampoo(root_storage_dtype=torch.bfloat16)")
    p.add_argument(
        "--format1-merge", action="store_true", help="plan Shampoo with the format-1 merge rule (from the left)"
    )
    p.add_argument("--e2e-models", type=_names, default=None, help="end-to-end models (default: all)")
    p.add_argument(
        "--e2e-batch", type=int, default=None,
        help="end-to-end batch for every model (default per model: linear4 512 rows, chargpt 32, transformer 8, "
        "resnet 128, embedding 256 bags)",
    )  # fmt: skip
    p.add_argument(
        "--e2e-seq", type=int, default=None,
        help="end-to-end sequence length of chargpt and transformer (default 128 and 64; chargpt's ctx is 128)",
    )  # fmt: skip
    p.add_argument(
        "--batched-compare", action="store_true",
        help="also time Shampoo batched=True against batched=False (the per-block loop), step alone, "
        "per model and block size (the 'batched' section)",
    )  # fmt: skip
    p.add_argument("--batched-steps", type=int, default=None, help="timed steps each in --batched-compare (default 40)")
    p.add_argument("--root-sizes", type=_ints, default=None, help="root matrix sizes (default 256,512,1024)")
    p.add_argument("--root-spectra", type=_names, default=["square", "tall"], help="square (ill-), tall (well-cond.)")
    p.add_argument("--root-threads", type=_ints, default=None, help="thread counts for root timing (default --threads)")
    p.add_argument("--root-repeats", type=int, default=None, help="repeats per root timing (default 5)")
    p.add_argument("--gemm-sizes", type=_ints, default=None, help="GEMM sizes (default 256,512,1024)")
    p.add_argument(
        "--sections", type=_names, default=["steps", "e2e", "roots", "flops"],
        help="what to run: steps, e2e, roots, flops, batched, compile, packed (default: the first four; "
        "--batched-compare adds batched; compile times compile_elementwise=True against eager; packed times "
        "packed_storage=True against the default layout)",
    )  # fmt: skip
    p.add_argument("--profile", action="store_true", help="torch.profiler top ops of non-root Shampoo steps")
    p.add_argument("--profile-steps", type=int, default=5)
    p.add_argument("--note", default="", help="free text stored in the JSON (e.g. what else ran on the machine)")
    args = p.parse_args(argv)
    q = args.quick
    defaults = {
        "models": list(MODELS),
        "block_sizes": [16, 64] if q else [256, 1024],
        "frequencies": [4] if q else [10, 100],
        "warmup": 2 if q else 3,
        "chunk": 3 if q else 10,
        "e2e_models": list(MODELS),
        "batched_steps": 4 if q else 40,
        "root_sizes": [16, 32] if q else [256, 512, 1024],
        "root_threads": [args.threads],
        "root_repeats": 2 if q else 5,
        "gemm_sizes": [32, 64] if q else [256, 512, 1024],
    }
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.periods < 1 or args.warmup < 1 or args.chunk < 1 or args.batched_steps < 1:
        p.error("--periods, --warmup, --chunk and --batched-steps must be ≥ 1")
    if args.e2e_batch is not None and args.e2e_batch < 1:
        p.error("--e2e-batch must be ≥ 1")
    if args.e2e_seq is not None and not 1 <= args.e2e_seq <= model_dims("chargpt", q)["ctx"]:
        p.error(f"--e2e-seq must be in [1, {model_dims('chargpt', q)['ctx']}] (chargpt's context)")
    if args.batched_compare and "batched" not in args.sections:
        args.sections = [*args.sections, "batched"]
    for m in args.models + args.e2e_models:
        if m not in MODELS:
            p.error(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}")
    return args


def meta(args: argparse.Namespace, argv: list[str] | None, device: torch.device) -> dict[str, Any]:
    """What the run was: its command line, versions, the machine, threads, the library's sources, the settings."""
    return {
        "benchmark": "step_time",
        "argv": sys.argv[1:] if argv is None else list(argv),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "device": args.device,
        "device_name": device_name(device),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "root_threads": args.root_threads,
        "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")},
        "mkl": torch.backends.mkl.is_available(),
        "quick": args.quick,
        "source": source_info(),
        "note": args.note,
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "note")},
    }


def run_sections(args: argparse.Namespace, device: torch.device, res: dict[str, Any], save: Callable[[], None]) -> None:
    """Every measurement asked for, into ``res``; ``save()`` after each, so a cut-short run keeps its results."""
    sections = set(args.sections)
    gemm_repeats = 5 if args.quick else 20
    if "flops" in sections:
        res["gemm"] = [gemm_rate(n, device, gemm_repeats) for n in args.gemm_sizes]
    timed_against_adamw = (("steps", "step_time", bench_step_time), ("e2e", "end_to_end", bench_end_to_end))
    for section, key, bench in timed_against_adamw:
        if section in sections:
            res[key] = []
            for m in args.models if section == "steps" else args.e2e_models:
                for bs in args.block_sizes:
                    for f in args.frequencies:
                        res[key].append(bench(m, bs, f, args, device))
                        save()
    for pair in ("batched", "compile", "packed"):  # two Shampoo variants against each other
        if pair in sections:
            res[pair] = []
            for m in args.models:
                for bs in args.block_sizes:
                    res[pair].append(bench_batched(m, bs, args, device, pair=pair))
                    save()
            if pair == "batched":
                res["batched_summary"] = batched_summary(res["batched"])
    if "roots" in sections:
        res["roots"] = []
        for threads in args.root_threads:
            torch.set_num_threads(threads)
            res["roots"] += bench_roots(args.root_sizes, args.root_spectra, threads, args.root_repeats, device)
            save()
        torch.set_num_threads(args.threads)
    if "flops" in sections:
        # the rate again at the end, so a change of load during the run shows
        res["gemm_end"] = [gemm_rate(n, device, gemm_repeats) for n in args.gemm_sizes]
        if res.get("step_time"):
            gemm = {g["n"]: g for g in res["gemm"]}
            ref = 1024 if 1024 in gemm else max(gemm)
            res["flop_bound"] = flop_bounds(res["step_time"], gemm, ref)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: CUDA is not available", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    res: dict[str, Any] = {"meta": meta(args, argv, device)}
    whole = CpuLoad()
    out = Path(args.out)
    if out.parent != Path(""):
        out.parent.mkdir(parents=True, exist_ok=True)

    def save(complete: bool = False) -> None:
        res["meta"]["complete"] = complete
        out.write_text(json.dumps(res, indent=1) + "\n")

    run_sections(args, device, res, save)
    res["load"] = whole.stop()
    res["meta"]["wall_s"] = round(time.perf_counter() - t0, 2)
    res["meta"]["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    save(complete=True)
    print(report(res))
    print(f"\nwrote {out}")
    return 0
