"""Memory of the optimizer state, a root recomputation's working memory, and the
first-step cost of ``compile_elementwise``: the figures the README quotes.

    python -m scalable_shampoo_bench.memory_report --threads 1     # ~2–6 minutes on 2 cores (compiling)

Sections (``--sections``, default all four):

- ``state``: ``optimizer.memory()`` on the char-GPT of the step-time benchmark
  (``CharGPT(65, 128, d=128, layers=4, heads=4)``) after 3 steps with roots, for
  block 1024 and 256, roots stored in fp32 and in bf16: bytes by kind and each
  kind ÷ the parameters' bytes.
- ``issue``: issue 17's four rows (4 × Linear 1024² and a Transformer d=256, 4 layers,
  feed-forward 2048, at block 1024 and 256; Adam grafting, betas (0.9, 0.999), roots
  every 10 steps from step 10, ``--issue-steps`` iterations of forward + backward +
  step), each in a fresh interpreter, by the issue's definitions: *optimizer state* is
  the unique storage bytes of the tensors reachable from ``optimizer.state``
  (parameters and gradients excluded); *state + scratch* is the unique storage bytes of
  every tensor the garbage collector knows after the run, minus the same count after
  one forward/backward before the optimizer was built. Also ``optimizer.memory()``
  (its total ÷ the live count is ``memory_over_live``), peak RSS, and Meta's
  Distributed Shampoo's figures from the issue (``META_MIB``; not measured here).
- ``roots``: how far the process's peak resident memory (``VmHWM``, reset just
  before through ``/proc/self/clear_refs``) rises above its resident memory then,
  while ``compute_roots`` computes the inverse 4th roots of 96 statistics of 256²
  (24 MB), split into at most ``ROOT_BATCHES`` batches (the library) and as one
  batch; each variant in a fresh interpreter, ``--repeats`` times.
- ``compile``: the wall time of the first and the second step of
  ``Shampoo(compile_elementwise=True)`` on the char-GPT (the first one compiles),
  against the eager path's, in a fresh interpreter.

Writes ``scalable_shampoo_bench/results/memory_report.json``; the sections not run this
time are kept from the file as it was (``kept_from_earlier_run`` names them).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from scalable_shampoo import Shampoo

from .machine import CpuMonitor, describe
from .step_time.models import make_model, set_fixed_grads


def state_memory(block_size: int, bf16: bool) -> dict[str, Any]:
    model = make_model("chargpt", False, torch.device("cpu"))
    set_fixed_grads(model, seed=1)
    opt = Shampoo(model.parameters(), block_size=block_size, start_preconditioning_step=1, precondition_frequency=2,
                  root_storage_dtype=torch.bfloat16 if bf16 else None)  # fmt: skip
    for _ in range(3):
        opt.step()
    mem = opt.memory()
    params = mem.pop("parameters")
    total = sum(mem.values())
    return dict(block_size=block_size, root_storage="bf16" if bf16 else "fp32", parameter_bytes=params, bytes=mem,
                over_parameters={k: round(v / params, 2) for k, v in mem.items()},
                total_over_parameters=round(total / params, 2))  # fmt: skip


# The issue's four rows and Meta's Distributed Shampoo's figures on them (MiB), as the issue
# reports them (Meta's package is not installable here; same settings: Adam grafting,
# betas (0.9, 0.999), precondition frequency 10, 2 torch threads).
META_MIB = {
    ("linear4", 1024): {"state": 80, "state_and_scratch": 84, "peak_rss": 594},
    ("linear4", 256): {"state": 68, "state_and_scratch": 69, "peak_rss": 500},
    ("transformer256", 1024): {"state": 152, "state_and_scratch": 159, "peak_rss": 687},
    ("transformer256", 256): {"state": 94, "state_and_scratch": 95, "peak_rss": 586},
}


def _live_storages() -> dict[int, int]:
    """data_ptr → bytes of the storage of every tensor that the garbage collector knows."""
    import gc
    import warnings

    gc.collect()
    with warnings.catch_warnings():  # isinstance on some deprecated torch objects warns
        warnings.simplefilter("ignore")
        tensors = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    out = {}
    for t in tensors:
        try:
            storage = t.untyped_storage()
        except Exception:  # a tensor without storage
            continue
        out[storage.data_ptr()] = storage.nbytes()
    return out


def _state_bytes(opt: Shampoo, exclude: set[int]) -> int:
    """Unique storage bytes of the tensors reachable from ``optimizer.state`` (parameters and gradients excluded)."""
    seen: dict[int, int] = {}
    for st in opt.state.values():
        for v in st.values():
            if torch.is_tensor(v):
                storage = v.untyped_storage()
                if storage.data_ptr() not in exclude:
                    seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def issue_row_child(model_name: str, block_size: int, steps: int, storage: str = "fp32") -> None:
    """In a fresh interpreter: one issue row. The model and its fixed batch, one forward/backward,
    the live tensor bytes; then Shampoo (Adam grafting, betas (0.9, 0.999), frequency 10, roots
    from step 10) for ``steps`` iterations of forward + backward + step, and the bytes again.
    ``storage``: ``fp32`` (the default), ``bf16`` (``root_storage_dtype=torch.bfloat16``) or
    ``packed`` (``packed_storage=True``)."""
    from torch import nn

    from .step_time.models import e2e_loss, e2e_shape, model_dims

    torch.manual_seed(0)
    if model_name == "linear4":
        dims = model_dims("linear4", False)
        model: nn.Module = nn.Sequential(*[nn.Linear(dims["d"], dims["d"]) for _ in range(dims["layers"])])
        loss = e2e_loss("linear4", dims, e2e_shape("linear4", False), torch.device("cpu"))
    else:  # the issue's Transformer d=256: 4 encoder layers, 8 heads, feed-forward 2048 (20 MiB)
        dims = {"d": 256, "layers": 4, "heads": 8, "ff": 2048}
        layer = nn.TransformerEncoderLayer(dims["d"], dims["heads"], dims["ff"], dropout=0.0, batch_first=True)
        model = nn.TransformerEncoder(layer, dims["layers"], enable_nested_tensor=False)
        loss = e2e_loss("transformer", dims, e2e_shape("transformer", False), torch.device("cpu"))
    loss(model).backward()
    # a gradient gets a Python object (that gc sees) only once Python reads it: read them in
    # both counts, so the gradients are on both sides
    grads = [p.grad for p in model.parameters()]
    before = _live_storages()
    del grads
    opt = Shampoo(model.parameters(), lr=1e-3, betas=(0.9, 0.999), grafting="adam", block_size=block_size,
                  precondition_frequency=10, start_preconditioning_step=10,
                  root_storage_dtype=torch.bfloat16 if storage == "bf16" else None,
                  packed_storage=storage == "packed")  # fmt: skip
    for _ in range(steps):
        opt.zero_grad()
        loss(model).backward()
        opt.step()
    grads = [p.grad for p in model.parameters()]
    after = _live_storages()
    params = {t.untyped_storage().data_ptr() for p in model.parameters() for t in (p, p.grad) if t is not None}
    del grads
    held = sum(after.values()) - sum(before.values())  # a count minus a count (new gradients replace the old)
    mem = opt.memory()
    param_bytes = mem.pop("parameters")
    diag = opt.diagnostics()["blocks"]
    print(json.dumps(dict(
        model=model_name, block_size=block_size, root_storage=storage, steps=steps,
        parameter_bytes=param_bytes,
        roots_installed=sum(r["has_root"] for r in diag), statistics_kept=len(diag),
        state_bytes=_state_bytes(opt, params), state_and_scratch_bytes=held, memory=mem,
        memory_total=sum(mem.values()), peak_rss_mb=round(_status_mb("VmHWM") * 2**20 / 1e6, 1),
    )))  # fmt: skip


def _status_mb(field: str) -> float:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak resident) of this process, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def roots_child(batches: int, count: int, n: int) -> None:
    """In a fresh interpreter: peak growth while computing ``count`` roots of n², in ≤ ``batches`` batches."""
    from scalable_shampoo import background
    from scalable_shampoo.background import RootJob, RootOptions, compute_roots
    from scalable_shampoo.matrix_roots import RootMethod

    gen = torch.Generator().manual_seed(0)
    opts = RootOptions(RootMethod.EIGH, 1e-6, True, torch.float32, 0.5, 3, 100, 1e-6)
    mats = []
    for _ in range(count):
        g = torch.randn(n, 2 * n, generator=gen)
        mats.append(g @ g.T / (2 * n))
    jobs = [RootJob((i, 0, 0), 1, m, 4, opts) for i, m in enumerate(mats)]
    compute_roots(jobs[:1])  # LAPACK and the allocator warmed up on one matrix
    background.ROOT_BATCHES = batches
    before = _status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) restarts from the resident memory now
    outs = compute_roots(jobs)
    peak = _status_mb("VmHWM")
    assert len(outs) == count and all(o.ok for o in outs)
    print(json.dumps(dict(peak_growth_mb=round(peak - before, 1), statistics_mb=round(count * n * n * 4 / 2**20, 1),
                          roots_mb=round(sum(o.root.nbytes for o in outs) / 2**20, 1))))


def compile_child(compiled: bool) -> None:
    model = make_model("chargpt", False, torch.device("cpu"))
    set_fixed_grads(model, seed=1)
    opt = Shampoo(model.parameters(), block_size=256, start_preconditioning_step=1, precondition_frequency=1000,
                  compile_elementwise=compiled)  # fmt: skip
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    print(json.dumps(dict(first_step_s=round(times[0], 2), second_step_s=round(times[1], 3),
                          third_step_s=round(times[2], 3))))  # fmt: skip


def issue_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The issue's four rows, each in a fresh interpreter, against Meta's figures (MiB = 2**20 bytes)."""
    rows = []
    print("| model, block, roots | optimizer state (MiB), ours / Meta | state + scratch (MiB), ours / Meta | "
          "ours ÷ Meta (state + scratch) | peak RSS (MB), ours |")  # fmt: skip
    print("|---|---|---|---|---|")
    runs = [(name, block, storage, meta) for (name, block), meta in META_MIB.items()
            for storage in ("fp32", "bf16", "packed")]  # the default, bf16 roots, packed_storage  # fmt: skip
    for name, block, storage, meta in runs:
        r = child(["--issue-child", f"{name}:{block}:{storage}", "--issue-steps", str(args.issue_steps)], args.threads)
        r["meta_mib"] = meta
        r["state_mib"] = round(r["state_bytes"] / 2**20, 1)
        r["state_and_scratch_mib"] = round(r["state_and_scratch_bytes"] / 2**20, 1)
        r["memory_total_mib"] = round(r["memory_total"] / 2**20, 1)
        r["memory_over_live"] = round(r["memory_total"] / r["state_and_scratch_bytes"], 4)
        r["over_meta"] = round(r["state_and_scratch_mib"] / meta["state_and_scratch"], 3)
        rows.append(r)
        print(f"| {name}, {block}, {storage} roots | {r['state_mib']} / {meta['state']} | "
              f"{r['state_and_scratch_mib']} / {meta['state_and_scratch']} | {r['over_meta']} | "
              f"{r['peak_rss_mb']} |")  # fmt: skip
    return rows


