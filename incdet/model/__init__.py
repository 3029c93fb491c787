"""Layer 2: the network: build, grow, heads, checkpoints, conversion to and from torchvision."""
