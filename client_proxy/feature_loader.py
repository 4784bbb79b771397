"""``python -m client_proxy.feature_loader``: load feature vectors into a store, from CSV files.

    python -m client_proxy.feature_loader --store sqlite:///./features.db features/iris.csv features/wine.csv
    python -m client_proxy.feature_loader --store redis://localhost:6379/0 --set flowers my-iris.csv

Each file is a feature set, named after the file (``iris.csv``: ``iris``) or by ``--set`` (one
file then). The CSV has a header; its ``key`` column is each row's key, and the other columns,
in order, are the vector, except those named by ``--ignore`` (default: ``class``, the label the
shipped files carry for reference). A key already in the set is replaced.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from client_proxy.core.features import FEATURE_SET, KEY
from client_proxy.errors import FeatureStoreError
from client_proxy.stores import check_url, open_store, shown_url


def read_csv(path: Path, ignore: Iterable[str] = ("class",)) -> dict[str, list[float]]:
    """``{key: vector}`` from a CSV file; ``ValueError`` naming the line of anything invalid."""
    skipped = set(ignore)
    vectors: dict[str, list[float]] = {}
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or "key" not in reader.fieldnames:
            raise ValueError(f"{path}: the header needs a 'key' column")
        columns = [c for c in reader.fieldnames if c != "key" and c not in skipped]
        if not columns:
            raise ValueError(f"{path}: no feature column besides 'key'")
        for row in reader:
            line = reader.line_num
            key = row["key"]
            if not KEY.match(key or ""):
                raise ValueError(f"{path}: line {line}: key {key!r}: 1 to 128 of A-Z a-z 0-9 . _ : @ / -")
            try:
                vectors[key] = [float(row[c]) for c in columns]
            except (TypeError, ValueError):
                raise ValueError(f"{path}: line {line}: a feature of {key!r} is not a number") from None
    return vectors


async def load(url: str, feature_set: str, vectors: dict[str, list[float]]) -> None:
    store = open_store(url, pool=1)
    try:
        await store.write(feature_set, vectors)
    finally:
        await store.aclose()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m client_proxy.feature_loader", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--store", required=True, help="sqlite:///path.db, redis://host:port/db or postgresql://..."
    )
    parser.add_argument("--set", dest="feature_set", help="the feature set's name (default: the file's name)")
    parser.add_argument("--ignore", default="class", help="comma-separated columns that are not features")
    parser.add_argument("csv", type=Path, nargs="+")
    args = parser.parse_args(argv)
    try:
        check_url(args.store)
        if args.feature_set is not None and len(args.csv) > 1:
            raise ValueError("--set names one feature set: give one file with it")
        for path in args.csv:
            name = args.feature_set or path.stem
            if not FEATURE_SET.match(name):
                raise ValueError(
                    f"feature set {name!r}: lower-case letters, digits and '_' (name it with --set)"
                )
            vectors = read_csv(path, [c for c in args.ignore.split(",") if c])
            asyncio.run(load(args.store, name, vectors))
            print(f"loaded {len(vectors)} vectors into {shown_url(args.store)} as {name!r}")
    except (ValueError, OSError, FeatureStoreError) as exc:
        print(f"feature_loader: error: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
