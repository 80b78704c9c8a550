"""Object detection on frozen DINOv3 backbones: the official Plain-DETR detector, with the training it lacks."""
