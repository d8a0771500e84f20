"""Repeated-augmentation sampler (Hoffer et al. 2020, Berman et al. 2019) as used by DeiT.

Each dataset index is repeated `num_repeats` times in a row after shuffling, and the list is dealt out to the
ranks in turn, so the copies of one image land on different ranks at the same step and are augmented
differently. An epoch still has about `len(dataset)` samples in all (DeiT's count), so it covers about
1 / `num_repeats` of the distinct images, each `num_repeats` times; `set_epoch` must be called every epoch, also
in a single-process run, for the rest to come up.
"""
import itertools
import math

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

BATCH_ROUNDING = 256  # DeiT rounds the per-epoch sample count down to a multiple of 256


def samples_per_replica(dataset_size: int, num_replicas: int) -> int:
    """Samples each rank yields per epoch: `dataset_size // 256 * 256 // num_replicas` (DeiT).

    That is 0 for datasets of fewer than 256 images, which would train on nothing; those fall back to
    `ceil(dataset_size / num_replicas)`.
    """
    official = dataset_size // BATCH_ROUNDING * BATCH_ROUNDING // num_replicas
    return official or math.ceil(dataset_size / num_replicas)


def _dist_default(value, getter, fallback: int) -> int:
    """`value` if given, else `getter()` in an initialized process group, else `fallback`."""
    if value is not None:
        return value
    return getter() if dist.is_available() and dist.is_initialized() else fallback


class RASampler(Sampler):
    """Repeated-augmentation sampler for one rank; call `set_epoch(epoch)` before each epoch to reshuffle.

    The order is a function of `seed + epoch` only, so every rank computes the same shuffled list and takes
    its strided share of it.
    """

    def __init__(self, dataset, num_replicas: int = None, rank: int = None, shuffle: bool = True,
                 num_repeats: int = 3, seed: int = 0):
        num_replicas = _dist_default(num_replicas, dist.get_world_size, 1)
        rank = _dist_default(rank, dist.get_rank, 0)
        if len(dataset) == 0:
            raise ValueError('RASampler got an empty dataset; fix: check --data-path')
        if num_repeats < 1:
            raise ValueError(f'num_repeats must be >= 1, got {num_repeats}')
        if not 0 <= rank < num_replicas:
            raise ValueError(f'rank {rank} is outside [0, {num_replicas - 1}] for num_replicas={num_replicas}')
        self.dataset = dataset
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.num_repeats = num_repeats
        self.seed = seed
        self.epoch = 0
        self.num_samples = math.ceil(len(dataset) * num_repeats / num_replicas)
        self.total_size = self.num_samples * num_replicas
        self.num_selected_samples = samples_per_replica(len(dataset), num_replicas)

    def set_epoch(self, epoch: int) -> None:
        """Use the order of `epoch` on the next iteration."""
        self.epoch = epoch

    def repeated_indices(self) -> list:
        """The whole list shared by all ranks: shuffled indices, each repeated in a row, padded by wrapping."""
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(len(self.dataset), generator=g)
        else:
            order = torch.arange(len(self.dataset))
        indices = torch.repeat_interleave(order, self.num_repeats).tolist()
        cycles = math.ceil(self.total_size / len(indices))
        return (indices * cycles)[:self.total_size]

    def __iter__(self):
        indices = self.repeated_indices()[self.rank:self.total_size:self.num_replicas]
        return iter(indices[:self.num_selected_samples])

    def __len__(self) -> int:
        return self.num_selected_samples


class ResumableSampler(Sampler):
    """Wraps a rank's sampler so that one epoch can start part-way, after a mid-epoch (preemption) checkpoint.

    `set_epoch(epoch, skip=n)` passes the epoch on to the wrapped sampler (whose order depends only on its seed
    and the epoch) and drops the first `n` indices of this rank's list in the next pass only; with
    `DataLoader(drop_last=True)` and `n = steps_done * batch_size`, the remaining batches are exactly those an
    uninterrupted epoch would still have produced. `set_epoch(epoch)` (skip 0) gives the whole epoch again.
    """

    def __init__(self, sampler):
        self.sampler = sampler
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        if skip < 0:
            raise ValueError(f'skip must be >= 0, got {skip}')
        if hasattr(self.sampler, 'set_epoch'):
            self.sampler.set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        return itertools.islice(iter(self.sampler), self.skip, None)

    def __len__(self) -> int:
        return max(len(self.sampler) - self.skip, 0)
