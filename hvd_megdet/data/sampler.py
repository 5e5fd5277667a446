"""Samplers: an infinite, sharded, aspect-ratio-grouped batch stream for training, exact shards for inference.

Ranks and world sizes are plain ints (no Horovod here). The training stream follows detectron2's
TrainingSampler + AspectRatioGroupedDataset: every rank draws the same permutation per epoch, takes a disjoint
shard of it, and groups its indices into batches of landscape or portrait images.
"""
import itertools
import math

import numpy as np


def _check_rank(rank, world_size):
    if not (isinstance(world_size, int) and world_size >= 1):
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if not (isinstance(rank, int) and 0 <= rank < world_size):
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")


def epoch_length(num_images, global_batch):
    """Iterations per epoch: ceil(num_images / global_batch)."""
    return math.ceil(num_images / global_batch)


class TrainBatchSampler:
    """Infinite iterable of batches (lists of `ims_per_gpu` dataset indices) for iteration-based training.

    Epoch e permutes all images with numpy's default_rng([seed, e]), the same on every rank; this rank takes
    perm[rank::world_size], so each epoch the ranks' shards are disjoint and together cover the dataset.
    The rank's index stream (epoch after epoch) is split by aspect ratio into landscape (w / h >= 1) and
    portrait images, and a batch is yielded whenever one group holds `ims_per_gpu` indices; a partial group
    carries over into the next epoch, so a dataset smaller than one global batch still yields full batches.
    The stream is a pure function of (aspect_ratios, ims_per_gpu, rank, world_size, seed): iteration starts
    at batch `start_iter` (skipped by index arithmetic alone, no image is read), so a resumed run continues
    the stream of the run it resumes. Each `iter()` restarts at `start_iter`.
    """

    def __init__(self, aspect_ratios, ims_per_gpu, rank, world_size, seed, start_iter=0):
        _check_rank(rank, world_size)
        aspect_ratios = np.asarray(aspect_ratios, dtype=np.float64)
        if aspect_ratios.ndim != 1 or len(aspect_ratios) < world_size:
            raise ValueError(f"need at least one image per rank: {aspect_ratios.size} images for "
                             f"{world_size} ranks")
        if not (isinstance(ims_per_gpu, int) and ims_per_gpu >= 1):
            raise ValueError(f"ims_per_gpu must be a positive int, got {ims_per_gpu!r}")
        if not (isinstance(start_iter, int) and start_iter >= 0):
            raise ValueError(f"start_iter must be a non-negative int, got {start_iter!r}")
        self.is_landscape = aspect_ratios >= 1
        self.ims_per_gpu = ims_per_gpu
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.start_iter = start_iter

    def shard(self, epoch):
        """int64 array: this rank's indices of `epoch`, in order."""
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.is_landscape))
        return perm[self.rank::self.world_size]

    def _batches(self):
        groups = {True: [], False: []}
        for epoch in itertools.count():
            for i in self.shard(epoch).tolist():
                group = groups[bool(self.is_landscape[i])]
                group.append(i)
                if len(group) == self.ims_per_gpu:
                    yield group.copy()
                    group.clear()

    def __iter__(self):
        return itertools.islice(self._batches(), self.start_iter, None)


class InferenceShard:
    """The contiguous indices [begin, end) of `num_items` that rank `rank` of `world_size` evaluates, like
    detectron2's InferenceSampler: exact shards, sizes differing by at most one, no padding or duplicates,
    so some ranks may get none. Iterable of ints with len(); usable as a DataLoader sampler."""

    def __init__(self, num_items, rank, world_size):
        _check_rank(rank, world_size)
        if not (isinstance(num_items, int) and num_items >= 0):
            raise ValueError(f"num_items must be a non-negative int, got {num_items!r}")
        size, extra = divmod(num_items, world_size)
        self.begin = rank * size + min(rank, extra)
        self.end = self.begin + size + (rank < extra)

    def __iter__(self):
        return iter(range(self.begin, self.end))

    def __len__(self):
        return self.end - self.begin
