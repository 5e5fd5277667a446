"""The grid: a grid file read into typed dataclasses (strict keys), and its expansion into runs.

The file's keys and the expansion rules are described for users in `hvd_megdet.experiments.ablation`. Nothing
here starts a process or needs Horovod: the runs depend only on the grid file, the base trainer config and the
number of training images (counted with the trainer's own dataset unless the grid gives `train_images`).
"""
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from hvd_megdet.config import ConfigError, load_config, merge
from hvd_megdet.data import DatasetError, epoch_length, train_dataset
from hvd_megdet.solver import scaled_lr

NORMS = ("frozen", "bn", "cgbn")
LR_SCALINGS = ("linear", "none")
OPTIMIZERS = ("sgd", "lars")
# Trainer keys each run sets from the grid's axes and epochs; the grid's `overrides` must not set them.
RUNNER_KEYS = ("solver.ims_per_gpu", "solver.backward_passes_per_step", "solver.max_iter", "solver.steps",
               "solver.warmup_iters", "solver.optimizer", "model.norm", "model.bn_group_size", "eval_period", "seed", "output_dir")


@dataclass
class Axes:
    title: str = ""
    batch: list[int] = field(default_factory=list)
    norm: list[str] = field(default_factory=lambda: ["cgbn"])
    warmup: list[bool] = field(default_factory=lambda: [True])
    bn_group_size: list[int] = field(default_factory=lambda: [0])
    lr_scaling: list[str] = field(default_factory=lambda: ["linear"])
    optimizer: list[str] = field(default_factory=lambda: ["sgd"])
    base_lr: list[float] = field(default_factory=list)  # [] = the base config's solver.base_lr
    warmup_epochs: list[float] = field(default_factory=list)  # [] = the grid's warmup_epochs
    seed: list[int] = field(default_factory=lambda: [0])
    ranks: int = 0  # 0 = batch / (grid ims_per_gpu x passes)
    backward_passes_per_step: int = 1


@dataclass
class Divergence:
    max_skipped: int = 0  # more non-finite (skipped) steps than this = diverged
    explode_factor: float = 10.0  # a loss above this x the early median = diverged


@dataclass
class Grid:
    base: str = ""
    out: str = "output/ablation"
    epochs: float = 1.0
    ims_per_gpu: int = 2
    warmup_epochs: float = 0.5
    steps_epochs: list[float] = field(default_factory=list)
    timeout: float = 3600.0
    launcher: list[str] = field(default_factory=list)  # [] = DEFAULT_LAUNCHER
    train_images: int = 0
    divergence: Divergence = field(default_factory=Divergence)
    overrides: dict = field(default_factory=dict)
    axes: list = field(default_factory=list)  # of Axes after load_grid


@dataclass
class Run:
    """One training of the grid; every field is part of its identity (a changed field means a new run)."""
    name: str
    setting: str  # the name without the seed: runs that differ only in their seed share it
    batch: int  # total images per optimizer step
    ranks: int
    ims_per_gpu: int  # per backward pass
    passes: int  # backward passes per step (gradient accumulation)
    norm: str  # frozen | bn | cgbn
    bn_group_size: int  # ranks per CGBN group (cgbn); 0 otherwise
    bn_images: int  # images the BN statistics cover; 0 for frozen
    warmup: bool
    warmup_epochs: float  # 0 without warmup
    warmup_iters: int
    optimizer: str  # sgd | lars
    lr_scaling: str  # linear | none
    lr: float  # the peak lr (linear scaling rule, or base_lr for lr_scaling none)
    seed: int
    epochs: float
    iters_per_epoch: int
    max_iter: int
    overrides: list[str]  # trainer key=value overrides (output_dir is added at launch)


