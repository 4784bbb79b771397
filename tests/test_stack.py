"""``make run``'s entry point, and the proxy's handling of slow clients and its log."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import tritonclient.grpc as grpcclient

from bench.reaping import running
from local_triton import TritonServer, free_ports
from local_triton.server import BACKEND_DIR_PREFIX, remove_stale_backend_dirs
from training import wine

from .conftest import MODEL_REPOSITORY, ROOT
from .helpers import (
    Stack,
    iris_repository,
    read_http_response,
    running_proxy,
    services_on,
    settings,
    stub_processes,
)


def test_stack_serves_the_seed_requests_and_stops_both(tmp_path: Path) -> None:
    stack = Stack(tmp_path)
    try:
        stack.wait_serving()
        seed = {"data": [[1.0, 2.0, 3.0, 4.0]]}
        assert set(httpx.post(f"{stack.url}/predict", json=seed).json()) == {
            "setosa",
            "versicolor",
            "virginica",
        }
        assert (
            httpx.post(f"{stack.url}/predict/label", json=seed).json()["prediction"]["label"] == "virginica"
        )
        assert (
            "nv_inference_request_success" in httpx.get(f"http://127.0.0.1:{stack.metrics_port}/metrics").text
        )
        # The example compositions (examples/compositions.yaml) are served, pointed at this Triton.
        wine_row = {"data": [[13.2, 1.78, 2.14, 11.2, 100, 2.65, 2.76, 0.26, 1.28, 4.38, 1.05, 3.4, 1050]]}
        composed = httpx.post(f"{stack.url}/compositions/wine/label", json=wine_row)
        assert composed.status_code == 200, composed.text
        assert composed.json()["prediction"]["label"] in ("class_0", "class_1", "class_2")
        # Requests by key read make run's SQLite store; the wine composition its own feature set.
        by_key = httpx.post(f"{stack.url}/compositions/wine/label", json={"keys": ["wine-0"]})
        assert by_key.status_code == 200 and by_key.json()["keys"] == ["wine-0"], by_key.text
        assert by_key.json()["prediction"]["label"] == "class_0"
        # The models that read their own features (model_repository_by_key/) get the keys as sent.
        forwarded = httpx.post(f"{stack.url}/compositions/iris_by_key/label", json={"keys": ["flower-100"]})
        assert forwarded.status_code == 200, forwarded.text
        assert forwarded.json()["prediction"]["label"] == "virginica"
        # Its Iris composition's rules flag a sure virginica (no webhook: ALERT_WEBHOOK_URL unset).
        flagged = httpx.post(f"{stack.url}/compositions/iris/label", json=seed).json()
        assert flagged["alerts"] == [{"rule": "virginica_sure", "severity": "critical", "rows": [0]}]
        assert stub_processes(stack.repository), "no Triton found to check the stop against"
        assert stack.stop() == 0
        stack.assert_nothing_left()
    finally:
        stack.stop()


def test_a_crashed_triton_is_restarted_and_the_proxy_serves_throughout(tmp_path: Path) -> None:
    stack = Stack(tmp_path, "--restart-delay", "0.5")
    try:
        stack.wait_serving()
        (triton_pid,), (proxy_pid,) = stack.pids("Triton"), stack.pids("proxy")
        results: list[tuple[float, int]] = []  # (when, status); status 0: no HTTP answer at all
        killed_at = 0.0

        def client() -> None:
            with httpx.Client(base_url=stack.url, timeout=10) as http:
                until = time.monotonic() + 90
                while time.monotonic() < until:
                    now = time.monotonic()
                    try:
                        status = http.post("/predict/label", json={"data": [[1, 2, 3, 4]]}).status_code
                    except httpx.TransportError:
                        status = 0
                    results.append((now, status))
                    # Enough: Triton was killed and has answered through the proxy again for 2 s.
                    if (
                        killed_at
                        and any(s == 200 and t > killed_at for t, s in results)
                        and (now > min(t for t, s in results if s == 200 and t > killed_at) + 2)
                    ):
                        return

        clients = [threading.Thread(target=client) for _ in range(8)]
        for thread in clients:
            thread.start()
        time.sleep(1.5)
        killed_at = time.monotonic()
        os.kill(triton_pid, signal.SIGKILL)  # a crash, or the OOM killer
        for thread in clients:
            thread.join(timeout=120)
        statuses = Counter(s for _, s in results)
        assert set(statuses) <= {200, 503, 504}, statuses  # 0 would be a refused connection
        assert statuses[503] + statuses[504] > 0, "the kill was never seen: the test proved nothing"
        back = min(t for t, s in results if s == 200 and t > killed_at)
        assert back - killed_at < 60, "the proxy did not answer 200 again within 60 s"
        assert stack.pids("proxy") == [proxy_pid] and running(proxy_pid), "the proxy was restarted"
        assert len(stack.pids("Triton")) == 2 and stack.pids("Triton")[1] != triton_pid
        log = stack.err.read_text()
        assert "Triton was killed by signal 9" in log and "Triton is back" in log
    finally:
        stack.stop()
    stack.assert_nothing_left()


def test_a_crashed_proxy_is_restarted_and_triton_keeps_running(tmp_path: Path) -> None:
    stack = Stack(tmp_path, "--restart-delay", "0.5")
    try:
        stack.wait_serving()
        (triton_pid,), (proxy_pid,) = stack.pids("Triton"), stack.pids("proxy")
        os.kill(proxy_pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while len(stack.pids("proxy")) < 2:
            assert time.monotonic() < deadline, "the proxy was not restarted"
            time.sleep(0.2)
        stack.wait_serving(timeout=60)
        assert httpx.post(f"{stack.url}/predict/label", json={"data": [[1, 2, 3, 4]]}).status_code == 200
        assert stack.pids("Triton") == [triton_pid] and running(triton_pid)
        assert "proxy was killed by signal 9" in stack.err.read_text()
        # "Back" once it answers /health/ready (which wait_serving saw), said once.
        deadline = time.monotonic() + 10
        while "stack: proxy is back (ready)" not in stack.err.read_text():
            assert time.monotonic() < deadline, stack.err.read_text()
            time.sleep(0.1)
        assert stack.err.read_text().count("is back") == 1
    finally:
        stack.stop()
    stack.assert_nothing_left()


def test_a_triton_that_keeps_crashing_is_given_up_with_one_line(tmp_path: Path) -> None:
    stack = Stack(tmp_path, "--restart-delay", "0.2", "--max-restarts", "2")
    try:
        stack.wait_serving()
        # From now on the repository cannot load: every restart fails at once.
        (stack.repository / "setosa" / "config.pbtxt").write_text("this is not a model config")
        os.kill(stack.pids("Triton")[0], signal.SIGKILL)
        assert stack.process.wait(timeout=120) == 1
        log = stack.err.read_text()
        give_up = [line for line in log.splitlines() if "giving up" in line]
        assert len(give_up) == 1 and "Triton" in give_up[0], log
        assert log.count("Triton did not start again: model 'setosa' failed to load") == 2, log
    finally:
        stack.stop()
    stack.assert_nothing_left()


def test_a_killed_launcher_leaves_no_triton_behind(tmp_path: Path) -> None:
    repository = iris_repository(tmp_path)
    http, grpc, metrics = free_ports(3)
    process = subprocess.Popen(
        [sys.executable, "-m", "local_triton", "--quiet", "--model-repository", str(repository),
         "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    assert process.stdout is not None
    assert "ready" in process.stdout.readline()
    assert stub_processes(repository), "no stub found: the check below would prove nothing"
    process.kill()  # no chance to clean up
    process.wait()
    process.stdout.close()
    deadline = time.monotonic() + 20
    while True:
        served = []
        for port in (http, grpc, metrics):
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    served.append(port)
        if not served and not stub_processes(repository):
            break
        assert time.monotonic() < deadline, (
            f"Triton outlived its launcher: {served}, {stub_processes(repository)}"
        )
        time.sleep(0.2)
    # Its backend directory could not be removed by the killed launcher; the next start removes it.
    left = set(Path(tempfile.gettempdir()).glob(f"{BACKEND_DIR_PREFIX}{process.pid}-*"))
    assert left, "no backend directory of the killed launcher: the check below would prove nothing"
    assert left <= set(remove_stale_backend_dirs(Path(tempfile.gettempdir())))
    assert not any(path.exists() for path in left)


def test_only_the_backend_directories_of_dead_processes_are_removed(tmp_path: Path) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale = tmp_path / f"{BACKEND_DIR_PREFIX}{gone.pid}-x1"
    (stale / "python").mkdir(parents=True)
    live = tmp_path / f"{BACKEND_DIR_PREFIX}{os.getpid()}-x2"
    unnamed = tmp_path / f"{BACKEND_DIR_PREFIX}x3"  # made before the names carried a pid
    live.mkdir()
    unnamed.mkdir()
    assert remove_stale_backend_dirs(tmp_path) == [stale]
    assert not stale.exists() and live.exists() and unnamed.exists()


def test_a_body_that_never_finishes_gets_408_within_the_deadline(triton: TritonServer) -> None:
    with running_proxy(settings(deadline_ms=500), services_on(triton, "grpc")) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(
                b"POST /predict/label HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b'Content-Length: 100\r\n\r\n{"data": [[1,'
            )
            started = time.perf_counter()
            answer = read_http_response(sock)
            elapsed = time.perf_counter() - started
        assert answer.startswith("HTTP/1.1 408"), answer
        assert "request_timeout" in answer and elapsed < 1.5
        assert httpx.post(f"{url}/predict/label", json={"data": [[1, 2, 3, 4]]}).status_code == 200


def test_each_request_is_logged_with_its_id_and_each_services_outcome(
    triton: TritonServer, tmp_path: Path
) -> None:
    log_path = tmp_path / "proxy.log"
    with log_path.open("w") as log:
        proxy_settings = settings().model_copy(update={"log_level": "INFO"})
        with running_proxy(proxy_settings, services_on(triton, "grpc"), log=log) as url:
            response = httpx.post(
                f"{url}/predict/label", json={"data": [[1, 2, 3, 4]]}, headers={"X-Request-ID": "trace-me-7"}
            )
            assert response.status_code == 200
    lines = [line for line in log_path.read_text().splitlines() if "request_id=trace-me-7" in line]
    assert len(lines) == 1
    for name in ("setosa", "versicolor", "virginica"):
        assert f" {name}=ok/" in lines[0]
    assert "endpoint=/predict/label" in lines[0]


# -- the walkthrough: a user's own models and compositions file ------------------------------
#: A user's file, as the walkthrough has them write it: three compositions of their three models
#: (a mean, a vote, and one that answers in part: its third service names a model not served).
USERS_FILE = """\
compositions:
  my_mean:
    services:
      my_logreg: {target: "${TRITON_GRPC_URL}/my_logreg"}
      my_gbt: {target: "${TRITON_GRPC_URL}/my_gbt"}
      my_knn: {target: "${TRITON_GRPC_URL}/my_knn"}
    aggregator: mean
  my_vote:
    services:
      my_logreg: {target: "${TRITON_GRPC_URL}/my_logreg"}
      my_gbt: {target: "${TRITON_GRPC_URL}/my_gbt"}
      my_knn: {target: "${TRITON_GRPC_URL}/my_knn"}
    aggregator: vote
  my_partial:
    services:
      my_logreg: {target: "${TRITON_GRPC_URL}/my_logreg"}
      my_gbt: {target: "${TRITON_GRPC_URL}/my_gbt"}
      my_forgotten: {target: "${TRITON_GRPC_URL}/my_forgotten"}
    aggregator: mean
    min_answers: 2
