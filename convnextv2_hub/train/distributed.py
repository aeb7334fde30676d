"""The processes of a run: torchrun's environment, the process group (NCCL on GPUs, gloo on CPUs, with a
timeout, so a process left waiting for a dead or diverged peer stops instead of hanging), and the
collectives the trainer uses: a sum over processes, a barrier, rank 0's decisions and training state
sent to every process, and a check that every process holds the same weights."""
from __future__ import annotations

import datetime
import hashlib
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence

import torch
import torch.distributed as dist


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class RanksDifferError(RuntimeError):
    """The processes of one run hold different weights: continuing would train and evaluate a mix of
    models, and only rank 0's would be saved."""


def init_distributed(device: str = "auto", timeout_min: Optional[float] = None) -> DistEnv:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); NCCL on GPUs, gloo on CPUs; every
    collective fails after ``timeout_min`` minutes of waiting rather than hanging (None: torch's
    default, 10 minutes for NCCL, 30 for gloo)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        dev = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    else:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    owns = False
    if world > 1 and not dist.is_initialized():
        timeout = datetime.timedelta(minutes=timeout_min) if timeout_min is not None else None
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", timeout=timeout)
        owns = True
    return DistEnv(rank, world, local, dev, owns)


def shutdown(env: DistEnv) -> None:
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def all_sum(values: List[float], env: DistEnv) -> List[float]:
    """The element-wise sum of ``values`` over all processes (float64); ``values`` itself with one process."""
    if not env.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    return t.tolist()


def barrier(env: DistEnv) -> None:
    """Wait for every process (nothing to wait for with one)."""
    if env.distributed:
        dist.barrier()


def broadcast_object(obj: Any, env: DistEnv) -> Any:
    """Rank 0's ``obj`` (a small picklable value: a decision, a layout) on every process."""
    if not env.distributed:
        return obj
    box = [obj if env.is_main else None]
    dist.broadcast_object_list(box, src=0, device=env.device if env.device.type == "cuda" else None)
    return box[0]


@dataclass(frozen=True)
class _TensorSlot:
    """Where a tensor stood in a broadcast state: its position in the byte stream, shape and dtype."""

    index: int
    shape: tuple
    dtype: torch.dtype


# Tensors travel packed into byte buffers of about this size: few collectives for many small tensors,
# one extra buffer of this size in memory at a time.
_CHUNK_BYTES = 256 * 2**20


def broadcast_state(state: Any, env: DistEnv) -> Any:
    """Rank 0's ``state`` (nested dicts / lists / tuples of tensors and plain values, such as a training
    checkpoint) on every process; ``state`` is ignored on the others. The layout (keys, plain values,
    tensor shapes and dtypes) goes as one pickled object, the tensors as raw bytes in chunks, so any
    dtype crosses gloo and NCCL alike. The others receive their tensors on ``env.device`` (NCCL sends
    device memory), each its own copy; rank 0 gets ``state`` itself back."""
    if not env.distributed:
        return state
    tensors: List[torch.Tensor] = []
    layout = broadcast_object(_strip(state, tensors) if env.is_main else None, env)
    slots: List[_TensorSlot] = []
    _collect_slots(layout, slots)
    received: Dict[int, torch.Tensor] = {}
    for group in _chunks(slots):
        sizes = [_nbytes(sl) for sl in group]
        if env.is_main:
            buf = torch.cat([_as_bytes(tensors[sl.index]) for sl in group]).to(env.device)
        else:
            buf = torch.empty(sum(sizes), dtype=torch.uint8, device=env.device)
        dist.broadcast(buf, src=0)
        if not env.is_main:
            for sl, part in zip(group, torch.split(buf, sizes)):
                received[sl.index] = part.clone().view(sl.dtype).reshape(sl.shape)
        del buf
    return state if env.is_main else _fill(layout, received)


def _strip(x: Any, tensors: List[torch.Tensor]) -> Any:
    if torch.is_tensor(x):
        tensors.append(x)
        return _TensorSlot(len(tensors) - 1, tuple(x.shape), x.dtype)
    if isinstance(x, dict):
        return {k: _strip(v, tensors) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_strip(v, tensors) for v in x)
    return x


def _collect_slots(x: Any, out: List[_TensorSlot]) -> None:
    if isinstance(x, _TensorSlot):
        out.append(x)
    elif isinstance(x, dict):
        for v in x.values():
            _collect_slots(v, out)
    elif isinstance(x, (list, tuple)):
        for v in x:
            _collect_slots(v, out)


def _fill(x: Any, received: Dict[int, torch.Tensor]) -> Any:
    if isinstance(x, _TensorSlot):
        return received[x.index]
    if isinstance(x, dict):
        return {k: _fill(v, received) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_fill(v, received) for v in x)
    return x


def _nbytes(slot: _TensorSlot) -> int:
    n = 1
    for d in slot.shape:
        n *= d
    return n * torch.empty((), dtype=slot.dtype).element_size()


def _chunks(slots: Sequence[_TensorSlot]) -> Iterable[List[_TensorSlot]]:
    group: List[_TensorSlot] = []
    size = 0
    for sl in slots:
        if group and size + _nbytes(sl) > _CHUNK_BYTES:
            yield group
            group, size = [], 0
        group.append(sl)
        size += _nbytes(sl)
    if group:
        yield group


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's values as a flat uint8 tensor (on the CPU: a read of an mmap'ed checkpoint)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def fingerprint(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """Per tensor, the wrapping int64 sums of its elements' bit patterns and of their squares: exact and
    independent of summation order and thread count, so equal tensors give equal fingerprints on any
    process, and a one-bit change in any element changes them. (N, 2) int64, on the tensors' device."""
    rows = [torch.zeros(2, dtype=torch.int64)]  # an empty list still has a fingerprint
    for t in tensors:
        v = t.detach().contiguous().reshape(-1).view(_INT_OF_SIZE[t.element_size()]).long()
        rows.append(torch.stack([v.sum(), (v * v).sum()]))
    device = rows[-1].device
    return torch.stack([r.to(device) for r in rows])


def all_gather_tensor(t: torch.Tensor, env: DistEnv) -> List[torch.Tensor]:
    """Every process's ``t`` (the same shape on all), by rank; ``[t]`` with one process."""
    if not env.distributed:
        return [t]
    gathered = [torch.empty_like(t) for _ in range(env.world_size)]
    dist.all_gather(gathered, t.contiguous())
    return gathered


def digest(fp: torch.Tensor) -> str:
    """A short hex name of a fingerprint, for the log."""
    return hashlib.sha256(fp.cpu().numpy().tobytes()).hexdigest()[:16]