def load_grid(path):
    """Parse and check a grid file; raise ConfigError naming the file and key."""
    where = f"grid file {path}"
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"{where}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: invalid YAML ({e.__class__.__name__})") from None
    if isinstance(data, dict) and isinstance(data.get("axes"), dict):
        data["axes"] = [data["axes"]]
    grid = Grid()
    merge(grid, data or {}, "", where)
    axes = []
    for i, block in enumerate(grid.axes):
        ax = Axes()
        merge(ax, block, f"axes[{i}].", where)
        axes.append(ax)
    grid.axes = axes
    if not grid.base:
        raise ConfigError(f"{where}: base (the trainer config) is required")
    if not axes or not all(ax.batch for ax in axes):
        raise ConfigError(f"{where}: axes needs at least one block with a non-empty batch list")
    if grid.epochs <= 0 or grid.ims_per_gpu <= 0 or grid.timeout <= 0 or grid.warmup_epochs < 0:
        raise ConfigError(f"{where}: epochs, ims_per_gpu and timeout must be positive, warmup_epochs >= 0")
    for i, ax in enumerate(axes):
        if ax.ranks < 0 or ax.backward_passes_per_step < 1:
            raise ConfigError(f"{where}: axes[{i}]: ranks must be >= 0 and backward_passes_per_step >= 1, got "
                              f"{ax.ranks} and {ax.backward_passes_per_step}")
        per_rank = ax.backward_passes_per_step * (1 if ax.ranks else grid.ims_per_gpu)
        for b in ax.batch:
            if b <= 0 or b % (per_rank * (ax.ranks or 1)):
                what = (f"{ax.ranks} ranks x {ax.backward_passes_per_step} passes" if ax.ranks
                        else f"ims_per_gpu {grid.ims_per_gpu} x {ax.backward_passes_per_step} passes")
                raise ConfigError(f"{where}: axes[{i}].batch {b} is not a positive multiple of {what}")
        for name, values, choices in (("norm", ax.norm, NORMS), ("lr_scaling", ax.lr_scaling, LR_SCALINGS),
                                      ("optimizer", ax.optimizer, OPTIMIZERS)):
            for value in values:
                if value not in choices:
                    raise ConfigError(f"{where}: axes[{i}].{name} must be among {', '.join(choices)}, "
                                      f"got {value!r}")
        if any(k < 0 for k in ax.bn_group_size) or any(seed < 0 for seed in ax.seed):
            raise ConfigError(f"{where}: axes[{i}].bn_group_size and seed must be >= 0, got "
                              f"{ax.bn_group_size} and {ax.seed}")
        if any(lr <= 0 for lr in ax.base_lr) or any(e <= 0 for e in ax.warmup_epochs):
            raise ConfigError(f"{where}: axes[{i}].base_lr and warmup_epochs must be positive, got "
                              f"{ax.base_lr} and {ax.warmup_epochs}")
    for key in grid.overrides:
        if key in RUNNER_KEYS:
            raise ConfigError(f"{where}: overrides.{key} is set by the grid itself (axes, epochs)")
    if grid.launcher and not any("{np}" in t for t in grid.launcher):
        raise ConfigError(f"{where}: launcher must contain \"{{np}}\" (the number of ranks), got {grid.launcher}")
    return grid


def override_args(mapping):
    """{'a.b': [1, 2]} -> ['a.b=[1, 2]']: JSON values, which the trainer's YAML override parser reads back."""
    return [f"{key}={json.dumps(value)}" for key, value in mapping.items()]


def count_train_images(cfg):
    """The number of training images the trainer will use (its own dataset class and filtering)."""
    try:
        return len(train_dataset(cfg))
    except DatasetError as e:
        raise DatasetError(f"{e} (counting the training images; train_images in the grid skips this)") from None


def layout(batch, ax, ims_per_gpu):
    """(ranks, images per rank and pass, passes) of total batch `batch` in axes block `ax`."""
    passes = ax.backward_passes_per_step
    if ax.ranks:
        return ax.ranks, batch // (ax.ranks * passes), passes
    return batch // (ims_per_gpu * passes), ims_per_gpu, passes


def _combos(ax, ims_per_gpu, base_batch):
    """(batch, norm, group size, warmup, lr scaling, optimizer, base lr or None, warmup epochs or None) of one
    axes block, CGBN sizes and lr scaling resolved; and skip notes."""
    combos, notes = [], []
    for batch, norm, warmup, scaling, optimizer, base_lr, warmup_epochs in itertools.product(
            ax.batch, ax.norm, ax.warmup, ax.lr_scaling, ax.optimizer, ax.base_lr or [None],
            ax.warmup_epochs if any(ax.warmup) and ax.warmup_epochs else [None]):
        scaling = "linear" if batch == base_batch else scaling  # unscaled at base_batch is the linear lr
        rest = (warmup, scaling, optimizer, base_lr, warmup_epochs if warmup else None)
        ranks = layout(batch, ax, ims_per_gpu)[0]
        if norm != "cgbn":
            combos.append((batch, norm, 0, *rest))
            continue
        for k in ax.bn_group_size:
            size = k or ranks
            if ranks % size:
                notes.append(f"batch {batch} cgbn bn_group_size {k}: {size} does not divide {ranks} ranks, skipped")
            elif size == 1:  # statistics of one rank: exactly per-rank BN
                combos.append((batch, "bn", 0, *rest))
            else:
                combos.append((batch, "cgbn", size, *rest))
    return combos, notes


