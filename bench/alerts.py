"""What rules and their webhooks cost the requests: ``make bench``'s "Rules and webhooks" section.

The same composition of the three Iris models, served by one proxy each: with no rules; with a
rule every row meets (an alert per request) and no webhook, the reference an outage of the
receiver is to cost nothing against; and with that rule posting to a receiver that answers at
once (the most webhooks the proxy can be asked to post), one that is down (connection refused),
one that answers after a second, and one that answers 500. wrk at c=16 on each, interleaved.
"""

from __future__ import annotations

import statistics
import tempfile
from contextlib import ExitStack
from pathlib import Path

from bench.loadgen import interleaved_runs, run_wrk
from bench.processes import MODELS, compositions_proxy, counts_by_outcome
from bench.webhook_receiver import WebhookReceiver
from local_triton import TritonServer, free_ports

BODY = b'{"data": [[1.0, 2.0, 3.0, 4.0]]}'
CONCURRENCY = 16
SECRET = "whsec_YmVuY2gtd2ViaG9vay1zZWNyZXQtMzItYnl0ZXMhIQ=="
NO_RULES = "no rules"
NO_WEBHOOK = "rule, no webhook"


def _file(folder: Path, triton: TritonServer, webhook: str | None) -> Path:
    """The composition; with a rule every row meets when ``webhook`` is given ('': no webhook)."""
    services = "".join(f"      {m}: {{target: 'grpc://{triton.grpc_url}/{m}'}}\n" for m in MODELS)
    text = f"compositions:\n  iris:\n    services:\n{services}    aggregator: one_vs_rest\n"
    if webhook is not None:
        hook = f", webhook: '{webhook}'" if webhook else ""
        text += f"    rules:\n      - {{name: every_row, when: 'max >= 0'{hook}}}\n"
    path = folder / f"compositions-{len(list(folder.iterdir()))}.yaml"
    path.write_text(text)
    return path


def _deliveries(url: str) -> dict[str, float]:
    """``proxy_webhook_deliveries_total`` by outcome, and ``proxy_alerts_total``, from /metrics."""
    found = counts_by_outcome(url, "proxy_webhook_deliveries_total")
    found["alerts"] = sum(counts_by_outcome(url, "proxy_alerts_total").values())
    return found


def alerts_section(triton: TritonServer, seconds: float, repeats: int, warmup: float) -> str:
    with ExitStack() as stack:
        receivers = {
            "receiver answers at once": WebhookReceiver(SECRET, 204),
            "receiver slow (answers after 1 s)": WebhookReceiver(SECRET, 204, delay_s=1.0),
            "receiver answers 500": WebhookReceiver(SECRET, 500),
        }
        for receiver in receivers.values():
            receiver.start()
            stack.callback(receiver.stop)
        (closed,) = free_ports(1)
        hooks: dict[str, str | None] = {NO_RULES: None, NO_WEBHOOK: ""}
        hooks["receiver answers at once"] = receivers["receiver answers at once"].url
        hooks["receiver down (connection refused)"] = f"http://127.0.0.1:{closed}/alerts"
        hooks["receiver slow (answers after 1 s)"] = receivers["receiver slow (answers after 1 s)"].url
        hooks["receiver answers 500"] = receivers["receiver answers 500"].url
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-alerts-")))
        proxies = {
            name: compositions_proxy(stack, _file(folder, triton, hook), PROXY_WEBHOOK_SECRET=SECRET)
            for name, hook in hooks.items()
        }
        for url, _ in proxies.values():
            run_wrk(f"{url}/compositions/iris/label", BODY, CONCURRENCY, warmup)
        measured = interleaved_runs(
            proxies, "/compositions/iris/label", BODY, CONCURRENCY, repeats, seconds, triton.pid or 0, "rules"
        )
        outcomes = {name: _deliveries(url) for name, (url, _) in proxies.items()}
        got = {name: len(r.received) for name, r in receivers.items()}

    def med(name: str, value: str) -> float:
        ms = measured[name]
        if value == "cpu":
            return statistics.median(m.cpu_per_request_ms().get("proxy", 0.0) for m in ms)
        return float(statistics.median(getattr(m, value) for m in ms))

    base = med(NO_RULES, "throughput")
    lines = [
        "",
        "## Rules and webhooks",
        "",
        "`bench.alerts`: `/compositions/iris/label` (the three Iris models, one_vs_rest), one proxy per "
        "row: with no rules; with a rule every row meets (`max >= 0`: an alert per request, counted and "
        "logged) and no webhook; and with that rule posting to a receiver in the benchmark's process "
        "(`bench/webhook_receiver.py`, which checks each signature: its CPU is on the same two cores), "
        "the most webhooks the proxy can be asked to post. Webhook settings at their "
        f"defaults (4 workers, a queue of 1,000, 3 retries). wrk at c={CONCURRENCY}, {repeats} "
        f"interleaved run(s) of {seconds:g} s, medians; the delivery counts are the proxy's, over the "
        "whole section (warm-up included).",
        "",
        "| webhook | req/s | vs no rules | p50 ms | p99 ms | proxy CPU/request ms | errors | alerts "
        "| delivered | failed | dropped |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in proxies:
        found = outcomes[name]
        errors = sum(m.errors for m in measured[name])
        lines.append(
            f"| {name} | {med(name, 'throughput'):,.0f} | {med(name, 'throughput') / base:.2f}x "
            f"| {med(name, 'p50_ms'):.2f} | {med(name, 'p99_ms'):.2f} | {med(name, 'cpu'):.3f} | {errors} "
            f"| {found.get('alerts', 0):,.0f} | {found.get('delivered', 0):,.0f} "
            f"| {found.get('failed', 0):,.0f} | {found.get('dropped', 0):,.0f} |"
        )
    lines += [
        "",
        "Posts the receivers got (retries included): "
        + ", ".join(f"{name}: {count:,}" for name, count in got.items())
        + ".",
        "",
    ]
    return "\n".join(lines)
