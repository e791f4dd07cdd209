"""scaleprotoseg: interpretable semantic segmentation with multi-scale grouped prototypes.

Importing the package does no file or network I/O; submodules are imported lazily by their users. ``__version__`` is
the package's only version number: ``pyproject.toml`` reads it from here (``dynamic = ["version"]``).
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
