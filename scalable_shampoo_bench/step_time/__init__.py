"""Shampoo's optimizer-step time against AdamW, the cost of one root, and the FLOP bound.

Models (``--models``; ``--quick`` shrinks every one to tiny sizes):

- ``linear4``: 4 × ``nn.Linear(1024, 1024)``;
- ``chargpt``: ``CharGPT(vocab=65, ctx=128, d=128, layers=4, heads=4)`` from ``scalable_shampoo_bench/models.py``;
- ``transformer``: ``nn.TransformerEncoder``, d=512, 4 layers, 8 heads, feed-forward 2048;
- ``resnet``: ``ResNet()`` from ``scalable_shampoo_bench/models.py`` (widths 16, 32, 64; 1×28×28 images);
- ``cnn``: a ResNet for 3×32×32 images (CIFAR-sized): widths 32, 64, 128, two BasicBlocks
  each, 0.69M parameters, almost all of them in 3×3 conv kernels;
- ``embedding``: ``nn.Embedding(100_000, 64)``, the mean over each bag, then an MLP 64-256-1
  (the table's 100k axis is above ``max_preconditioner_dim``: it is preconditioned on its
  64-axis only, as one block).

Five measurements, all in one run and on one machine, written to one JSON file:

1. **Step time** (``step_time``): the optimizer step alone, on fixed random
   gradients (``p.grad`` is set once from a seeded generator and re-used), for
   Shampoo and ``torch.optim.AdamW(foreach=True)`` on two copies of the same model,
   per model × ``--block-sizes`` (256, 1024) × ``--frequencies`` (10, 100).
   The two are interleaved in chunks (A B B A A B …) over ``--periods`` full
   ``precondition_frequency`` periods, so root recomputation is inside the window
   exactly ``--periods`` times. Median, mean (amortized) and max step; the max is
   the root spike. Each record has the number of preconditioned blocks.
2. **End to end** (``end_to_end``): forward + backward + step of each model on a
   fixed batch of its own, Shampoo against AdamW, interleaved the same way:
   linear4 512 random rows and transformer 8 × 64 random tokens (MSE to random
   targets), chargpt 32 × 128 token ids (next-token cross-entropy), resnet 128
   images (cross-entropy), embedding 256 bags of 16 row ids (BCE with logits).
3. **Roots** (``roots``): one inverse 4th root by eigh and by coupled Newton at
   several sizes, through ``inverse_root`` (which adds λ_max, the residual check
   and retries) and through the raw ``eigh_inverse_root`` /
   ``coupled_newton_inverse_root``; median of repeats, methods interleaved.
4. **FLOP bound** (``flop_bound``): the matmul FLOPs of one step's statistics
   (``G Gᵀ``, ``Gᵀ G``) and preconditioning (``L^(-1/p) G R^(-1/p)``), divided by
   the GEMM rate measured in the same run (a 1024×1024 fp32 matmul), per step_time record.
5. **Batched against plain** (``batched``, with ``--batched-compare``): per model and
   block size, the Shampoo step alone with ``batched=True`` (equal blocks stacked,
   batched matmuls) against ``batched=False`` (the per-block loop), interleaved, over
   ``--batched-steps`` steps with no root recomputation inside the window; the ratio
   plain/batched and the number of preconditioned blocks (``plan.blocks`` with axes,
   over the parameters). ``batched_summary`` names the record with the most blocks
   and whether plain/batched reaches the goal of 3× there.

The thread count is set explicitly (``--threads``) and recorded, with the torch
version, the device, and the CPU time that other processes used during each
measurement (from ``/proc/stat`` deltas minus this process's own CPU time; null
where ``/proc/stat`` does not exist): a busy second core slows small ops many times over.

Run ``python -m scalable_shampoo_bench.step_time --help``; ``--quick`` is a smoke test of a few seconds.
The whole benchmark, every model, with the batched comparison::

    python -m scalable_shampoo_bench.step_time --threads 1 --batched-compare --out step_time.json

The modules, one job each: ``models`` (the models, their sizes and end-to-end batches),
``opts`` (the optimizers as measured, and their block and root counts), ``timing``
(interleaving, summaries, the load during a measurement, from ``..machine``), ``steps``
(1 and 2), ``roots`` (3), ``flops`` (4), ``batched`` (5, and the ``compile`` section),
``profiling`` (``--profile``), ``report`` (the printed tables) and ``main`` (the flags,
the sections, the JSON file).
"""

from __future__ import annotations

from .main import main
from .models import MODELS

__all__ = ["MODELS", "main"]
