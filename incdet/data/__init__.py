"""Layer 1: annotations (COCO, VOC, the built-in shapes), class spaces, datasets and samplers."""