def run_name(batch, ranks, ims, passes, norm, bn_images, warmup, scaling, optimizer="sgd", lr_tag="",
             warmup_tag=""):
    """The setting's name, e.g. b64_4x2x8_cgbn4_warmup (x passes only when more than 1), then _unscaled, _lars,
    and `lr_tag` / `warmup_tag` (e.g. "lr0.1", "5ep": what differs from the grid's defaults); runs add
    _s<seed>."""
    return (f"b{batch}_{ranks}x{ims}" + (f"x{passes}" if passes > 1 else "") + f"_{norm}{bn_images or ''}"
            + ("_warmup" + warmup_tag if warmup else "_nowarmup") + ("_unscaled" if scaling == "none" else "")
            + ("" if optimizer == "sgd" else f"_{optimizer}") + (f"_{lr_tag}" if lr_tag else ""))


def expand(grid, where="grid"):
    """The grid's runs, by seed and then in file order, duplicates merged, each validated as a trainer config;
    skip notes; and the blocks as [(title, [setting names in the block])], for plots that compare a block's
    settings.

    Raises ConfigError naming the run when a run's trainer config is invalid.
    """
    fixed = override_args(grid.overrides)
    try:
        base_cfg = load_config(grid.base, fixed)
    except ConfigError as e:
        raise ConfigError(f"{where}: base with overrides: {e}") from None
    default_lr, base_batch = base_cfg.solver.base_lr, base_cfg.solver.base_batch
    n_images = grid.train_images or count_train_images(base_cfg)
    runs, notes, blocks, seen = [], [], [], set()
    for i, ax in enumerate(grid.axes):
        combos, skip_notes = _combos(ax, grid.ims_per_gpu, base_batch)
        notes += skip_notes
        settings = []
        for batch, norm, k, warmup, scaling, optimizer, base_lr, warmup_epochs in combos:
            base_lr = default_lr if base_lr is None else base_lr
            warmup_epochs = (grid.warmup_epochs if warmup_epochs is None else warmup_epochs) if warmup else 0.0
            ranks, ims, passes = layout(batch, ax, grid.ims_per_gpu)
            bn_images = 0 if norm == "frozen" else ims * (k or 1)
            setting = run_name(batch, ranks, ims, passes, norm, bn_images, warmup, scaling, optimizer,
                               lr_tag=f"lr{base_lr:g}" if base_lr != default_lr else "",
                               warmup_tag=f"{warmup_epochs:g}ep" if warmup and warmup_epochs != grid.warmup_epochs
                               else "")
            settings += [setting] if setting not in settings else []
            ipe = epoch_length(n_images, batch)
            max_iter = max(1, round(grid.epochs * ipe))
            warmup_iters = max(1, round(warmup_epochs * ipe)) if warmup and warmup_epochs else 0
            steps = [round(e * ipe) for e in grid.steps_epochs]
            unscaled = [f"solver.base_batch={batch}"] if scaling == "none" else []
            lr_override = [f"solver.base_lr={base_lr}"] if base_lr != default_lr else []
            for seed in ax.seed:
                name = f"{setting}_s{seed}"
                if name in seen:
                    continue
                seen.add(name)
                overrides = fixed + unscaled + lr_override + [
                    f"solver.ims_per_gpu={ims}", f"solver.backward_passes_per_step={passes}",
                    f"solver.max_iter={max_iter}", f"solver.steps={json.dumps(steps)}",
                    f"solver.warmup_iters={warmup_iters}", f"solver.optimizer={optimizer}", f"model.norm={norm}",
                    f"model.bn_group_size={k}", f"eval_period={ipe}", f"seed={seed}"]
                try:
                    load_config(grid.base, overrides)
                except ConfigError as e:
                    raise ConfigError(f"{where}: run {name}: {e}") from None
                runs.append(Run(name=name, setting=setting, batch=batch, ranks=ranks, ims_per_gpu=ims,
                                passes=passes, norm=norm, bn_group_size=k, bn_images=bn_images, warmup=warmup,
                                warmup_epochs=warmup_epochs, warmup_iters=warmup_iters, optimizer=optimizer,
                                lr_scaling=scaling,
                                lr=base_lr if scaling == "none" else scaled_lr(base_lr, base_batch, batch),
                                seed=seed, epochs=grid.epochs, iters_per_epoch=ipe, max_iter=max_iter,
                                overrides=overrides))
        blocks.append((ax.title or f"axes[{i}]", settings))
    runs.sort(key=lambda r: r.seed)  # stable: an interrupted grid has the first seed of every setting first
    return runs, notes, blocks
