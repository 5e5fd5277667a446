"""The start of an inference job, shared by the commands that run a trained detector (evaluate, predict,
export): the job and this rank's device, and the detector loaded from its weights, as inference runs it."""
import torch

from hvd_megdet import dist
from hvd_megdet.config import ConfigError
from hvd_megdet.model import detector_from_config


def start_inference(cfg, command):
    """Check that `cfg` names model.weights (else ConfigError naming `command`), initialise Horovod (a world of 1
    without horovodrun) and return this rank's device; on CPU the host's cores are shared among its ranks."""
    if not cfg.model.weights:
        raise ConfigError(f"{command} needs model.weights=CHECKPOINT")
    dist.init()
    device = dist.device_for(cfg.device)
    if device.type == "cpu":
        torch.set_num_threads(dist.torch_threads_per_rank())
    return device


def inference_model(cfg, num_classes, device):
    """The detector of `cfg` loaded from `cfg.model.weights`, in eval mode on `device`. Inference uses running
    statistics only, so CGBN layers become plain BN: no collective per layer. A missing or unfitting weights
    file raises CheckpointError naming it."""
    norm = "bn" if cfg.model.norm == "cgbn" else cfg.model.norm
    model = detector_from_config(cfg.model, num_classes, norm=norm, channels_last=cfg.channels_last)
    return model.to(device).eval()
