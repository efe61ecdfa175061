"""nerbatch: fine-tune a transformer NER model with Accelerate and annotate Parquet corpora with it."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("nerbatch")  # defined once, in pyproject.toml
except PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"
