"""What a change costs the proxy: two checkouts of it, side by side on one Triton.

``python -m bench.ab OLD NEW`` starts one embedded Triton and two ``python -m client_proxy``
proxies, each run from its own checkout (``OLD`` and ``NEW``, e.g. a
``git worktree`` of the commit before the change and this one), and measures ``/predict/label``
on both with the direct fan-out as the reference, interleaved, at each concurrency: medians of
p50, req/s and the proxy's CPU per request. Nothing is asserted: it prints.
"""

from __future__ import annotations

import argparse
import statistics
from contextlib import ExitStack
from pathlib import Path

from bench.loadgen import CpuMeter, Measurement, run_direct_fanout, run_wrk
from bench.processes import MODELS, start_proxy, stop_on_sigterm
from local_triton import TritonServer

BODY = b'{"data": [[6.3, 3.3, 6.0, 2.5]]}'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("old", type=Path, help="checkout whose client_proxy is the reference")
    parser.add_argument("new", type=Path, help="checkout whose client_proxy is measured against it")
    parser.add_argument("--concurrency", default="1,16", help="comma-separated (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    stop_on_sigterm()
    with ExitStack() as stack:
        triton = stack.enter_context(TritonServer(http_port=0, grpc_port=0, metrics_port=0))
        proxies = {
            # Run from its checkout: ``python -m`` imports from the working directory first.
            name: start_proxy(stack, triton, "grpc", checkout=path.resolve())
            for name, path in (("old", args.old), ("new", args.new))
        }
        for concurrency in (int(c) for c in args.concurrency.split(",")):
            for url, _ in proxies.values():
                run_wrk(f"{url}/predict/label", BODY, concurrency, 2.0)  # warm-up
            runs: dict[str, list[Measurement]] = {"direct": [], "old": [], "new": []}
            cpu: dict[str, list[float]] = {"old": [], "new": []}
            for _ in range(args.repeats):
                runs["direct"].append(run_direct_fanout(triton.grpc_url, MODELS, concurrency, args.seconds))
                for name, (url, pid) in proxies.items():
                    meter = CpuMeter({"proxy": pid})
                    meter.start()
                    measured = run_wrk(f"{url}/predict/label", BODY, concurrency, args.seconds)
                    runs[name].append(measured)
                    cpu[name].append(meter.stop()["proxy"] / max(measured.requests, 1) * 1000)
            p50 = {name: statistics.median(m.p50_ms for m in ms) for name, ms in runs.items()}
            rate = {name: statistics.median(m.throughput for m in ms) for name, ms in runs.items()}
            added = {name: p50[name] - p50["direct"] for name in ("old", "new")}
            print(
                f"c={concurrency}: p50 added over the direct fan-out: old {added['old']:+.3f} ms, "
                f"new {added['new']:+.3f} ms; req/s new/old {rate['new'] / rate['old']:.3f}; "
                f"proxy CPU per request: old {statistics.median(cpu['old']):.3f} ms, "
                f"new {statistics.median(cpu['new']):.3f} ms"
            )


if __name__ == "__main__":
    main()
