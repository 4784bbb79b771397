"""The benchmark's report: a markdown table with ratios, the targets, and a PNG plot."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bench.loadgen import Measurement


@dataclass(frozen=True)
class Row:
    name: str
    concurrency: int
    m: Measurement


@dataclass(frozen=True)
class Verdict:
    target: str
    measured: str
    holds: bool | None
    """None when the run did not measure what the target needs."""


def _find(rows: list[Row], name: str, concurrency: int) -> Measurement | None:
    return next((r.m for r in rows if r.name == name and r.concurrency == concurrency), None)


#: The targets (issue 32's: what the proxy held before its refactor into one dataplane), each a
#: ratio or a difference measured in the same run.
THROUGHPUT_TARGET = 1.1
"""``/predict/label`` at c=16 against Triton's ``iris_ensemble`` called directly."""
CPU_TARGET_MS = 0.25
"""The proxy's CPU per request at c=16."""
ADDED_P50_TARGET_MS = 0.1
"""p50 the proxy adds at c=1 over the same fan-out done directly with the async tritonclient."""


def check_targets(rows: list[Row], ceiling: str, direct: str, proxy: str, seed: str) -> list[Verdict]:
    verdicts = []
    p16, c16, s16 = _find(rows, proxy, 16), _find(rows, ceiling, 16), _find(rows, seed, 16)
    # A reference that completed no request in its window (the seed's design, seconds per request
    # on a loaded machine in a short smoke run) measured nothing to compare with.
    c16 = c16 if c16 and c16.throughput > 0 else None
    s16 = s16 if s16 and s16.throughput > 0 else None
    target = f"proxy throughput at c=16 >= {THROUGHPUT_TARGET}x iris_ensemble direct"
    if p16 and c16:
        ratio = p16.throughput / c16.throughput
        verdicts.append(Verdict(target, f"{ratio:.2f}x", ratio >= THROUGHPUT_TARGET))
    else:
        verdicts.append(Verdict(target, "not measured", None))
    target = f"proxy CPU per request at c=16 <= {CPU_TARGET_MS} ms"
    cpu = p16.cpu_per_request_ms().get("proxy") if p16 else None
    if cpu is not None:
        # The machine's speed: how much CPU Triton spends per ensemble request in the same run
        # (on the shared development machine it has varied 2.4-fold within a day).
        triton = c16.cpu_per_request_ms().get("triton") if c16 else None
        speed = f" (Triton: {triton:.2f} ms per ensemble request in this run)" if triton else ""
        verdicts.append(Verdict(target, f"{cpu:.2f} ms{speed}", cpu <= CPU_TARGET_MS))
    else:
        verdicts.append(Verdict(target, "not measured", None))
    target = "proxy throughput at c=16 >= 40x the seed's design"
    if p16 and s16:
        ratio = p16.throughput / s16.throughput
        verdicts.append(Verdict(target, f"{ratio:.1f}x", ratio >= 40))
    else:
        verdicts.append(Verdict(target, "not measured", None))
    p1, d1 = _find(rows, proxy, 1), _find(rows, direct, 1)
    target = f"p50 added by the proxy at c=1 <= {ADDED_P50_TARGET_MS} ms over the direct fan-out"
    if p1 and d1:
        added = p1.p50_ms - d1.p50_ms
        verdicts.append(Verdict(target, f"{added:+.2f} ms", added <= ADDED_P50_TARGET_MS))
    else:
        verdicts.append(Verdict(target, "not measured", None))
    proxy_rows = [r for r in rows if r.name.startswith("proxy") and r.concurrency == 64]
    if proxy_rows:
        errors = sum(r.m.errors for r in proxy_rows)
        verdicts.append(Verdict("zero errors at c=64 (proxy rows)", f"{errors} errors", errors == 0))
    else:
        verdicts.append(Verdict("zero errors at c=64 (proxy rows)", "not measured", None))
    return verdicts


