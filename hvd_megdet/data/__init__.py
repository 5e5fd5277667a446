"""Data: COCO-format datasets, box-aware transforms, samplers, and the train / val DataLoaders.

Ranks and world sizes are plain ints; nothing here talks to Horovod. `train_dataset(cfg)` and
`val_dataset(cfg)` build the datasets a config names.
"""
import functools
import multiprocessing
import os

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from hvd_megdet.config import inference_min_size
from hvd_megdet.process import exit_with

from .coco import CocoDetection, DatasetError, load_coco
from .sampler import InferenceShard, TrainBatchSampler, epoch_length
from .transforms import build_transforms, resize_scale

__all__ = ["CocoDetection", "DatasetError", "load_coco", "InferenceShard", "TrainBatchSampler", "epoch_length",
           "build_transforms", "resize_scale", "build_train_loader", "build_val_loader", "collate",
           "train_dataset", "val_dataset"]


def train_dataset(cfg):
    """The training set of config `cfg`, with the training transforms of `cfg.input`."""
    inp = cfg.input
    return CocoDetection(cfg.data.train.images, cfg.data.train.annotations,
                         transforms=build_transforms(True, inp.min_size, inp.max_size, inp.flip_prob),
                         keep_empty=cfg.data.keep_empty_train)


def val_dataset(cfg):
    """The validation set of `cfg` (every image, with or without annotations) at the test size, or None if
    it names no annotations."""
    if not cfg.data.val.annotations:
        return None
    return CocoDetection(cfg.data.val.images, cfg.data.val.annotations, keep_empty=True,
                         transforms=build_transforms(False, [inference_min_size(cfg.input)], cfg.input.max_size))


def collate(batch):
    """[(image, target), ...] -> ((image, ...), (target, ...)): detection images differ in size."""
    return tuple(zip(*batch))


def derive_seed(*values):
    """A 32-bit seed that is a pure function of the non-negative ints `values` (numpy's SeedSequence)."""
    return int(np.random.SeedSequence(values).generate_state(1)[0])


class _SeededBatches:
    """TrainBatchSampler's batches, each index paired with its augmentation seed, a pure function of
    (seed, rank, iteration, slot in the batch)."""

    def __init__(self, batches, seed, rank):
        self.batches, self.seed, self.rank = batches, seed, rank

    def __iter__(self):
        for iteration, batch in enumerate(self.batches, start=self.batches.start_iter):
            yield [(i, derive_seed(self.seed, self.rank, iteration, slot)) for slot, i in enumerate(batch)]


class _SeededDataset(Dataset):
    """dataset[(index, seed)]: dataset[index] with its transforms reseeded first, so the augmentation of an
    image depends on its place in the stream only, not on the worker that loads it or on a resume."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __getitem__(self, key):
        index, seed = key
        if self.dataset.transforms is not None:
            self.dataset.transforms.reseed(seed)
        return self.dataset[index]


def _loader_options(num_workers, seed, rank):
    options = {"num_workers": num_workers, "collate_fn": collate, "pin_memory": torch.cuda.is_available(),
               # Seeds the workers' global torch/numpy/random generators (base seed + worker id).
               "generator": torch.Generator().manual_seed(derive_seed(seed, rank))}
    if num_workers > 0:
        options["persistent_workers"] = True
        # Workers end with this process, however it ends (SIGTERM, SIGKILL, a lost peer, the stall limit).
        options["worker_init_fn"] = functools.partial(exit_with, os.getpid())
        # As Horovod's examples do: forkserver instead of fork, because the communication libraries'
        # threads and network handles in the parent are not fork-safe. The server imports this package
        # once, so workers fork with torch, cv2 and albumentations already loaded.
        if "forkserver" in multiprocessing.get_all_start_methods():
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload([__name__])
            options["multiprocessing_context"] = context
    return options


def build_train_loader(dataset, ims_per_gpu, rank, world_size, seed, num_workers, start_iter=0):
    """Infinite DataLoader of this rank's training batches ((images, ...), (targets, ...)), batch k being
    iteration start_iter + k of the TrainBatchSampler stream. The dataset's transforms (from
    build_transforms, or None) are reseeded per image from (seed, rank, iteration, slot), so batches are
    identical whatever num_workers, and a resumed run (start_iter = iteration reached) sees the same
    images with the same augmentation as the run it continues. Iterate it once (each iter() restarts)."""
    batches = TrainBatchSampler(dataset.aspect_ratios, ims_per_gpu, rank, world_size, seed, start_iter)
    return DataLoader(_SeededDataset(dataset), batch_sampler=_SeededBatches(batches, seed, rank),
                      **_loader_options(num_workers, seed, rank))


def build_val_loader(dataset, rank, world_size, num_workers, batch_size=1):
    """DataLoader over this rank's exact InferenceShard of `dataset`, in order (some ranks may get none)."""
    return DataLoader(dataset, batch_size=batch_size, sampler=InferenceShard(len(dataset), rank, world_size),
                      **_loader_options(num_workers, 0, rank))
