"""Experiments built on the trainer: `python -m hvd_megdet.experiments.ablation` reruns MegDet's ablations."""
