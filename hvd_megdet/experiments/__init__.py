"""Experiments built on the trainer: `python -m hvd_megdet.experiments.ablation` reruns MegDet's ablations.

`ablation` is the command; `grid` reads a grid file and expands it into runs, `runs` trains and judges each
run, `report` writes the tables, `plots` draws the curves.
"""
