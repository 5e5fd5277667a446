"""Browse a dataset as the model sees it: images after the transforms, with their boxes and names drawn.

    python -m hvd_megdet.data.browse --config configs/demo_shapes.yaml [--split train|val] --output DIR [-n 16]

The counterpart of detectron2's tools/visualize_data.py and mmdetection's tools/analysis_tools/browse_dataset.py:
look before a long run, so that a wrong category mapping or a broken transform shows. `--split train` draws
the first n images of the training stream (the trainer's loader for rank 0 of a world of one: shuffled,
grouped by aspect ratio, each image with the resize and flip drawn for it); `--split val` the first n
validation images at the test size. Writes `DIR/<split>_<k>_<image id>.png` and prints how many boxes of
each category were drawn.
"""
import collections
import itertools
from pathlib import Path

from hvd_megdet.cli import command_parser, exit_on_user_error
from hvd_megdet.config import ConfigError, inference_min_size, load_config
from hvd_megdet.data import build_train_loader, build_val_loader, train_dataset, val_dataset
from hvd_megdet.visualize import TRUTH_COLOUR, draw_boxes, save_png


def browse(cfg, split, output, n=16):
    """Draw the first `n` images of `split` ("train" | "val") of `cfg` as transformed for the model into folder
    `output`; returns (images drawn, {category name: boxes drawn} with every category of the dataset)."""
    dataset = train_dataset(cfg) if split == "train" else val_dataset(cfg)
    if dataset is None:
        raise ConfigError("browse --split val needs data.val.annotations")
    if split == "train":
        loader = build_train_loader(dataset, cfg.solver.ims_per_gpu, 0, 1, cfg.seed, num_workers=0)
    else:
        loader = build_val_loader(dataset, 0, 1, num_workers=0)
    counts = collections.Counter(dict.fromkeys(dataset.class_names[1:], 0))
    pairs = (pair for images, targets in loader for pair in zip(images, targets))
    drawn = 0
    for image, target in itertools.islice(pairs, n):
        names = [dataset.class_names[label] for label in target["labels"].tolist()]
        counts.update(names)
        save_png(draw_boxes(image, target["boxes"], names, TRUTH_COLOUR),
                 Path(output) / f"{split}_{drawn:03d}_{target['image_id']}.png")
        drawn += 1
    return drawn, dict(counts)


def parse_args(argv=None):
    parser = command_parser(__doc__, overrides_example="input.min_size=400")
    parser.add_argument("--split", choices=("train", "val"), default="train")
    parser.add_argument("--output", required=True, help="folder for the drawings")
    parser.add_argument("-n", type=int, default=16, help="how many images (default 16)")
    args = parser.parse_intermixed_args(argv)
    if args.n < 1:
        parser.error(f"-n must be at least 1, got {args.n}")
    return args


def main(argv=None):
    args = parse_args(argv)
    with exit_on_user_error():
        cfg = load_config(args.config, args.overrides)
        drawn, counts = browse(cfg, args.split, args.output, args.n)
    inp = cfg.input
    sizes = inp.min_size if args.split == "train" else [inference_min_size(inp)]
    flip = f", flipped with p={inp.flip_prob:g}" if args.split == "train" else ""
    print(f"{drawn} {args.split} images as the model sees them (short side {' or '.join(map(str, sizes))}, long "
          f"side <= {inp.max_size}{flip}) in {args.output}/; boxes drawn: "
          + ", ".join(f"{name} {count}" for name, count in counts.items()))


if __name__ == "__main__":
    main()
