"""flowad-bench: train and evaluate flow-based anomaly detectors under one protocol."""

__version__ = "0.1.0"
