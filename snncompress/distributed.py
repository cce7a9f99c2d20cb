"""Multi-process training under torchrun (DistributedDataParallel): all the glue in one place.

torchrun starts one process per device and describes the job in the environment (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``). Without it (or with a world of
one) no process group is ever created and every function here is a no-op, so single-process runs
are exactly what they were. Collectives on CPU tensors (pruning statistics, metrics, mask hashes)
go through gloo; a CUDA model's gradients through NCCL.

The pruning algorithms never import this module: the training stage hands them
:func:`sum_across_ranks` as the ``reduce`` of :meth:`~snncompress.prune.pruner.Pruner.end_epoch`.
"""

from __future__ import annotations

import hashlib
import os
import sys
from contextlib import contextmanager
from datetime import timedelta
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from .errors import SnnCompressError, first_line

# a rank that fails or stalls must not leave the others waiting forever in a collective; torchrun
# also stops every worker as soon as one exits with an error
TIMEOUT = timedelta(minutes=30)


def env_world_size() -> int:
    """The world size torchrun announced (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Rank 0: the only process that writes artifacts and shows progress."""
    return rank() == 0


@contextmanager
def session() -> Iterator[bool]:
    """Join the torchrun job of the environment for the block; yield whether it is distributed.

    Re-entrant: inside an active session (or outside torchrun) it does nothing, so ``train`` can
    open one for library callers while ``run`` keeps one group across its training stages.
    """
    if (dist.is_available() and dist.is_initialized()) or env_world_size() <= 1:
        yield is_distributed()
        return
    _init()
    ok = False
    try:
        yield True
        ok = True
    finally:
        shutdown(wait=ok)


def _init() -> None:
    if not dist.is_available():
        raise SnnCompressError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    cuda = torch.cuda.is_available()
    if cuda and local_rank() < torch.cuda.device_count():  # NCCL wants each process on its own GPU
        torch.cuda.set_device(local_rank())
    try:
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", timeout=TIMEOUT)
    except (RuntimeError, ValueError) as e:
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        why = first_line(e, typed=False)
        raise SnnCompressError(f"rank {os.environ.get('RANK', '?')} of {env_world_size()} could not join the "
                               f"torchrun job at {where}: {why}") from e


