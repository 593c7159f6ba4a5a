"""torchrun / DistributedDataParallel helpers.

A run started by ``torchrun --nproc_per_node=N`` finds ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` in its environment; :func:`init_distributed` joins the process group (NCCL on
CUDA, gloo on the CPU) and returns a :class:`DistInfo`. Without those variables (or with
``WORLD_SIZE=1``) everything here is a no-op on a single process, so the same code runs
either way. Rank 0 is the "main" process: it alone writes logs, images and checkpoints.

Evaluation is sharded by :func:`rcfd.samplers.shard_samples` (each rank makes a contiguous
block of the images; an image's noise depends on its index alone, so the union is the same
set whatever the world size) and collected with :func:`gather_cat` (rank order, unequal block
sizes allowed).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as tdist


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job: ``rank`` of ``world_size`` (``local_rank`` on
    its machine); ``backend`` is ``None`` when no process group is used."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = DistInfo()


def env_info() -> DistInfo:
    """The job layout torchrun put in the environment (single process when absent)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as e:
        raise ValueError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers: {e}") from None
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"need 0 <= RANK < WORLD_SIZE, got RANK={rank}, WORLD_SIZE={world}")
    return DistInfo(rank=rank, world_size=world, local_rank=local)


def resolve_device(device: str | torch.device = "auto", info: DistInfo = SINGLE) -> torch.device:
    """``"auto"``: ``cuda:<local_rank>`` when CUDA is available, else the CPU. An explicit
    ``"cuda"`` on a multi-process job also means this process's ``cuda:<local_rank>``."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' was requested but CUDA is not available; "
                               "use device='cpu' (or 'auto')")
        return torch.device("cuda", info.local_rank % torch.cuda.device_count())
    return torch.device(device)


def init_distributed(device: str | torch.device = "auto") -> DistInfo:
    """Join the torchrun process group when ``WORLD_SIZE > 1``: NCCL when ``device``
    resolves to CUDA (and select ``cuda:<local_rank>``), gloo on the CPU. Idempotent."""
    info = env_info()
    if not info.enabled:
        return info
    dev = resolve_device(device, info)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not tdist.is_initialized():
        tdist.init_process_group(backend=backend, rank=info.rank, world_size=info.world_size)
    return DistInfo(info.rank, info.world_size, info.local_rank, tdist.get_backend())


def cleanup() -> None:
    """Leave the process group (no-op when none was joined) once every rank got here: call
    it on all ranks at the end of a job, not on an error path (a dead peer would keep the
    barrier waiting; torchrun stops the others then). A process that exits still in a gloo
    group can abort while its communication threads are torn down."""
    if tdist.is_available() and tdist.is_initialized():
        if tdist.get_world_size() > 1:
            tdist.barrier()
        tdist.destroy_process_group()


def _active() -> bool:
    return tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1


def is_main() -> bool:
    """True on rank 0 (and on a single process)."""
    return not _active() or tdist.get_rank() == 0


def barrier() -> None:
    if _active():
        tdist.barrier()


def all_reduce_mean(values: Mapping[str, torch.Tensor | float] | torch.Tensor,
                    device: torch.device | str | None = None):
    """Mean over ranks of a tensor, or of a dict of 0-dim tensors/floats: for a dict, one
    collective for all entries and ONE device-to-host copy, returning floats (also on a
    single process, where the values are only converted)."""
    if isinstance(values, torch.Tensor):
        if not _active():
            return values
        out = values.detach().clone()
        tdist.all_reduce(out)
        return out / tdist.get_world_size()
    keys = list(values)
    if not keys:
        return {}
    if _active():
        dev = torch.device("cuda", torch.cuda.current_device()) if (
            tdist.get_backend() == "nccl") else torch.device("cpu")
    else:
        dev = next((v.device for v in values.values() if isinstance(v, torch.Tensor)),
                   torch.device("cpu"))
    flat = torch.stack([torch.as_tensor(values[k]).detach().to(dev, torch.float64)
                        for k in keys])
    if _active():
        tdist.all_reduce(flat)
        flat = flat / tdist.get_world_size()
    return dict(zip(keys, flat.tolist()))


def gather_objects(obj, info: DistInfo = SINGLE) -> list:
    """Every rank's picklable ``obj`` in rank order (``[obj]`` on a single process)."""
    if not (info.enabled and _active()):
        return [obj]
    out = [None] * info.world_size
    tdist.all_gather_object(out, obj)
    return out


def gather_cat(local: torch.Tensor, info: DistInfo = SINGLE, dst: int | None = None):
    """Concatenate every rank's ``local`` (equal trailing shapes, any leading size) along
    dim 0 in rank order. ``dst=None``: every rank gets the result; ``dst=r``: rank ``r``
    gets it and the others ``None``. Single process: ``local`` itself."""
    if not (info.enabled and _active()):
        return local
    backend = tdist.get_backend()
    work = local if backend != "nccl" else local.cuda()
    sizes = [torch.zeros(1, dtype=torch.int64, device=work.device) for _ in range(info.world_size)]
    tdist.all_gather(sizes, torch.tensor([work.shape[0]], device=work.device))
    sizes = [int(s) for s in sizes]
    biggest = max(sizes)
    pad = work.new_zeros((biggest - work.shape[0], *work.shape[1:]))
    padded = torch.cat([work, pad]) if pad.shape[0] else work.contiguous()
    parts = [torch.empty_like(padded) for _ in range(info.world_size)]
    tdist.all_gather(parts, padded)
    if dst is not None and info.rank != dst:
        return None
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]).to(local.device)
