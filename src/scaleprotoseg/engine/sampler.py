"""A resumable, endless stream of training samples.

Sample ``n`` of the stream (counting from 0 across epochs) is fixed by the seed alone: epoch ``e = n // N`` uses the
permutation ``randperm(N, seed + e)``, each rank taking every ``world_size``-th entry. Resuming therefore needs only
the number of samples consumed, and a run's order does not depend on the number of DataLoader workers.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Dataset, Sampler


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    return torch.randperm(n, generator=g)


class StreamSampler(Sampler[int]):
    """Yields keys ``epoch * N + index`` from position ``start`` of this rank's stream, forever."""

    def __init__(self, size: int, seed: int, start: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if size < world_size:
            raise ValueError(f"training set has {size} samples; need at least one per process ({world_size})")
        self.size, self.seed, self.start, self.rank, self.world = size, seed, start, rank, world_size
        self.per_rank = size // world_size  # equal shards so ranks stay in step (drop the remainder)

    def __iter__(self) -> Iterator[int]:
        n = self.start
        while True:
            epoch, pos = divmod(n, self.per_rank)
            perm = epoch_permutation(self.size, self.seed, epoch)[self.rank :: self.world][: self.per_rank]
            for i in perm[pos:].tolist():
                yield epoch * self.size + i
            n = (epoch + 1) * self.per_rank

    def __len__(self) -> int:  # pragma: no cover - endless
        return 2**62


class KeyedDataset(Dataset):
    """Decodes stream keys into (index, epoch) and asks the dataset for that sample with that epoch's randomness."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.size = len(dataset)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key: int):
        epoch, index = divmod(int(key), self.size)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        return self.dataset[index]
