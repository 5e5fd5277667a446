"""What a detector's labels stand for: the COCO categories of labels 1..K, as its checkpoint records them.

    categories = model_categories(cfg)                  # [{"id": 1, "name": "disc"}, ...] for labels 1, 2, ...
    label_to_cat_id = [-1] + [c["id"] for c in categories]
    differences(categories, dataset.categories)         # "" when an annotation file numbers them the same

Shared by the commands that run a trained model (evaluate, predict, export): the checkpoint, not an annotation
file, says which category each label is.
"""
from hvd_megdet.checkpoint import load as load_checkpoint
from hvd_megdet.config import ConfigError
from hvd_megdet.data import CocoDetection
from hvd_megdet.logs import warn


def model_categories(cfg, report=warn):
    """[{"id", "name"}, ...] of the model's labels 1..K: the checkpoint's, else (a checkpoint saved before they
    were, or a bare state dict) those of the config's annotation files, with a warning passed to `report`."""
    state = load_checkpoint(cfg.model.weights)
    if isinstance(state, dict) and state.get("categories"):
        return state["categories"]
    for split in (cfg.data.val, cfg.data.train):
        if split.annotations:
            report(f"{cfg.model.weights} holds no category names (saved before checkpoints had them): "
                   f"naming labels from {split.annotations}")
            return CocoDetection(split.images, split.annotations, keep_empty=True).categories
    raise ConfigError(f"{cfg.model.weights} holds no category names (saved before checkpoints had them) and "
                      "the config names no annotation file to take them from: set data.val.annotations")


def differences(model, other):
    """How category list `other` differs from the model's, `model` (both [{"id", "name"}]): "" when both give
    each id the same name, in any order; else "id I: <other's name> vs <model's name>" (a quoted name, or
    absent) for up to five ids."""
    ours, theirs = ({c["id"]: c["name"] for c in cats} for cats in (model, other))
    differing = sorted(i for i in ours.keys() | theirs.keys() if ours.get(i) != theirs.get(i))
    return ", ".join(f"id {i}: {_named(theirs, i)} vs {_named(ours, i)}" for i in differing[:5])


def _named(names, i):
    return repr(names[i]) if i in names else "absent"
