"""What an experiment's shadow costs the requests: ``make bench``'s "Shadows" section.

The same composition of the three Iris models (``iris``) served by one proxy each: with no
experiment; with the experiment ``iris`` whose candidate ``iris_v2`` (versicolor_v2 in
versicolor's place) answers a copy of every request off its path; and with it sampling 10 % of
them. wrk at c=16 on each, interleaved, medians. The proxy's CPU per request counts the shadows'
work (their Triton calls, the comparison, the metrics); Triton's counts the copies' model runs.
"""

from __future__ import annotations

import statistics
import tempfile
import urllib.request
from contextlib import ExitStack
from pathlib import Path

from bench.loadgen import interleaved_runs, run_wrk
from bench.processes import MODELS, compositions_proxy, counts_by_outcome
from local_triton import TritonServer

BODY = b'{"data": [[5.1, 3.5, 1.4, 0.2]]}'  # the seed's row: one of the 146 the two agree on
CONCURRENCY = 16
NONE = "no experiment"
SHADOWS = {NONE: None, "shadow on every request": 100, "shadow on 10 % (sampled)": 10}


def _file(folder: Path, triton: TritonServer, shadow: int | None) -> Path:
    def composition(name: str, versicolor: str) -> str:
        services = "".join(
            f"      {m}: {{target: 'grpc://{triton.grpc_url}/{versicolor if m == 'versicolor' else m}'}}\n"
            for m in MODELS
        )
        return f"  {name}:\n    services:\n{services}    aggregator: one_vs_rest\n"

    text = "compositions:\n" + composition("iris", "versicolor") + composition("iris_v2", "versicolor_v2")
    if shadow is not None:
        text += f"experiments:\n  iris:\n    candidates:\n      iris_v2: {{shadow: {shadow}}}\n"
    path = folder / f"compositions-{shadow}.yaml"
    path.write_text(text)
    return path


def shadows_section(triton: TritonServer, seconds: float, repeats: int, warmup: float) -> str:
    with ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-shadows-")))
        proxies = {
            name: compositions_proxy(stack, _file(folder, triton, shadow)) for name, shadow in SHADOWS.items()
        }
        for url, _ in proxies.values():
            answer = urllib.request.urlopen(
                urllib.request.Request(
                    f"{url}/compositions/iris/label", BODY, {"Content-Type": "application/json"}
                ),
                timeout=30,
            ).read()
            if b'"label":"setosa"' not in answer:  # the primary's answer, whatever the shadow
                raise SystemExit(f"bench: unexpected answer from {url}: {answer[:200]!r}")
            run_wrk(f"{url}/compositions/iris/label", BODY, CONCURRENCY, warmup)
        measured = interleaved_runs(
            proxies,
            "/compositions/iris/label",
            BODY,
            CONCURRENCY,
            repeats,
            seconds,
            triton.pid or 0,
            "shadows",
        )
        copies = {
            name: counts_by_outcome(url, "proxy_shadow_requests_total") for name, (url, _) in proxies.items()
        }

    def med(name: str, value: str) -> float:
        ms = measured[name]
        if value in ("proxy", "triton"):
            return statistics.median(m.cpu_per_request_ms().get(value, 0.0) for m in ms)
        return float(statistics.median(getattr(m, value) for m in ms))

    lines = [
        "",
        "## Shadows",
        "",
        "`bench.shadows`: `/compositions/iris/label` (the three Iris models, one_vs_rest), one proxy "
        "per row: with no experiment; with the experiment `iris` whose candidate `iris_v2` "
        "(versicolor_v2 in versicolor's place) answers a copy of every request off its path, each "
        "row's labels and scores compared (the row sent is the seed's, on which they agree, as on "
        "146 of the 150 Iris rows); and with the copies sampled at 10 %. Shadow settings at "
        f"their defaults (4 copies at once, 64 waiting). wrk at c={CONCURRENCY}, {repeats} interleaved "
        f"run(s) of {seconds:g} s, medians; the copies' counts are the proxy's, warm-up included.",
        "",
        "| experiment | req/s | vs none | p50 ms | p99 ms | proxy CPU/request ms | vs none | Triton "
        "CPU/request ms | errors | copies answered | dropped |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    base_rps, base_cpu = med(NONE, "throughput"), med(NONE, "proxy")
    for name in proxies:
        found = copies[name]
        errors = sum(m.errors for m in measured[name])
        cpu = med(name, "proxy")
        lines.append(
            f"| {name} | {med(name, 'throughput'):,.0f} | {med(name, 'throughput') / base_rps:.2f}x "
            f"| {med(name, 'p50_ms'):.2f} | {med(name, 'p99_ms'):.2f} | {cpu:.3f} "
            f"| {cpu - base_cpu:+.3f} | {med(name, 'triton'):.3f} | {errors} "
            f"| {found.get('answered', 0):,.0f} | {found.get('dropped', 0):,.0f} |"
        )
    lines += [
        "",
        "A dropped copy is one its shadow had no room for (its queue full): the requests it came "
        "from were answered as usual.",
        "",
    ]
    return "\n".join(lines)
