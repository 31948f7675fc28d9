"""What the root fallback chain did on each numerical stress case (README's reliability table).

    python -m scalable_shampoo_bench.stress_report [--out FILE.json]

Writes ``scalable_shampoo_bench/results/stress_report.json`` unless ``--out`` says otherwise.

Runs the stress cases of tests/test_stress.py (a 16×8 weight, 12 steps, roots every
2 steps) with coupled Newton and with eigh, and counts, per case, the fallback
stages that produced the installed roots, the rejected roots, the skipped steps
and whether the parameters stayed finite.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import torch

from scalable_shampoo import Shampoo

CASES = {
    "rank-1 statistics": "rank1",
    "zero statistics": "zero",
    "statistics conditioned 1e12": "cond1e12",
    "gradients ~1e17 (just under the overflow bound)": "huge",
    "gradients ~1e30 (statistics would overflow)": "overflow",
    "gradients ~1e-30": "tiny",
    "alternating 1e17 / 1e-30": "alternating",
}


def gradient(kind: str, step: int, g: torch.Generator) -> torch.Tensor:
    u = torch.randn(16, 1, generator=torch.Generator().manual_seed(1))
    v = torch.randn(1, 8, generator=torch.Generator().manual_seed(2))
    noise = torch.randn(16, 8, generator=g)
    if kind == "rank1":
        return u @ v * (1 + 0.1 * step)
    if kind == "zero":
        return torch.zeros(16, 8)
    if kind == "cond1e12":
        q, _ = torch.linalg.qr(noise)
        r, _ = torch.linalg.qr(torch.randn(8, 8, generator=g))
        return q * torch.logspace(0, -6, 8) @ r
    scale = {"huge": 1e17, "overflow": 1e30, "tiny": 1e-30, "alternating": 1e17 if step % 2 else 1e-30}[kind]
    return scale * noise


def run(kind: str, method: str, relative: bool) -> dict:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 8, generator=g).requires_grad_()
    opt = Shampoo([w], lr=1e-2, precondition_frequency=2, start_preconditioning_step=2, root_method=method,
                  matrix_eps_relative=relative)  # fmt: skip
    for step in range(12):
        w.grad = gradient(kind, step, g)
        opt.step()
    d = opt.diagnostics()
    return dict(
        stages=dict(Counter(r["method"] for r in d["blocks"] if r["has_root"])),
        no_root=sum(not r["has_root"] for r in d["blocks"]),
        rejected=sum(r["rejected"] for r in d["blocks"]),
        skipped_steps=d["skipped_steps"],
        finite=bool(torch.isfinite(w).all()),
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "stress_report.json"))
    args = ap.parse_args(argv)
    rows = []
    print("| case | root method | ε | roots installed, by stage | blocks without root | rejected |"
          " skipped steps | finite |")
    print("|---|---|---|---|---|---|---|---|")
    for name, kind in CASES.items():
        for method in ("newton", "eigh"):
            for relative in (True, False):
                r = run(kind, method, relative)
                rows.append(dict(case=name, method=method, relative_eps=relative, **r))
                stages = ", ".join(f"{k} ×{v}" for k, v in r["stages"].items()) or "—"
                print(f"| {name} | {method} | {'relative' if relative else 'absolute'} | {stages} | {r['no_root']} |"
                      f" {r['rejected']} | {r['skipped_steps']} | {r['finite']} |")
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
