"""EM U-Net pipeline: a paper-faithful U-Net (Ronneberger et al., MICCAI 2015) for
electron-microscopy segmentation, built on MONAI.

Submodules load on first use (PEP 562), so ``import pipeline`` is enough for bundle configs:
``pipeline.config.check_paths(...)`` imports ``pipeline.config`` when it is first read.
"""

import importlib
import pkgutil

__version__ = "0.1.0"

_MODULES = frozenset(m.name for m in pkgutil.iter_modules(__path__))  # every module, found (not listed by hand)


def __getattr__(name: str):
    if name in _MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _MODULES)
