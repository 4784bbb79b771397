"""The feature sets a feature store serves for requests by key: the Iris and wine rows as CSV.

``python -m training`` writes them beside the model repository: ``features/iris.csv`` (keys
``flower-0`` ... ``flower-149``, the rows in scikit-learn's order) and ``features/wine.csv``
(``wine-0`` ... ``wine-177``), with the class of each row for reference (the loader leaves the
``class`` column out).
``python -m client_proxy.feature_loader`` loads them into a store; ``make run`` does it for
the embedded SQLite store.
"""

from __future__ import annotations

import csv
from pathlib import Path

from sklearn.datasets import load_iris, load_wine

DEFAULT_FOLDER = Path(__file__).resolve().parent.parent / "features"
#: Feature set -> (key prefix, scikit-learn loader).
SETS = {"iris": ("flower", load_iris), "wine": ("wine", load_wine)}


def write_csvs(folder: Path = DEFAULT_FOLDER) -> list[Path]:
    """One CSV per feature set in ``folder``: ``key``, the features (scikit-learn's float64 values,
    written exactly), ``class``."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (prefix, loader) in SETS.items():
        bunch = loader()
        path = folder / f"{name}.csv"
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            columns = [
                c.replace(" (cm)", "_cm").replace(" ", "_").replace("/", "_") for c in bunch.feature_names
            ]
            writer.writerow(["key", *columns, "class"])
            for i, (row, target) in enumerate(zip(bunch.data.tolist(), bunch.target.tolist(), strict=True)):
                writer.writerow([f"{prefix}-{i}", *(repr(v) for v in row), bunch.target_names[target]])
        written.append(path)
    return written
