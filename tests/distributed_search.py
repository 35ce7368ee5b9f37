"""Run by tests/test_distributed.py under `torchrun --nproc-per-node 2`: a data-parallel search of a
tiny model (gloo), and on rank 0 the single-process search of the same model in the same
environment; both plans are saved (as adapter folders) for the test to compare.

    torchrun --standalone --nproc-per-node 2 tests/distributed_search.py OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from moefy import distributed
from moefy.conversion import search
from tests.analysis_fixtures import loaded_tiny, random_batches, tiny_settings


def main(out: Path) -> None:
    distributed.init(torch.device("cpu"))
    config, _ = tiny_settings(sequential=True)
    batches = random_batches(40, 48)  # 5 chunks of 8 sequences: shares of 3 and 2
    dp = distributed.DataParallel()
    assert dp.world == 2 and len(dp.shard(batches)) == (3, 2)[dp.rank]
    parallel = search(loaded_tiny("llama"), batches, config, parallel=dp)
    if distributed.is_main():
        parallel.save(out / "parallel")
        search(loaded_tiny("llama"), batches, config).save(out / "single")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
