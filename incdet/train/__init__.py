"""Layer 3: training a model: the loop, losses, distillation and the exemplar memory."""
