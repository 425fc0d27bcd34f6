"""mrigen: synthetic brain-MRI slices for data augmentation.

Pipeline, one module each: data -> models -> train -> metrics -> tracking -> tune -> registry -> generate.
"""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("mrigen")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+source"

__all__ = ["__version__"]
