"""incdet: class-incremental object detection for torchvision RetinaNet.

Start with :func:`incdet.step.run_step` (one step end to end) or the command-line tools in
``tools/``; ``README.md`` describes the data flow and the contracts.
"""
__version__ = "0.1.0"
