"""incdet: class-incremental object detection for torchvision RetinaNet.

Start with :func:`incdet.experiment.step.run_step` (one step end to end), :func:`incdet.load_detector` /
:class:`incdet.Detector` (a trained detector for applications) or the command-line tools in
``tools/``; ``README.md`` describes the data flow and the contracts.
"""
__version__ = "0.1.0"
__all__ = ["load_detector", "Detector"]


def __getattr__(name):  # imported lazily: `import incdet` stays light
    if name in __all__:
        from incdet.deploy import export

        return getattr(export, name)
    raise AttributeError(f"module 'incdet' has no attribute {name!r}")
LAYERS = ("base", "data", "model", "train", "evaluation", "experiment", "deploy", "bench", "tools")