def shutdown(wait: bool = True) -> None:
    """Leave the job (idempotent): wait for every rank, then destroy the process group.

    ``wait=False`` after an error: the other ranks may be in a collective this one never joins;
    this process exits and torchrun stops them.
    """
    if dist.is_available() and dist.is_initialized():
        try:
            if wait and is_distributed():
                dist.barrier()
        finally:
            dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def process_device(device: torch.device) -> torch.device:
    """Under torchrun, a CUDA run puts each process on the GPU of its ``LOCAL_RANK``."""
    if not is_distributed() or device.type != "cuda":
        return device
    if local_rank() >= torch.cuda.device_count():
        raise SnnCompressError(f"LOCAL_RANK {local_rank()} but {torch.cuda.device_count()} GPU(s) visible: start at "
                               "most one process per GPU (--nproc_per_node), or set train.device: cpu")
    return torch.device("cuda", local_rank())


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in DistributedDataParallel (rank 0's weights and buffers are broadcast to all).

    The channel gates are parameters outside the optimiser that still require grad: DDP averages
    their gradients with the rest, so every rank reads the same ``|dL/dgate|`` (the gradient of
    the global batch's loss) and the regrowth signal needs no reduction of its own. Every
    parameter, gates included, takes part in every forward, so ``find_unused_parameters`` stays off.
    """
    if not is_distributed():
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def rank_seed(seed: int, epoch: int) -> int:
    """A seed of its own for each (rank, epoch): Poisson spikes and augmentation differ across ranks,
    and a resumed epoch draws exactly what the uninterrupted one drew."""
    return int(np.random.SeedSequence([seed, rank(), epoch]).generate_state(1)[0])


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over all ranks, in place; returns it (unchanged in one process)."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def sum_numbers(*values: float) -> tuple[float, ...]:
    """Per-rank numbers (loss sums, counts) summed over all ranks; returned as given in one process."""
    if not is_distributed():
        return values
    return tuple(all_reduce_sum(torch.tensor(values, dtype=torch.float64)).tolist())


def broadcast_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics drift apart by one local batch
    between DDP's syncs): evaluation and the checkpoint then see the same model everywhere."""
    if is_distributed():
        for b in model.buffers():
            dist.broadcast(b, 0)


def sum_across_ranks(tensors: list[torch.Tensor]) -> None:
    """Make every rank hold the sums over all ranks of ``tensors`` (in place; nothing in one process)."""
    if not is_distributed() or not tensors:
        return
    # one collective; counts kept as float64 are exact up to 2**53
    flat = all_reduce_sum(torch.cat([t.flatten().double() for t in tensors]))
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def gather_on_main(tensors: list[torch.Tensor]) -> None:
    """Move the statistics of all ranks onto rank 0 and zero them elsewhere.

    The sum over ranks (what the next selection uses) is unchanged, and rank 0 alone holds what a
    checkpoint must keep: a resume gives rank 0 the saved sums and the other ranks zeros, exactly
    the state of an uninterrupted run at that point.
    """
    if not is_distributed():
        return
    sum_across_ranks(tensors)
    if rank() != 0:
        for t in tensors:
            t.zero_()


def masks_sha256(masks: dict[str, torch.Tensor]) -> str:
    """sha256 over the groups' names, sizes and keep-mask bits, in the masks' order."""
    h = hashlib.sha256()
    for name, m in masks.items():
        h.update(f"{name}:{m.numel()}:".encode())
        h.update(m.detach().cpu().bool().numpy().tobytes())
    return h.hexdigest()


def gather_text(text: str) -> list[str]:
    """``text`` of every rank, by rank (up to 64 bytes; a longer text travels as its sha256)."""
    raw = text.encode()
    raw = hashlib.sha256(raw).hexdigest().encode() if len(raw) > 64 else raw
    mine = torch.zeros(65, dtype=torch.uint8)  # fixed size for all_gather: length byte + text
    mine[0], mine[1:1 + len(raw)] = len(raw), torch.tensor(list(raw), dtype=torch.uint8)
    if not is_distributed():
        return [raw.decode()]
    out = [torch.empty_like(mine) for _ in range(world_size())]
    dist.all_gather(out, mine)
    return [bytes(t[1:1 + int(t[0])].tolist()).decode() for t in out]


def broadcast_text(text: str) -> str:
    """Rank 0's ``text`` on every rank (any length; plain bytes, nothing unpickled)."""
    if not is_distributed():
        return text
    raw = torch.tensor(list(text.encode()), dtype=torch.uint8)
    n = torch.tensor([raw.numel()], dtype=torch.long)
    dist.broadcast(n, 0)
    buf = raw if rank() == 0 else torch.empty(int(n), dtype=torch.uint8)
    dist.broadcast(buf, 0)
    return bytes(buf.tolist()).decode()


def check_agree(text: str, what: str, hint: str = "") -> None:
    """Raise the same :class:`SnnCompressError` on every rank unless all ranks hold the same ``text``."""
    texts = gather_text(text)
    differ = [r for r, t in enumerate(texts) if t != texts[0]]
    if differ:
        short = [t if len(t) <= 24 else t[:12] + "…" for t in texts]
        ranks = "; ".join(f"rank {r}: {short[r]}" for r in [0, *differ])
        raise SnnCompressError(f"{what} differs across ranks ({ranks}); stopped{'; ' + hint if hint else ''}")


def check_masks_agree(masks: dict[str, torch.Tensor], epoch: int) -> str:
    """The masks' sha256; under torchrun each rank logs it to stderr and all must hold the same masks."""
    digest = masks_sha256(masks)
    if is_distributed():
        # one write per line, so that the lines of the ranks never interleave
        sys.stderr.write(f"[rank {rank()}] epoch {epoch}: masks sha256 {digest}\n")
        sys.stderr.flush()
        check_agree(digest, f"the keep-masks (sha256) of the update at the end of epoch {epoch}",
                    "every rank must select from the same all-reduced statistics")
    return digest
