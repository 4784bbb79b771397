"""Train the three one-vs-rest Iris classifiers and write the Triton model repository.

``python -m training`` is the entry point; see ``training.__main__``.
"""

from training.data import CLASS_NAMES, FEATURE_NAMES

__all__ = ["CLASS_NAMES", "FEATURE_NAMES"]
