"""Param groups from a model, and the table of what Shampoo chose for each parameter.

:func:`param_groups_for` puts every ``nn.Embedding`` / ``nn.EmbeddingBag`` table in a
group of its own with ``precondition_axes=(-1,)``: the d side keeps a d×d statistic
and the vocabulary axis is left to the grafted diagonal (the paper's treatment of
embedding layers). A vocabulary statistic costs V² entries and a V³ root for rows
that are each looked up a few times a batch: on the ctr task (943×32 and 1682×32
tables) it made the statistics 19× the model.

:func:`plan_table` (``Shampoo.plan_table``) answers "why is my step slow?": per
parameter, the merged shape, the blocks, the dims each preconditioned axis is made
of, the statistic sizes, and what they cost.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

if TYPE_CHECKING:
    from .optimizer import Shampoo

__all__ = ["PlanTable", "param_groups_for", "plan_table"]

EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)


def param_groups_for(
    model: nn.Module, *, embedding_axes: Sequence[int] | None = (-1,), **options: Any
) -> list[dict[str, Any]]:
    """Param groups for ``Shampoo(param_groups_for(model), lr=…)``.

    Args:
        model: every parameter that requires a gradient goes into one group, each once
            (a weight shared by an embedding and a Linear goes with the embedding).
        embedding_axes: ``precondition_axes`` of the embedding tables' group; ``(-1,)``
            preconditions the d side only; ``None`` preconditions both sides.
        options: any other Shampoo setting, for both groups (e.g. ``weight_decay=0``).

    Returns the groups that are not empty: the other parameters first, then the tables.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if embedding_axes is not None:
        ok = isinstance(embedding_axes, (tuple, list)) and all(
            isinstance(a, int) and not isinstance(a, bool) and -2 <= a < 2 for a in embedding_axes
        )
        if not ok:
            raise ValueError(
                f"embedding_axes must be None or a sequence of dims of a table (0, 1, -1 or -2), got {embedding_axes!r}"
            )
    tables = {id(m.weight) for m in model.modules() if isinstance(m, EMBEDDINGS)}
    rest: list[Tensor] = []
    embeddings: list[Tensor] = []
    for _, p in model.named_parameters():  # each shared parameter once
        if p.requires_grad:
            (embeddings if id(p) in tables else rest).append(p)
    groups = []
    if rest:
        groups.append(dict(params=rest, **options))
    if embeddings:
        axes = None if embedding_axes is None else tuple(embedding_axes)
        groups.append(dict(params=embeddings, **{**options, "precondition_axes": axes}))
    return groups


@dataclass
class PlanTable:
    """One row per parameter (``rows``, dicts); ``str()`` is a Markdown table with totals."""

    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def totals(self) -> dict[str, int]:
        keys = ("numel", "statistics", "blocks", "root_flops")
        return {k: sum(r[k] for r in self.rows) for k in keys}

    def __str__(self) -> str:
        head = ["param", "shape", "merged", "blocks", "preconditioned (dims)", "statistics", "entries", "root n³"]
        sharded = any(r.get("ranks") for r in self.rows)
        head += ["computed by (rows)"] if sharded else []
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in self.rows:
            pre = ", ".join("·".join(map(str, dims)) for dims in r["preconditioned"]) or "none (grafting)"
            stats = " + ".join(f"{c}×{n}²" for n, c in r["statistic_sizes"]) or "–"
            cells = [r["name"], _shape(r["shape"]), _shape(r["merged"]), str(r["blocks"]), pre, stats,
                     f"{r['statistics']:,}", f"{r['root_flops']:.2g}"]  # fmt: skip
            if sharded:
                pieces = r["ranks"]
                cells.append(f"rank {pieces[0][0]}" if len(pieces) == 1 else
                             ", ".join(f"rank {k}: {lo}–{hi}" for k, lo, hi in pieces))  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
        t = self.totals
        ratio = t["statistics"] / max(t["numel"], 1)
        lines.append(
            f"\n{len(self.rows)} parameters, {t['numel']:,} entries; {t['blocks']} blocks; statistics "
            f"{t['statistics']:,} entries ({ratio:.2f}× the parameters); "
            f"a root recomputation ≈ {t['root_flops']:.2g} n³"
        )
        return "\n".join(lines)


def _shape(s: tuple[int, ...]) -> str:
    return "[" + ", ".join(map(str, s)) + "]"


def plan_table(opt: Shampoo, model: nn.Module | None = None) -> PlanTable:
    """The rows of :meth:`Shampoo.plan_table`. Each row: ``name`` (from ``model`` when given,
    else ``group.index``), ``shape``, ``merged``, ``groups`` (the dims of each merged axis),
    ``preconditioned`` (the dims of each axis that keeps a statistic in some block),
    ``blocks``, ``statistic_sizes`` ([(n, count)], largest first), ``statistics`` (Σ n²,
    entries), ``root_flops`` (Σ n³ per recomputation, the roots' cost up to a constant), ``numel``,
    and under sharding ``ranks``: who computes which rows (:meth:`Shampoo.rows`; FSDP2
    ``"local"``: each rank its own shard, the rows of this rank's), else None."""
    layout = opt.rows() if opt._sharding is not None else None
    names = {id(p): n for n, p in model.named_parameters()} if model is not None else {}
    table = PlanTable()
    index = -1
    for gi, group in enumerate(opt.param_groups):
        for pi, p in enumerate(group["params"]):
            index += 1
            plan = opt.plan(p, group)
            sizes = Counter(blk.shape[a] for blk in plan.blocks for a in blk.axes)
            axes = sorted({a for blk in plan.blocks for a in blk.axes})
            table.rows.append(dict(
                name=names.get(id(p), f"{gi}.{pi}"), shape=tuple(p.shape), merged=plan.merged,
                groups=plan.groups, preconditioned=[plan.groups[a] for a in axes], blocks=len(plan.blocks),
                statistic_sizes=sorted(sizes.items(), reverse=True),
                statistics=sum(c * n * n for n, c in sizes.items()),
                root_flops=sum(c * n**3 for n, c in sizes.items()), numel=p.numel(),
                ranks=layout[index] if layout is not None else None,
            ))  # fmt: skip
    return table