def _ratio(value: float, reference: Measurement | None) -> str:
    if reference is None or reference.throughput == 0:
        return "-"
    return f"{value / reference.throughput:.2f}"


def render_markdown(
    rows: list[Row], header: dict[str, str], verdicts: list[Verdict], ceiling: str, seed: str
) -> str:
    lines = [
        "# Benchmark: the proxy against Triton's ensemble and the seed's design",
        "",
        f"- command: `{header['command']}`",
        f"- started: {header['started']}",
        f"- machine: {header['machine']}",
        f"- method: {header['method']}",
        "",
        "| configuration | concurrency | req/s | / ensemble | / seed | p50 ms | p90 ms | p99 ms | errors "
        "| CPU ms per request |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in sorted(rows, key=lambda r: (r.concurrency, _order(r.name))):
        m = row.m
        cpu = ", ".join(f"{role} {ms:.2f}" for role, ms in sorted(m.cpu_per_request_ms().items()))
        lines.append(
            f"| {row.name} | {row.concurrency} | {m.throughput:,.0f} | "
            f"{_ratio(m.throughput, _find(rows, ceiling, row.concurrency))} | "
            f"{_ratio(m.throughput, _find(rows, seed, row.concurrency))} | "
            f"{m.p50_ms:.2f} | {m.p90_ms:.2f} | {m.p99_ms:.2f} | {m.errors} | {cpu} |"
        )
    lines += ["", "## Targets", "", "| target | measured | holds |", "| --- | --- | --- |"]
    for v in verdicts:
        holds = "n/a" if v.holds is None else ("yes" if v.holds else "**no**")
        lines.append(f"| {v.target} | {v.measured} | {holds} |")
    lines.append("")
    return "\n".join(lines)


_ORDER = [
    "Triton iris_ensemble",
    "Triton BLS",
    "Ray Serve",
    "direct",
    "proxy /predict/label over gRPC",
    "proxy /predict/label over HTTP",
    "proxy /predict/label?route=ensemble",
    "proxy /predict/stream",
    "seed",
]


def _order(name: str) -> int:
    return next((i for i, prefix in enumerate(_ORDER) if name.startswith(prefix)), len(_ORDER))


def render_plot(rows: list[Row], path: Path, header: dict[str, str]) -> None:
    """Throughput and p99 per configuration and concurrency, each bar labelled with its value;
    the legend below the plots, the date and the machine in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({r.name for r in rows}, key=_order)
    levels = sorted({r.concurrency for r in rows})
    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 6.5))
    width = 0.84 / max(len(names), 1)
    colours = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")  # a colour each
    for i, name in enumerate(names):
        xs = [j + i * width for j in range(len(levels))]
        found = [_find(rows, name, c) for c in levels]
        for axis, values, fmt in (
            (left, [m.throughput if m else 0.0 for m in found], "{:,.0f}"),
            (right, [m.p99_ms if m else 0.0 for m in found], "{:,.1f}"),
        ):
            bars = axis.bar(xs, values, width, label=name, color=colours(i % 20))
            axis.bar_label(bars, labels=[fmt.format(v) for v in values], rotation=90, padding=2, fontsize=7)
    for axis, title, unit in (
        (left, "Throughput (higher is better)", "requests/s"),
        (right, "p99 latency (lower is better)", "ms, log scale"),
    ):
        axis.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(levels))])
        axis.set_xticklabels([f"concurrency {c}" for c in levels])
        axis.set_title(title)
        axis.set_ylabel(unit)
        axis.grid(axis="y", alpha=0.3)
    right.set_yscale("log")
    left.set_ylim(0, left.get_ylim()[1] * 1.18)  # room for the labels above the tallest bars
    right.set_ylim(right.get_ylim()[0], right.get_ylim()[1] * 4)
    handles, labels = left.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=9, frameon=False)
    fig.suptitle(
        f"{header['command']}, {header['started']}\n{header['machine']}", fontsize=9, x=0.01, ha="left"
    )
    fig.tight_layout(rect=(0, 0.1, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