"""


def _users_repository(tmp_path: Path) -> Path:
    """The Iris models and the user's three multiclass models (the wine models, renamed)."""
    repository = iris_repository(tmp_path)
    for kind in ("logreg", "gbt", "knn"):
        model = repository / f"my_{kind}"
        shutil.copytree(MODEL_REPOSITORY / f"wine_{kind}", model)
        config = model / "config.pbtxt"
        config.write_text(config.read_text().replace(f'name: "wine_{kind}"', f'name: "my_{kind}"'))
    return repository


def _users_stack(tmp_path: Path, text: str = USERS_FILE, *extra: str) -> tuple[Path, Stack]:
    """make run with the user's models and their file (``text``) as PROXY_COMPOSITIONS_FILE."""
    users_file = tmp_path / "my.yaml"
    users_file.write_text(text)
    stack = Stack(
        tmp_path,
        *extra,
        repository=_users_repository(tmp_path),
        environment={"PROXY_COMPOSITIONS_FILE": str(users_file)},
    )
    return users_file, stack


def test_a_users_own_models_and_file_are_served_on_the_first_try(tmp_path: Path) -> None:
    """The walkthrough as written: their models in the repository, their file named by
    PROXY_COMPOSITIONS_FILE, make run. The example pipelines file (which names the example
    compositions' services) is not loaded beside it."""
    _, stack = _users_stack(tmp_path)
    try:
        stack.wait_serving()
        x, y = wine.load()
        rows = {"data": x[:5].tolist()}
        for name in ("my_mean", "my_vote"):
            answer = httpx.post(f"{stack.url}/compositions/{name}/label", json=rows, timeout=10)
            assert answer.status_code == 200, answer.text
            labels = [p["label"] for p in answer.json()["prediction"]]
            assert labels == [wine.WINE_CLASSES[c] for c in y[:5]], (name, labels)  # the first rows are easy
        partial = httpx.post(f"{stack.url}/compositions/my_partial/label", json=rows, timeout=10).json()
        assert partial["partial"] is True and list(partial["missing"]) == ["my_forgotten"]
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{stack.proxy_grpc_port}")
        try:
            tensor = grpcclient.InferInput(
                "input", [5, 13], "FP64"
            )  # their own names differ: one shared input
            tensor.set_data_from_numpy(x[:5].astype(np.float64))
            result = client.infer("my_mean", [tensor])
            assert [c.decode() for c in result.as_numpy("class_name")[:, 0]] == labels
        finally:
            client.close()
        log = stack.err.read_text()
        assert "restarting" not in log and "error" not in log, log
    finally:
        assert stack.stop() == 0
    stack.assert_nothing_left()


