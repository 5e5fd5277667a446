"""hvd_megdet: MegDet large mini-batch object detection on Horovod."""
