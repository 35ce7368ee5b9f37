"""Data-parallel calibration under torch.distributed (`torchrun`; gloo on CPU, NCCL on GPUs).

Each of the W processes runs every block on its contiguous share of the calibration batches (the
forward passes, the bulk of calibration, are split W ways). After a block, the mergeable
statistics are summed with `all_reduce` (`NeuronStats` holds sums and counts), and the FFN inputs
the block saw are gathered in batch order so that every process draws the same token sample with
the same reservoir as a single process would. Every process then plans the layer itself from the
same statistics and sample (the search is deterministic, so no plan is sent), converts its copy of
the block and runs its share of batches through it for the next block.

Equal to the single-process search but for float64 summation order in the statistics: the plans
agree to float32 rounding (`tests/test_distributed.py` checks rtol 1e-5 and equal permutations).
The sample gather holds, for one block at a time, the FFN inputs of all calibration tokens on
every process — what a single process holds in its hidden states.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor

from moefy.calibrate import NeuronStats
from moefy.text import TokenBatch


def launched() -> bool:
    """True under `torchrun` (or any launcher that sets WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: torch.device) -> None:
    """Join the process group torchrun describes (gloo on CPU, NCCL on CUDA), once."""
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def is_main() -> bool:
    """The process that writes outputs (rank 0, or the only process)."""
    return not dist.is_initialized() or dist.get_rank() == 0


class DataParallel:
    """This process's share of the calibration work and the merges after each block."""

    def __init__(self) -> None:
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        nccl = dist.get_backend() == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")

    def shard(self, batches: list[TokenBatch]) -> list[TokenBatch]:
        """A contiguous share of the batches (rank order = batch order)."""
        per, extra = divmod(len(batches), self.world)
        start = self.rank * per + min(self.rank, extra)
        return batches[start : start + per + (1 if self.rank < extra else 0)]

    def merge_stats(self, stats: NeuronStats) -> NeuronStats:
        """The statistics of every process's tokens (sums all-reduced)."""
        sums = [stats.total, stats.total_sq, stats.total_abs, stats.exact_zero, stats.near_zero, torch.tensor([float(stats.count)])]
        merged = []
        for t in sums:
            t = t.to(self.device, torch.float64)
            dist.all_reduce(t)
            merged.append(t.cpu())
        return NeuronStats(stats.d_ff, stats.eps, int(merged[-1].item()), *merged[:-1])

    def _all(self, value: int) -> list[int]:
        values = [torch.zeros(1, dtype=torch.long, device=self.device) for _ in range(self.world)]
        dist.all_gather(values, torch.tensor([value], device=self.device))
        return [int(v) for v in values]

    def gather(self, local: list[Tensor], d: int) -> list[Tensor]:
        """Every process's tensors (..., d) as (rows, d) float32 on the CPU, in rank order."""
        counts = self._all(len(local))
        by_rank: list[list[Tensor]] = [[] for _ in range(self.world)]
        for i in range(max(counts)):  # one collective round per tensor index
            mine = local[i].reshape(-1, d).float().to(self.device) if i < len(local) else torch.zeros(0, d, device=self.device)
            rows = self._all(mine.shape[0])
            padded = torch.cat([mine, mine.new_zeros(max(rows) - mine.shape[0], d)])
            parts = [torch.empty_like(padded) for _ in range(self.world)]
            dist.all_gather(parts, padded)
            for r in range(self.world):
                if i < counts[r]:
                    by_rank[r].append(parts[r][: rows[r]].cpu())
        return [t for tensors in by_rank for t in tensors]


__all__ = ["DataParallel", "init", "is_main", "launched"]