def test_a_broken_file_stops_make_run_with_one_line_and_exit_code_2(tmp_path: Path) -> None:
    """A mistake is not a crash: the configuration is checked before Triton starts, its one
    line printed, and make run stops with exit code 2, nothing restarted."""
    _, stack = _users_stack(tmp_path, USERS_FILE.replace("aggregator: vote", "aggregator: average"))
    try:
        assert stack.process.wait(timeout=5) == 2  # the bound: the check alone runs
        lines = stack.err.read_text().splitlines()
        assert len(lines) == 1, lines
        assert (
            lines[0].startswith("client_proxy: error: ") and "my.yaml" in lines[0] and "line 13" in lines[0]
        )
        assert stack.out.read_text() == ""  # no Triton was started
    finally:
        stack.stop()
    stack.assert_nothing_left()


def test_a_proxy_that_refuses_its_configuration_later_is_not_restarted(tmp_path: Path) -> None:
    """The file broken while make run serves, then the proxy killed: it is started again, refuses
    the file with its one line, and make run stops with exit code 2 instead of looping."""
    users_file, stack = _users_stack(tmp_path, USERS_FILE, "--restart-delay", "0.2")
    try:
        stack.wait_serving()
        users_file.write_text("compositions: [this is not a mapping\n")
        os.kill(stack.pids("proxy")[0], signal.SIGKILL)
        assert stack.process.wait(timeout=60) == 2
        log = stack.err.read_text()
        assert log.count("client_proxy: error: ") == 1 and "giving up" not in log, log
        assert len(stack.pids("proxy")) == 2  # restarted once after the kill, and no more
    finally:
        stack.stop()
    stack.assert_nothing_left()


