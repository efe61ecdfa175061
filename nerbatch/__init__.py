"""nerbatch: fine-tune a transformer NER model with Accelerate and annotate Parquet corpora with it."""

__version__ = "0.1.0"
