"""Which rows each rank reads: a ``DistributedSampler`` equivalent that reshuffles per epoch and resumes.

Every rank draws the same permutation of the ``n`` training rows for epoch ``e`` from a generator
seeded with ``seed * 100_003 + e`` (the single-process loop's order), and rank ``r`` of ``W`` takes the
positions ``r, r + W, r + 2W, ...`` of each global batch:

    global batch b:   perm[b*B*W : (b+1)*B*W]          (B rows per rank, W ranks)
    rank r reads:     that slice[r::W]

so the union over ranks of one step is exactly the rows a single process with batch ``B*W`` would
read, and no row is read twice. A resumed run needs only the step (or the sample position within the
epoch), never a saved iterator.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

from ...errors import ConfigError


def epoch_permutation(n: int, seed: int, epoch: int) -> list[int]:
    """The order of rows ``0..n-1`` in epoch ``epoch`` (the same on every rank)."""
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=gen).tolist()


def shard_rows(rows: Sequence[int], rank: int, world_size: int) -> list[int]:
    """Rank ``rank``'s share of one global batch ``rows``: positions ``rank, rank + W, ...``."""
    return list(rows[rank::world_size])


class ShardedSampler(Sampler[int]):
    """``torch.utils.data.DistributedSampler`` with a resumable start position, for ``DataLoader`` users.

    Args:
        n: number of rows in the data set.
        rank / world_size: this process's rank and the number of ranks.
        seed: the shuffling seed (the same on every rank).
        shuffle: ``False`` reads rows in their stored order.
        drop_last: ``True`` drops the tail that does not fill every rank; ``False`` (the default, as in
            ``DistributedSampler``) pads it with rows from the epoch's start, so every rank yields the
            same number of rows (ranks that ran different numbers of steps would wait on each other).
        start: global sample position within the epoch to resume from (rows ``perm[:start]`` are skipped).
    """

    def __init__(
        self, n: int, rank: int, world_size: int, seed: int = 0, shuffle: bool = True, drop_last: bool = False,
        start: int = 0,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank must be in [0, world_size); got rank={rank}, world_size={world_size}.")
        if n < 1:
            raise ConfigError(f"ShardedSampler needs at least one row, got n={n}.")
        self.n, self.rank, self.world_size, self.seed = n, rank, world_size, seed
        self.shuffle, self.drop_last = shuffle, drop_last
        self.epoch = 0
        self.start = 0
        self.set_start(start)

    def set_epoch(self, epoch: int) -> None:
        """Use epoch ``epoch``'s order from now on (call it before each epoch, as with ``DistributedSampler``);
        the start position goes back to 0."""
        self.epoch, self.start = epoch, 0

    def set_start(self, start: int) -> None:
        """Resume within the current epoch after ``start`` rows (counted over all ranks) were consumed."""
        if not 0 <= start <= self.n:
            raise ConfigError(f"start must be in [0, {self.n}] (rows in the data set), got {start}.")
        self.start = start

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "start": self.start}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self.set_start(int(state["start"]))

    def _remaining(self) -> list[int]:
        order = epoch_permutation(self.n, self.seed, self.epoch) if self.shuffle else list(range(self.n))
        rest = order[self.start :]
        if self.drop_last:
            return rest[: len(rest) - len(rest) % self.world_size]
        short = -len(rest) % self.world_size
        pad = (order * math.ceil(short / self.n + 1))[:short] if short else []
        return rest + pad

    def __iter__(self) -> Iterator[int]:
        return iter(shard_rows(self._remaining(), self.rank, self.world_size))

    def __len__(self) -> int:
        return len(self._remaining()) // self.world_size