def test_sighup_to_make_run_reloads_the_users_file_and_a_broken_edit_keeps_what_is_served(
    tmp_path: Path,
) -> None:
    """The walkthrough's next step: the user edits their file and sends make run SIGHUP (or
    ``kill -HUP`` the proxy's pid, which make run prints); no restart, nothing refused."""
    users_file, stack = _users_stack(tmp_path)
    rows = {"data": wine.load()[0][:3].tolist()}

    def label(name: str) -> httpx.Response:
        return httpx.post(f"{stack.url}/compositions/{name}/label", json=rows, timeout=10)

    def sighup_until(done: Callable[[], bool]) -> None:
        stack.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while not done():
            assert time.monotonic() < deadline, stack.err.read_text()
            time.sleep(0.05)

    try:
        stack.wait_serving()
        (proxy,) = stack.pids("proxy")
        assert label("my_max").status_code == 404
        users_file.write_text(
            USERS_FILE
            + "  my_max:\n    services:\n"
            + "".join(f'      my_{k}: {{target: "${{TRITON_GRPC_URL}}/my_{k}"}}\n' for k in ("logreg", "gbt"))
            + "    aggregator: max\n"
        )
        sighup_until(lambda: label("my_max").status_code == 200)
        users_file.write_text("compositions: [this is not a mapping\n")
        sighup_until(lambda: "refused, configuration 2 kept" in stack.err.read_text())
        assert label("my_max").status_code == 200 and label("my_mean").status_code == 200
        assert stack.pids("proxy") == [proxy] and stack.process.poll() is None  # never restarted
        assert stack.err.read_text().count("stack: SIGHUP: the proxy reloads its configuration") == 2
    finally:
        assert stack.stop() == 0
    stack.assert_nothing_left()
