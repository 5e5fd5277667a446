import itertools

import numpy as np
import pytest
import torch

from hvd_megdet.data import CocoDetection, build_train_loader, build_transforms, build_val_loader
from hvd_megdet.data.sampler import InferenceShard, TrainBatchSampler, epoch_length
from hvd_megdet.data.synthetic import make_dataset

# 13 images: 8 landscape (w / h >= 1), 5 portrait.
ASPECTS = np.array([1.5, 0.7, 1.0, 1.2, 0.5, 1.33, 0.8, 2.0, 1.1, 0.9, 1.4, 1.25, 0.6])


def take(sampler, n, start=0):
    return list(itertools.islice(sampler, start, start + n))


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_epoch_shards_are_disjoint_complete_and_reshuffled(world_size):
    samplers = [TrainBatchSampler(ASPECTS, 2, r, world_size, seed=5) for r in range(world_size)]
    epochs = []
    for epoch in range(3):
        shards = [s.shard(epoch) for s in samplers]
        assert sorted(np.concatenate(shards).tolist()) == list(range(len(ASPECTS)))
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
        epochs.append(np.concatenate(shards).tolist())
    assert epochs[0] != epochs[1] != epochs[2]


def test_batches_are_aspect_grouped_and_follow_the_shard_stream():
    sampler = TrainBatchSampler(ASPECTS, 3, rank=1, world_size=2, seed=0)
    batches = take(sampler, 40)
    landscape = ASPECTS >= 1
    for batch in batches:
        assert len(batch) == 3 and len({bool(landscape[i]) for i in batch}) == 1
    # Batches are the rank's stream (epoch 0, 1, ...) split by orientation, order kept within each group.
    stream = np.concatenate([sampler.shard(e) for e in range(30)])
    for group in (True, False):
        batched = [i for b in batches for i in b if landscape[i] == group]
        assert batched == [i for i in stream if landscape[i] == group][:len(batched)]


def test_stream_is_deterministic_and_depends_on_seed_and_rank():
    a = take(TrainBatchSampler(ASPECTS, 2, 0, 2, seed=3), 30)
    assert a == take(TrainBatchSampler(ASPECTS, 2, 0, 2, seed=3), 30)
    assert a != take(TrainBatchSampler(ASPECTS, 2, 0, 2, seed=4), 30)
    assert a != take(TrainBatchSampler(ASPECTS, 2, 1, 2, seed=3), 30)


@pytest.mark.parametrize("k", [0, 1, 7, 50])
def test_start_iter_continues_the_same_stream(k):
    full = TrainBatchSampler(ASPECTS, 2, 1, 3, seed=9)
    resumed = TrainBatchSampler(ASPECTS, 2, 1, 3, seed=9, start_iter=k)
    assert take(resumed, 20) == take(full, 20, start=k)


def test_dataset_smaller_than_a_global_batch_still_gives_full_batches():
    batches = take(TrainBatchSampler([1.0, 1.0, 1.0], 4, 0, 2, seed=0), 5)
    assert all(len(b) == 4 for b in batches)


@pytest.mark.parametrize("kwargs, match", [
    (dict(aspect_ratios=[1.0]), "at least one image per rank"),
    (dict(ims_per_gpu=0), "ims_per_gpu"),
    (dict(rank=2), "rank"),
    (dict(world_size=0), "world_size"),
    (dict(start_iter=-1), "start_iter"),
])
def test_bad_sampler_arguments(kwargs, match):
    args = dict(aspect_ratios=ASPECTS, ims_per_gpu=2, rank=0, world_size=2, seed=0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        TrainBatchSampler(**args)


@pytest.mark.parametrize("num_items", range(0, 10))
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_inference_shards_cover_exactly_once(num_items, world_size):
    shards = [InferenceShard(num_items, r, world_size) for r in range(world_size)]
    assert [i for s in shards for i in s] == list(range(num_items))
    assert [len(s) for s in shards] == [len(list(s)) for s in shards]
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_epoch_length():
    assert epoch_length(10, 4) == 3
    assert epoch_length(8, 4) == 2
    assert epoch_length(118287, 256) == 463


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_dataset(str(tmp_path_factory.mktemp("shapes")), num_train=12, num_val=5, seed=1)


def first_batches(loader, n):
    out = []
    for images, targets in itertools.islice(loader, n):
        out.append(([img.sum().item() for img in images], [t["image_id"] for t in targets],
                     [t["boxes"].tolist() for t in targets]))
    return out


def test_train_loader_resume_repeats_images_and_augmentation(shapes):
    ds = CocoDetection(*shapes["train"], transforms=build_transforms(True, (40, 48, 64), 100))
    full = first_batches(build_train_loader(ds, 2, 0, 2, seed=0, num_workers=0), 8)
    resumed = first_batches(build_train_loader(ds, 2, 0, 2, seed=0, num_workers=0, start_iter=5), 3)
    assert resumed == full[5:8]
    sizes = {tuple(img.shape) for images, _ in itertools.islice(build_train_loader(ds, 2, 0, 2, 0, 0), 8)
             for img in images}
    assert len(sizes) > 1  # multi-scale augmentation actually happens


def test_train_loader_is_independent_of_num_workers(shapes):
    ds = CocoDetection(*shapes["train"], transforms=build_transforms(True, (40, 48, 64), 100))
    inline = first_batches(build_train_loader(ds, 2, 1, 2, seed=3, num_workers=0), 4)
    workers = first_batches(build_train_loader(ds, 2, 1, 2, seed=3, num_workers=2), 4)
    assert workers == inline


def test_val_loaders_cover_every_image_once(shapes):
    ds = CocoDetection(*shapes["val"], transforms=build_transforms(False, (64,), 100), keep_empty=True)
    ids = []
    for rank in range(3):
        for images, targets in build_val_loader(ds, rank, 3, num_workers=0, batch_size=2):
            assert all(isinstance(img, torch.Tensor) for img in images)
            ids += [t["image_id"] for t in targets]
    assert ids == ds.image_ids.tolist()
