"""Configuration: YAML over documented defaults, strict types, dotted `key=value` overrides.

    cfg = load_config("configs/demo_shapes.yaml", ["solver.max_iter=100", "model.norm=bn"])

Every key is a field below with its default and meaning. An unknown key, a wrong type or a value out of range
raises `ConfigError` naming the file and the key; a single value where a list is expected is a list of one
(`input.min_size=800`). Only `yaml.safe_load` is used; names in the config (norm, backbone, schedule) select
from fixed tables elsewhere and are never imported.
"""
import dataclasses
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A bad configuration file, key or value; the message names it."""


class ConfigWarning(UserWarning):
    """A legitimate but probably unintended setting (e.g. a run that ends during its warmup)."""


@dataclass
class SplitConfig:
    images: str = ""  # folder of image files
    annotations: str = ""  # COCO instances JSON


@dataclass
class DataConfig:
    train: SplitConfig = field(default_factory=SplitConfig)
    val: SplitConfig = field(default_factory=SplitConfig)
    keep_empty_train: bool = False  # train on images without annotations too (default: drop them)
    num_workers: int = 2  # DataLoader workers per rank


@dataclass
class ModelConfig:
    backbone: str = "resnet50"  # resnet18 | resnet34 | resnet50 | resnet101 | resnet_tiny
    norm: str = "cgbn"  # frozen | bn | cgbn
    bn_group_size: int = 0  # ranks per CGBN group (the paper's BN size in GPUs); 0 = all ranks
    two_phase: bool = True  # CGBN with the paper's two allreduces (else one shifted allreduce)
    # How CGBN waits for its allreduces (sync_bn.SyncBatchNorm's wait): auto = a sleeping poll for CPU tensors
    # (ranks share cores), Horovod's own wait for GPU tensors; sleep | horovod force one.
    cgbn_wait: str = "auto"
    # CUDA only: BatchNorm's local work in torch's fused SyncBatchNorm kernels (SyncBatchNorm's cuda_kernels);
    # off until scripts/gpu_check.sh has confirmed them on a GPU.
    cgbn_cuda_kernels: bool = False
    weights: str = ""  # local checkpoint, detector or ImageNet ResNet state dict; "" = random init
    # 0..5 ResNet stages (counted from the top) that train; -1 = the recipe's: 3 (stem and layer1 frozen,
    # Detectron's FREEZE_AT=2) when norm is frozen and weights are given, else 5.
    trainable_backbone_layers: int = -1
    anchor_sizes: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])  # one per FPN level
    box_head: str = "auto"  # mlp (2 fc) | conv (4 conv + fc, BatchNorm with bn/cgbn) | auto: mlp for frozen, else conv
    # Proposal and sampling counts of torchvision's Faster R-CNN (its defaults); small models want fewer.
    rpn_pre_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_train: int = 2000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_test: int = 1000
    box_batch_size_per_image: int = 512
    box_detections_per_img: int = 100


@dataclass
class InputConfig:
    min_size: list[int] = field(default_factory=lambda: [800])  # shortest side; several = multi-scale training
    max_size: int = 1333  # cap on the longest side
    test_min_size: int = 0  # shortest side at test time; 0 = the last of min_size
    flip_prob: float = 0.5


@dataclass
class SolverConfig:
    ims_per_gpu: int = 2
    # sgd | lars: SGD with momentum, or with LARS's layer-wise trust ratio (solver.LARS), for large batches
    optimizer: str = "sgd"
    lars_eta: float = 0.001  # LARS trust coefficient: before momentum, a layer steps lars_eta x lr x its weight norm
    base_lr: float = 0.02  # lr for a global batch of base_batch images (linear scaling rule)
    base_batch: int = 16
    max_iter: int = 90000
    schedule: str = "step"  # step | cosine
    steps: list[int] = field(default_factory=lambda: [60000, 80000])  # lr x gamma at each (schedule=step)
    gamma: float = 0.1
    warmup_iters: int = 500
    warmup_factor: float = 0.001  # lr starts at warmup_factor x lr and rises linearly
    momentum: float = 0.9
    weight_decay: float = 1e-4
    weight_decay_norm: float = 0.0  # on the weights and biases of norm layers (detectron2's); others: weight_decay
    fp16_allreduce: bool = False  # compress gradients to fp16 for the allreduce
    # 0: each gradient is allreduced as soon as it is ready, overlapping the backward pass (Horovod's default);
    # k: k groups, each allreduced once all its gradients are (1: one allreduce after the backward pass).
    allreduce_groups: int = 0
    # Gradient accumulation: forward/backward passes of ims_per_gpu images per step, one gradient allreduce;
    # the global batch (and the lr, by the linear scaling rule) is ims_per_gpu x passes x world size.
    backward_passes_per_step: int = 1
    clip_grad_norm: float = 0.0  # 0 = off
    nonfinite: str = "skip"  # skip | stop: what a non-finite loss or gradient does


@dataclass
class TestConfig:
    # PreciseBN (Wu & Johnson 2021; detectron2's TEST.PRECISE_BN): before each evaluation and checkpoint,
    # recompute the BatchNorm running statistics as the true average over this many training batches per rank,
    # then over the ranks. 0 = off: the running statistics are only averaged over the ranks.
    precise_bn_iters: int = 0


@dataclass
class PretrainConfig:
    # hvd_megdet.pretrain: crops of the data.train objects (and background squares), resized to this many pixels
    crop_size: int = 64
    context: float = 0.25  # added on each side of an object's crop, as a fraction of its longer side


@dataclass
class ElasticConfig:
    # With --elastic, commit (copy) the model and optimizer state every this many iterations: a lost worker
    # rolls the others back to the last commit. Often enough to lose little work, not at every step, as
    # Horovod advises: each commit copies the whole training state.
    commit_period: int = 10


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    input: InputConfig = field(default_factory=InputConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    test: TestConfig = field(default_factory=TestConfig)
    elastic: ElasticConfig = field(default_factory=ElasticConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    device: str = "auto"  # auto | cpu | cuda
    amp: str = "off"  # off | bf16 | fp16 autocast (fp16 with loss scaling); boxes are decoded in float32
    channels_last: bool = False
    eval_period: int = 0  # iterations between evaluations; 0 = only at the end
    checkpoint_period: int = 5000
    log_period: int = 20
    output_dir: str = "output"
    seed: int = 0
    # Seconds a rank may wait in one collective before the job ends with an error naming the rank that holds
    # it up (stopped, hung, or gone); 0 = wait forever. Must exceed the longest time one rank works alone,
    # e.g. rank 0's COCO evaluation while the others wait for its result, and the ranks' start-up (hvd.init).
    # Not used with --elastic.
    stall_limit: int = 300


CHOICES = {
    "model.backbone": ("resnet18", "resnet34", "resnet50", "resnet101", "resnet_tiny"),
    "model.norm": ("frozen", "bn", "cgbn"),
    "model.cgbn_wait": ("auto", "sleep", "horovod"),
    "model.box_head": ("auto", "mlp", "conv"),
    "solver.schedule": ("step", "cosine"),
    "solver.optimizer": ("sgd", "lars"),
    "solver.nonfinite": ("skip", "stop"),
    "device": ("auto", "cpu", "cuda"),
    "amp": ("off", "bf16", "fp16"),
}
POSITIVE = ("model.rpn_pre_nms_top_n_train", "model.rpn_post_nms_top_n_train", "model.rpn_pre_nms_top_n_test",
            "model.rpn_post_nms_top_n_test", "model.box_batch_size_per_image", "model.box_detections_per_img",
            "solver.ims_per_gpu", "solver.base_lr", "solver.lars_eta", "solver.base_batch", "solver.max_iter",
            "solver.backward_passes_per_step", "input.max_size", "checkpoint_period", "log_period",
            "elastic.commit_period", "pretrain.crop_size")
NON_NEGATIVE = ("model.bn_group_size", "solver.warmup_iters", "solver.momentum", "solver.weight_decay",
                "solver.weight_decay_norm", "solver.clip_grad_norm", "eval_period", "data.num_workers",
                "solver.allreduce_groups",
                "test.precise_bn_iters",
                "input.test_min_size", "stall_limit", "pretrain.context")


def _check_type(value, tp, key, where):
    """Return `value` as type `tp` or raise ConfigError naming the key."""
    origin = typing.get_origin(tp)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):  # one value where a list is expected: a list of one, as detectron2 does
            return [_check_type(value, item_tp, key, where)]
        return [_check_type(v, item_tp, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, bool) or not isinstance(value, tp):
        raise ConfigError(f"{where}: {key} must be {tp.__name__}, got {value!r}")
    return value


def merge(node, data, prefix, where):
    """Overwrite fields of dataclass `node` from nested dict `data`; an unknown key or a wrong type raises
    ConfigError naming `where` and the dotted key (prefix + name)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: {prefix.rstrip('.') or 'top level'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(type(node))
    for name, value in data.items():
        key = prefix + str(name)
        if name not in hints:
            raise ConfigError(f"{where}: unknown key {key}")
        if dataclasses.is_dataclass(hints[name]):
            merge(getattr(node, name), value, key + ".", where)
        else:
            setattr(node, name, _check_type(value, hints[name], key, where))


def _nest(dotted, value):
    """'a.b.c', v -> {'a': {'b': {'c': v}}}."""
    for part in reversed(dotted.split(".")):
        value = {part: value}
    return value


def get(cfg, dotted):
    """The value at a dotted key, e.g. get(cfg, "solver.base_lr")."""
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def validate(cfg, where="config"):
    """Range and consistency checks that do not depend on the world size; raise ConfigError, or warn with a
    ConfigWarning for a setting that is legitimate but probably unintended."""
    for key, choices in CHOICES.items():
        if get(cfg, key) not in choices:
            raise ConfigError(f"{where}: {key} must be one of {', '.join(choices)}, got {get(cfg, key)!r}")
    for key in POSITIVE:
        if not get(cfg, key) > 0:
            raise ConfigError(f"{where}: {key} must be positive, got {get(cfg, key)!r}")
    for key in NON_NEGATIVE:
        if get(cfg, key) < 0:
            raise ConfigError(f"{where}: {key} must be >= 0, got {get(cfg, key)!r}")
    s = cfg.solver
    if not cfg.input.min_size or min(cfg.input.min_size) <= 0:
        raise ConfigError(f"{where}: input.min_size must be a non-empty list of positive sizes, "
                          f"got {cfg.input.min_size!r}")
    if not 0.0 <= cfg.input.flip_prob <= 1.0:
        raise ConfigError(f"{where}: input.flip_prob must be in [0, 1], got {cfg.input.flip_prob!r}")
    if not 0.0 < s.warmup_factor <= 1.0:
        raise ConfigError(f"{where}: solver.warmup_factor must be in (0, 1], got {s.warmup_factor!r}")
    if s.warmup_iters >= s.max_iter:  # legitimate in a smoke run, rarely meant in a real one
        warnings.warn(f"{where}: solver.warmup_iters ({s.warmup_iters}) is not smaller than solver.max_iter "
                      f"({s.max_iter}): the run ends before the lr reaches its full value", ConfigWarning,
                      stacklevel=3)
    if any(b <= a for a, b in zip(s.steps, s.steps[1:])) or any(x <= 0 for x in s.steps):
        raise ConfigError(f"{where}: solver.steps must be positive and strictly increasing, got {s.steps!r}")
    if not -1 <= cfg.model.trainable_backbone_layers <= 5:
        raise ConfigError(f"{where}: model.trainable_backbone_layers must be in 0..5, or -1 for the recipe's "
                          f"default, got {cfg.model.trainable_backbone_layers!r}")
    if len(cfg.model.anchor_sizes) != 5 or min(cfg.model.anchor_sizes) <= 0:
        raise ConfigError(f"{where}: model.anchor_sizes must be 5 positive sizes (one per FPN level), "
                          f"got {cfg.model.anchor_sizes!r}")


def inference_min_size(inp):
    """The shortest side of images at test time for input config `inp`: test_min_size, else the last
    min_size."""
    return inp.test_min_size or inp.min_size[-1]


def parse_overrides(overrides):
    """['a.b=1', 'c=[1, 2]'] -> nested dict; values are YAML scalars/lists (yaml.safe_load)."""
    merged = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: bad value ({e.__class__.__name__})") from None
        node = merged
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of {part}")
        node[parts[-1]] = value
    return merged


def load_config(path=None, overrides=()):
    """Defaults, then the YAML file at `path` (if any), then `overrides`; validated. Raises ConfigError."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise ConfigError(f"config file {path}: cannot read ({e.strerror})") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f" at line {mark.line + 1}" if mark else ""
            raise ConfigError(f"config file {path}: invalid YAML{at}") from None
        merge(cfg, data or {}, "", f"config file {path}")
    merge(cfg, parse_overrides(overrides), "", "override")
    validate(cfg, f"config {path}" if path else "config")
    return cfg


def to_dict(cfg):
    """The config as plain nested dicts (for saving as YAML and in checkpoints)."""
    return dataclasses.asdict(cfg)


def dump(cfg):
    """The config as YAML text."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg, path):
    """Write the resolved config as YAML, so a run can be repeated with exactly these settings."""
    Path(path).write_text(dump(cfg))
