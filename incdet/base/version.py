"""The package's version, in the lowest layer so that every module may record it (step folders,
benchmarks). ``setup.cfg`` holds the same string; ``tests/test_layers.py`` checks they agree."""
__version__ = "0.1.0"
