"""Layer 4: COCO-style evaluation of a model on a set of images."""
