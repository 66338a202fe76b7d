"""The distributed run, read in one place: which rank this process is (torchrun / accelerate set RANK, LOCAL_RANK
and WORLD_SIZE; one process without them), the barrier every rank waits at, and how a pass's rows are shared."""
from __future__ import annotations

import os

import numpy as np


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Only rank 0 writes artifacts under torchrun / accelerate."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (a no-op in one process). Joins the process group when no Trainer has (stage=embed /
    predict)."""
    if world_size() == 1:
        return
    import torch

    if not torch.distributed.is_initialized():
        on = torch.device("cuda", local_rank()) if torch.cuda.is_available() else None
        if on is not None:
            torch.cuda.set_device(on)
        torch.distributed.init_process_group(backend="nccl" if on is not None else "gloo")
    torch.distributed.barrier()


def shard_rows(lengths: list[int], world_size: int) -> list[np.ndarray]:
    """Row indices per rank: longest rows first, each to the rank with the fewest tokens so far, so every rank
    gets about the same work (and similar lengths batch well). Deterministic: every rank computes the same split."""
    load = [0] * world_size
    shares: list[list[int]] = [[] for _ in range(world_size)]
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        shares[r].append(i)
        load[r] += lengths[i]
    return [np.asarray(sorted(share), dtype=np.int64) for share in shares]
