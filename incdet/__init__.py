"""incdet: class-incremental object detection for torchvision RetinaNet.

Start with :func:`incdet.load_detector` / :class:`incdet.Detector` (a trained detector for
applications), :func:`incdet.experiment.step.run_step` (one step end to end) or the command-line
tools in ``tools/``.

The package is layered; a module imports from its own layer or a lower one, at the top of its
file (``tests/test_layers.py`` checks every import, and that they form no cycle):

============  ==========================================================================
layer         what it owns
============  ==========================================================================
base          errors, atomic file writes, config (defaults, overrides), devices, processes
data          annotations (COCO, VOC, built-in shapes), class spaces, datasets, samplers
model         the network: build, grow, heads, checkpoints, conversion to/from torchvision
train         the training loop, losses, distillation, the exemplar memory's ranking
evaluation    COCO-style evaluation of a model on a set of images
experiment    methods, one step, protocols, importing a detector as step 0, merging
              detectors, reports
deploy        detectors for applications: ``load_detector``, ``Detector``, export, inference
bench         benchmarks, one module per section of ``tools/benchmark.py``
tools         command-line tools: parse arguments, call the layers below
============  ==========================================================================
"""
from incdet.base.version import __version__
from incdet.deploy.detector import Detector, load_detector

__all__ = ["load_detector", "Detector", "__version__"]
LAYERS = ("base", "data", "model", "train", "evaluation", "experiment", "deploy", "bench", "tools")