def child(args: list[str], threads: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "scalable_shampoo_bench.memory_report", "--threads", str(threads), *args]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default="state,issue,roots,compile")
    ap.add_argument("--repeats", type=int, default=3, help="fresh interpreters per root-memory variant")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "memory_report.json"))
    ap.add_argument("--roots-child", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--compile-child", choices=("compiled", "eager"), default=None, help=argparse.SUPPRESS)
    ap.add_argument("--issue-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--issue-steps", type=int, default=12, help="iterations per issue row (roots from step 10)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.roots_child:
        return roots_child(args.roots_child, 96, 256)
    if args.compile_child:
        return compile_child(args.compile_child == "compiled")
    if args.issue_child:
        name, block, storage = args.issue_child.split(":")
        return issue_row_child(name, int(block), args.issue_steps, storage)
    from scalable_shampoo.background import ROOT_BATCHES

    sections = args.sections.split(",")
    monitor = CpuMonitor()
    out: dict[str, Any] = dict(machine=describe(torch.device("cpu"), args.threads), sections=sections)
    if "state" in sections:
        out["state"] = [state_memory(bs, bf16) for bs in (1024, 256) for bf16 in (False, True)]
        print("| block | root storage | statistics | roots | moments | CPU scratch | total state ÷ parameters |")
        for r in out["state"]:
            o = r["over_parameters"]
            moments = round(o["first_moment"] + o["grafting"], 2)
            print(f"| {r['block_size']} | {r['root_storage']} | {o['statistics']}× | {o['roots']}× | {moments}× | "
                  f"{o['scratch']}× | {r['total_over_parameters']}× |")
    if "issue" in sections:
        out["issue"] = issue_rows(args)
    if "roots" in sections:
        runs = {label: [child(["--roots-child", str(b)], args.threads) for _ in range(args.repeats)]
                for label, b in (("split", ROOT_BATCHES), ("one_batch", 1))}  # fmt: skip
        out["roots"] = dict(matrices=96, n=256, root_batches=ROOT_BATCHES, runs=runs,
                            peak_growth_mb={k: [r["peak_growth_mb"] for r in v] for k, v in runs.items()})  # fmt: skip
        for k, v in out["roots"]["peak_growth_mb"].items():
            print(f"roots, {k}: peak growth {v} MB (statistics {runs[k][0]['statistics_mb']} MB)")
    if "compile" in sections:
        out["compile"] = {k: child(["--compile-child", k], args.threads) for k in ("compiled", "eager")}
        for k, v in out["compile"].items():
            print(f"{k}: first step {v['first_step_s']} s, second {v['second_step_s']} s")
    out["load"] = monitor.stop()
    if Path(args.out).exists():  # sections not run this time stay as the earlier run wrote them
        old = json.loads(Path(args.out).read_text())
        kept = [k for k in ("state", "issue", "roots", "compile") if k in old and k not in sections]
        for k in kept:
            out[k] = old[k]
        if kept:
            out["kept_from_earlier_run"] = dict(sections=kept, machine=old.get("machine"), load=old.get("load"))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out} (load {out['load']})")


if __name__ == "__main__":
    main()
