"""Training batches from an in-memory :class:`rcfd.data.ImageDataset`.

:func:`batches` is the training iterator: each epoch's order and flips are a pure function
of ``(seed, epoch)``, so a run resumes from ``(epoch, position)`` alone and every rank of a
distributed run draws the same global batch, of which it takes its own share.
"""

from __future__ import annotations

import torch

from rcfd.core.seeds import derive_seed
from rcfd.data import ImageDataset, to_float


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch ``epoch``'s order and flips: a hash of ``(seed, epoch)``
    (:func:`rcfd.core.seeds.derive_seed`)."""
    return derive_seed(seed, epoch)


class Batches:
    """Endless (or ``num_epochs``-long) iterator of ``(x, y)``: ``x`` float ``[b, C, H, W]``
    in [-1, 1] on ``device``, ``y`` int64 ``[b]`` or ``None``. Epoch ``e`` visits the data in
    ``randperm`` order under :func:`epoch_seed` ``(seed, e)`` and flips position ``i``
    horizontally when a draw from the same stream says so; global batch ``p`` is positions
    ``p*B .. (p+1)*B`` and rank ``r`` of ``W`` takes the ``r``-th of its ``W`` equal shares.
    ``epoch``/``position`` (global batches done in this epoch) are the whole resumable
    state: :meth:`state_dict` after step ``k`` restarts at step ``k + 1`` exactly."""

    def __init__(self, dataset, batch_size, seed, *, flip=True, drop_last=True, device=None,
                 rank=0, world_size=1, epoch=0, position=0, num_epochs=None):
        n = len(dataset)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}")
        if batch_size % world_size:
            raise ValueError(f"batch_size={batch_size} (the global batch) must be divisible by world_size={world_size}")
        if drop_last and batch_size > n:
            raise ValueError(f"batch_size={batch_size} exceeds the {n} images with drop_last=True")
        self.seed, self.batch_size, self.flip, self.drop_last = int(seed), batch_size, flip, drop_last
        self.rank, self.world_size, self.num_epochs, self.num_samples = rank, world_size, num_epochs, n
        self.device = torch.device(device) if device is not None else dataset.images.device
        self._images = dataset.images.to(self.device)
        self._labels = None if dataset.labels is None else dataset.labels.to(self.device)
        self.epoch, self.position = int(epoch), int(position)
        self._cached_epoch, self._order, self._flips = None, None, None

    @property
    def batches_per_epoch(self) -> int:
        full, rest = divmod(self.num_samples, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def state_dict(self) -> dict:
        keys = ("seed", "epoch", "position", "batch_size", "world_size", "num_samples")
        return {k: getattr(self, k) for k in keys}

    def load_state_dict(self, state: dict) -> None:
        for k in ("seed", "batch_size", "world_size", "num_samples"):
            if state[k] != getattr(self, k):
                raise ValueError(f"cannot resume: checkpoint has {k}={state[k]}, this run has {getattr(self, k)}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def _prepare(self) -> None:
        g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        order = torch.randperm(self.num_samples, generator=g)
        flips = torch.rand(self.num_samples, generator=g) < 0.5
        self._order, self._flips = order.to(self.device), flips.to(self.device)
        self._cached_epoch = self.epoch

    def __iter__(self):
        return self

    def __next__(self):
        epoch, position = (self.epoch + 1, 0) if self.position >= self.batches_per_epoch else (self.epoch, self.position)
        if self.num_epochs is not None and epoch >= self.num_epochs:
            raise StopIteration  # the state stays at the end of the last epoch
        self.epoch, self.position = epoch, position
        if self._cached_epoch != self.epoch:
            self._prepare()
        lo = self.position * self.batch_size  # this rank's share of global batch [lo, hi)
        per, extra = divmod(min(lo + self.batch_size, self.num_samples) - lo, self.world_size)
        start = lo + self.rank * per + min(self.rank, extra)
        stop = start + per + (self.rank < extra)
        idx = self._order[start:stop]
        x = self._images.index_select(0, idx)
        if self.flip:
            x = torch.where(self._flips[start:stop].view(-1, 1, 1, 1), x.flip(-1), x)
        y = None if self._labels is None else self._labels.index_select(0, idx)
        self.position += 1
        return to_float(x), y


def batches(dataset: ImageDataset, batch_size: int, generator, **kwargs) -> Batches:
    """:class:`Batches` over ``dataset``. ``generator``: an int seed or a ``torch.Generator``
    of which only ``initial_seed()`` is used, so that the stream is a function of
    ``(seed, epoch)`` and never of how far some shared generator has run. Keywords: ``flip``,
    ``drop_last``, ``device``, ``rank``, ``world_size``, ``epoch``, ``position``, ``num_epochs``."""
    seed = generator.initial_seed() if isinstance(generator, torch.Generator) else generator
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"generator must be a torch.Generator or a non-negative int seed, got {generator!r}")
    return Batches(dataset, batch_size, seed, **kwargs)
