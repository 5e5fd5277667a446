"""Evaluate a trained detector on the validation set of a config (single process or under horovodrun).

    python -m hvd_megdet.evaluate --config configs/demo_shapes.yaml model.weights=output/demo/checkpoints/model_0000600.pth
    horovodrun -np 8 -H localhost:8 python -m hvd_megdet.evaluate --config ... model.weights=CKPT

Writes `<output_dir>/eval/latest.json` and the detections, and prints the COCO table. The checkpoint's categories
say which COCO category each label is; a val file that numbers them otherwise is refused.
"""
from hvd_megdet import checkpoint, dist
from hvd_megdet.categories import differences, model_categories
from hvd_megdet.cli import command_parser, exit_on_user_error
from hvd_megdet.config import ConfigError, load_config
from hvd_megdet.data import build_val_loader, load_coco, val_dataset
from hvd_megdet.engine import evaluate
from hvd_megdet.inference import inference_model, start_inference
from hvd_megdet.logs import warn_once


def evaluate_checkpoint(cfg):
    """Evaluate `cfg.model.weights` on `cfg.data.val`; returns the bbox metrics on every rank. The checkpoint's
    categories say which category each label is; a val file that gives any of their ids another name, or
    lists other ids, is refused (ConfigError naming it and the differences)."""
    if not cfg.data.val.annotations:
        raise ConfigError("evaluate needs data.val.annotations")
    device = start_inference(cfg, "evaluate")
    categories = model_categories(cfg, warn_once)
    val_set = val_dataset(cfg)
    differ = differences(categories, val_set.categories)
    if differ:
        raise ConfigError(f"{cfg.data.val.annotations}: its categories differ from those of the checkpoint "
                          f"{cfg.model.weights} (this file's name vs the checkpoint's): {differ}")
    label_to_cat_id = [-1] + [c["id"] for c in categories]
    model = inference_model(cfg, len(label_to_cat_id), device)  # K categories + background
    loader = build_val_loader(val_set, dist.rank(), dist.size(), cfg.data.num_workers)
    coco_gt = load_coco(cfg.data.val.annotations) if dist.is_main() else None
    iteration = int(checkpoint.load(cfg.model.weights).get("iteration", 0))
    metrics = evaluate(model, loader, coco_gt, label_to_cat_id, device, cfg.output_dir, iteration, cfg.amp)
    if dist.is_main():
        print(" ".join(f"{k} {v:.1f}" for k, v in metrics.items()))
    return metrics


def parse_args(argv=None):
    parser = command_parser(__doc__, config_help="YAML config file (the one the model was trained with)",
                            overrides_example="model.weights=CKPT")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    with exit_on_user_error():
        evaluate_checkpoint(load_config(args.config, args.overrides))


if __name__ == "__main__":
    main()
