"""The lookup's rules, on a store kept in a dict (the real stores: tests/test_feature_stores.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest

from client_proxy.core.features import fetch_rows
from client_proxy.core.services import TimeoutPolicy
from client_proxy.errors import FeatureStoreError, FeatureStoreTimeout, UnknownKeys
from client_proxy.feature_loader import read_csv
from client_proxy.stores import check_url


class DictStore:
    url = "dict://"
    kind = "dict"

    def __init__(self, values: dict[str, str], delay: float = 0.0) -> None:
        self.values = values
        self.delay = delay
        self.asked: list[list[str]] = []

    async def fetch(self, feature_set: str, keys: Sequence[str]) -> Mapping[str, bytes | str]:
        self.asked.append(list(keys))
        await asyncio.sleep(self.delay)
        return {k: self.values[k] for k in keys if k in self.values}

    async def write(self, feature_set: str, vectors: Mapping[str, Sequence[float]]) -> None:
        raise NotImplementedError

    async def ready(self) -> bool:
        return True

    async def aclose(self) -> None:
        return None


def _fetch(store: DictStore, keys: list[str], seconds: float = 5.0):  # type: ignore[no-untyped-def]
    return asyncio.run(fetch_rows(store, "s", keys, time.monotonic() + seconds, TimeoutPolicy.PARTIAL))


def test_each_distinct_key_is_asked_once_in_one_lookup() -> None:
    store = DictStore({"a": "[1, 2]", "b": "[3, 4.5]"})
    fetched = _fetch(store, ["b", "a", "b"])
    assert store.asked == [["b", "a"]]
    assert fetched.keys == ["b", "a", "b"]
    np.testing.assert_array_equal(fetched.rows, [[3, 4.5], [1, 2], [3, 4.5]])
    assert fetched.describe() == {"keys": ["b", "a", "b"]}


@pytest.mark.parametrize("value", ['"text"', "[]", "[1, null]", "[true, 1]", "not json", "[1e999]"])
def test_a_value_that_is_not_a_vector_of_finite_numbers_names_the_key(value: str) -> None:
    with pytest.raises(FeatureStoreError, match="key 'a': the value is not a list of finite numbers"):
        _fetch(DictStore({"a": value}), ["a"])


def test_vectors_of_different_widths_are_refused() -> None:
    with pytest.raises(FeatureStoreError, match=r"vectors of different widths \[1, 2\]"):
        _fetch(DictStore({"a": "[1]", "b": "[1, 2]"}), ["a", "b"])


def test_a_store_slower_than_the_deadline_is_a_504() -> None:
    started = time.monotonic()
    with pytest.raises(FeatureStoreTimeout) as error:
        _fetch(DictStore({"a": "[1]"}, delay=2.0), ["a"], seconds=0.2)
    assert error.value.status_code == 504 and time.monotonic() - started < 1.5


def test_missing_keys_are_named_and_the_rest_answered() -> None:
    fetched = _fetch(DictStore({"a": "[1]"}), ["a", "x", "y", "x"])
    assert fetched.missing == ["x", "y"] and fetched.keys == ["a"]
    assert fetched.describe() == {"keys": ["a"], "missing_keys": ["x", "y"]}


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("sqlite:///tmp/f.db", True),
        ("sqlite:///./f.db", True),
        ("redis://localhost:6379/0", True),
        ("postgresql://u:p@db:5432/features", True),
        ("postgres://u@db/features", True),
        ("sqlite://", False),
        ("mysql://db/x", False),
        ("redis:///0", False),
    ],
)
def test_store_urls_are_checked(url: str, ok: bool) -> None:
    if ok:
        assert check_url(url) == url
    else:
        with pytest.raises(ValueError, match=r"sqlite|needs"):
            check_url(url)


def test_the_loader_reads_a_csv_and_names_the_line_of_a_mistake(tmp_path: Path) -> None:
    path = tmp_path / "f.csv"
    path.write_text("key,x,y,class\nk1,1,2.5,a\nk2,3,4,b\n")
    assert read_csv(path) == {"k1": [1.0, 2.5], "k2": [3.0, 4.0]}
    path.write_text("key,x\nk1,1\nk 2,3\n")
    with pytest.raises(ValueError, match="line 3: key 'k 2'"):
        read_csv(path)
    path.write_text("key,x\nk1,one\n")
    with pytest.raises(ValueError, match="line 2: a feature of 'k1' is not a number"):
        read_csv(path)
    path.write_text("name,x\nk1,1\n")
    with pytest.raises(ValueError, match="needs a 'key' column"):
        read_csv(path)


def test_the_loader_names_each_set_after_its_file_and_refuses_one_name_for_several(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from client_proxy.feature_loader import main

    (tmp_path / "flowers.csv").write_text("key,x\nk1,1\n")
    (tmp_path / "Bad-Name.csv").write_text("key,x\nk1,1\n")
    url = f"sqlite://{tmp_path / 'f.db'}"
    assert main(["--store", url, str(tmp_path / "flowers.csv")]) == 0
    out = capsys.readouterr().out
    assert "loaded 1 vectors" in out and "as 'flowers'" in out
    assert (
        main(["--store", url, "--set", "x", str(tmp_path / "flowers.csv"), str(tmp_path / "flowers.csv")])
        == 2
    )
    assert "--set names one feature set" in capsys.readouterr().err
    assert main(["--store", url, str(tmp_path / "Bad-Name.csv")]) == 2
    assert "name it with --set" in capsys.readouterr().err
    assert main(["--store", "mysql://db/x", str(tmp_path / "flowers.csv")]) == 2


def test_an_error_lists_a_hundred_unknown_keys_and_counts_them_all() -> None:
    with pytest.raises(UnknownKeys) as error:
        _fetch(DictStore({}), [f"k{i}" for i in range(150)])
    assert len(error.value.details["keys"]) == 100 and error.value.details["count"] == 150
    assert "'k9' and 140 more" in error.value.message
