"""``python -m training``: deterministic, exported within Triton 24.10's limits, and committed as produced."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from training import CLASS_NAMES, export, wine
from training.__main__ import REPORT_NAME, REPRODUCIBLE_WITHIN, main
from training.models import CANDIDATE, CANDIDATE_OF

from .conftest import MODEL_REPOSITORY

MODELS = [*CLASS_NAMES, CANDIDATE, "aggregate", *(m.name for m in wine.MODELS)]


@pytest.fixture(scope="module")
def retrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("repository")
    assert main(["--output", str(out)]) == 0
    return out


def _run(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


def _class_probabilities(repository: Path, x: np.ndarray) -> np.ndarray:
    """P(class) of each classifier in ``repository``, ``[N, 3]`` in ``CLASS_NAMES`` order."""
    return np.stack(
        [_run(repository / n / "1" / "model.onnx", {"input": x})[0][:, 0] for n in CLASS_NAMES], axis=1
    )


def assert_reproduces_committed(retrained: Path, x: np.ndarray) -> None:
    """What "reproducible" means across machines: same configs and report, same labels on
    every row, probabilities within ``REPRODUCIBLE_WITHIN``; the aggregator exactly."""
    for config in sorted(MODEL_REPOSITORY.glob("*/config.pbtxt")):
        name = config.parent.name
        assert (retrained / name / "config.pbtxt").read_text() == config.read_text(), name
    assert sorted(p.parent.name for p in retrained.glob("*/config.pbtxt")) == sorted(
        p.parent.name for p in MODEL_REPOSITORY.glob("*/config.pbtxt")
    )
    assert (retrained / REPORT_NAME).read_text() == (MODEL_REPOSITORY / REPORT_NAME).read_text()
    shipped = sorted((MODEL_REPOSITORY.parent / "features").glob("*.csv"))
    assert [p.name for p in shipped] == ["iris.csv", "wine.csv"]
    for csv in shipped:  # the feature sets of requests by key, written beside the repository
        assert (retrained.parent / "features" / csv.name).read_text() == csv.read_text(), csv.name
    committed, fresh = _class_probabilities(MODEL_REPOSITORY, x), _class_probabilities(retrained, x)
    assert committed.argmax(axis=1).tolist() == fresh.argmax(axis=1).tolist()
    np.testing.assert_allclose(committed, fresh, rtol=0, atol=REPRODUCIBLE_WITHIN)
    for labels in sorted(MODEL_REPOSITORY.glob("*/labels.txt")):
        assert (retrained / labels.parent.name / labels.name).read_text() == labels.read_text()
    wine_x, _ = wine.load()
    for m in wine.MODELS:
        feeds_m = {m.input_name: wine_x.astype(m.dtype)}
        (committed_p,) = _run(MODEL_REPOSITORY / m.name / "1" / "model.onnx", feeds_m)
        (fresh_p,) = _run(retrained / m.name / "1" / "model.onnx", feeds_m)
        assert committed_p.argmax(axis=1).tolist() == fresh_p.argmax(axis=1).tolist(), m.name
        np.testing.assert_allclose(committed_p, fresh_p, rtol=0, atol=REPRODUCIBLE_WITHIN, err_msg=m.name)
    feeds = {n: np.random.default_rng(0).random((150, 2), dtype=np.float32) for n in CLASS_NAMES}
    for a, b in zip(
        _run(MODEL_REPOSITORY / "aggregate" / "1" / "model.onnx", feeds),
        _run(retrained / "aggregate" / "1" / "model.onnx", feeds),
        strict=True,
    ):
        assert a.tolist() == b.tolist()


def test_committed_repository_is_what_training_writes(
    retrained: Path, iris: tuple[np.ndarray, np.ndarray]
) -> None:
    assert_reproduces_committed(retrained, iris[0])


def _cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


# OpenBLAS kernels, each with the CPU feature it needs: Prescott (SSE3, "pni" in /proc/cpuinfo)
# and Nehalem (SSE4.2) run on every x86-64 machine this project supports, so at least two
# kernels always run. With
# scikit-learn's default solver, Nehalem's and Sandybridge's results drifted 1.9e-4 from Haswell's.
KERNELS = {"Prescott": "pni", "Nehalem": "sse4_2", "Sandybridge": "avx", "Haswell": "avx2"}

_RETRAIN = """
import json, sys
from threadpoolctl import threadpool_info
from training.__main__ import main
code = main(["--output", sys.argv[1]])
blas = [i for i in threadpool_info() if i["internal_api"] == "openblas"]
print(json.dumps(sorted({i.get("architecture") or "" for i in blas})))
sys.exit(code)
"""


def _retrain(output: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Training into ``output`` in a process of its own, with ``env``; it prints OpenBLAS's kernels."""
    done = subprocess.run(
        [sys.executable, "-c", _RETRAIN, str(output)],
        env=env,
        cwd=MODEL_REPOSITORY.parent,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_training_reproduces_the_committed_models_under_blas_kernel(
    kernel: str, tmp_path: Path, iris: tuple[np.ndarray, np.ndarray]
) -> None:
    if KERNELS[kernel] not in _cpu_flags():
        pytest.skip(f"this CPU lacks {KERNELS[kernel]}, which OpenBLAS's {kernel} kernel needs")
    env = {**os.environ, "OPENBLAS_CORETYPE": kernel}
    env.pop("OPENBLAS_L2_SIZE", None)
    done = _retrain(tmp_path, env)
    # The kernel really was the one asked for (OpenBLAS ignores a name it does not know).
    assert kernel in json.loads(done.stdout.splitlines()[-1])
    assert_reproduces_committed(tmp_path, iris[0])


def test_training_is_deterministic(retrained: Path, tmp_path: Path) -> None:
    """The same bytes from a second training in this process, and from two more in processes whose
    string hashing differs (PYTHONHASHSEED 0 and 1 list skl2onnx's opsets in other orders)."""
    assert main(["--output", str(tmp_path / "again")]) == 0
    for seed in ("0", "1"):
        _retrain(tmp_path / seed, {**os.environ, "PYTHONHASHSEED": seed})
    for name in MODELS:
        first = (retrained / name / "1" / "model.onnx").read_bytes()
        for run in ("again", "0", "1"):
            assert (tmp_path / run / name / "1" / "model.onnx").read_bytes() == first, (name, run)


@pytest.mark.parametrize("name", MODELS)
def test_onnx_loads_in_triton_24_10(name: str) -> None:
    model = onnx.load(str(MODEL_REPOSITORY / name / "1" / "model.onnx"))
    assert model.ir_version <= 8
    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    assert opsets["ai.onnx"] <= 17
    assert opsets.get("ai.onnx.ml", 0) <= 3


@pytest.mark.parametrize("name", [*CLASS_NAMES, CANDIDATE])
def test_classifier_io_is_input_n4_to_probabilities_n2(
    name: str, iris: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = iris
    session = ort.InferenceSession(str(MODEL_REPOSITORY / name / "1" / "model.onnx"))
    assert [i.name for i in session.get_inputs()] == ["input"]
    assert [o.name for o in session.get_outputs()] == ["probabilities"]
    (proba,) = session.run(None, {"input": x})
    assert proba.shape == (150, 2) and proba.dtype == np.float32
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-5)
    # Label 0 is "this class": P(class) is high on the class's own rows.
    if name == CANDIDATE:  # linear: versicolor, the middle class, it separates only so far
        own = y == CLASS_NAMES.index(CANDIDATE_OF)
        assert proba[own, 0].mean() > proba[~own, 0].mean() + 0.1
        return
    own = y == CLASS_NAMES.index(name)
    assert proba[own, 0].mean() > 0.8 and proba[~own, 0].mean() < 0.2


def test_aggregate_is_argmax_of_class_probabilities() -> None:
    rng = np.random.default_rng(1)
    p_class = rng.random((64, 3), dtype=np.float32)
    p_class[0] = [0.5, 0.5, 0.1]  # a tie goes to the first, as in the seed's loop
    feeds = {n: np.stack([p_class[:, i], 1 - p_class[:, i]], axis=1) for i, n in enumerate(CLASS_NAMES)}
    scores, label, proba, class_name = _run(MODEL_REPOSITORY / "aggregate" / "1" / "model.onnx", feeds)
    np.testing.assert_array_equal(scores, p_class)
    assert label.shape == (64, 1) and label.ravel().tolist() == p_class.argmax(axis=1).tolist()
    np.testing.assert_array_equal(proba.ravel(), p_class.max(axis=1))
    assert [str(c) for c in class_name.ravel()] == [CLASS_NAMES[i] for i in p_class.argmax(axis=1)]


def test_report_states_accuracy_and_auc() -> None:
    report = (MODEL_REPOSITORY / REPORT_NAME).read_text()
    for name in CLASS_NAMES:
        row = re.search(rf"^\| {name} \| ([\d.]+) \| ([\d.]+) \|", report, re.M)
        assert row is not None, name
        assert float(row[1]) >= 0.9 and float(row[2]) >= 0.95
    assert float(re.search(r"all_rows_label_accuracy: ([\d.]+)", report)[1]) >= 0.95  # type: ignore[index]


def test_export_mismatch_exits_nonzero_naming_the_model(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A negative tolerance makes every real export "differ": the check, not a stub, must catch it.
    monkeypatch.setattr(export, "TOLERANCE", -1.0)
    assert main(["--output", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "setosa" in err and "differ" in err
    assert not (tmp_path / "setosa").exists()


def test_wine_report_states_each_models_and_each_compositions_accuracy() -> None:
    report = (MODEL_REPOSITORY / REPORT_NAME).read_text()
    result = wine.train()
    for m in wine.MODELS:
        assert f"| {m.name} | {m.kind} |" in report and f"{result.heldout_accuracy[m.name]:.4f} |" in report
        assert result.heldout_accuracy[m.name] >= 0.85, m.name
    weights = "wine_logreg 2, wine_gbt 1, wine_knn 1"
    assert f"weighted mean of the probabilities ({weights}): {result.mean_accuracy:.4f}" in report
    assert f"majority vote of the argmax (ties to the lowest class): {result.vote_accuracy:.4f}" in report


def test_the_votes_rules() -> None:
    a = np.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.1, 0.1, 0.8]])
    b = np.array([[0.1, 0.8, 0.1], [0.2, 0.3, 0.5], [0.4, 0.4, 0.2]])
    c = np.array([[0.2, 0.7, 0.1], [0.6, 0.2, 0.2], [0.3, 0.3, 0.4]])
    # Row 0: two votes for class 1; row 1: one vote each, the tie goes to class 0; row 2: a tie
    # inside b (0.4, 0.4) counts as class 0 (argmax's first), then two votes for class 2.
    assert wine.majority_vote([a, b, c]).tolist() == [1, 0, 2]
    np.testing.assert_allclose(wine.soft_vote([a, b], [3.0, 1.0]), (3 * a + b) / 4)
