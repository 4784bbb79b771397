"""An overload generator: many keep-alive connections, each sending one request after another,
every answer timed by its status, and a client timeout (as wrk's ``--timeout``).

wrk reports one latency distribution for every answer, quick 503s and slow 200s together, and
the overload rows need them apart: the p99 of the admitted requests, the shed fraction, the
requests that got no answer in time. A minimal HTTP/1.1 client on asyncio streams (one request
shape, Content-Length bodies), run in its own process, is fast enough to overload the proxy.

    python -m bench.overload http://127.0.0.1:9000/predict/label --connections 1024 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from urllib.parse import urlsplit

DEFAULT_BODY = b'{"data": [[1.0, 2.0, 3.0, 4.0]]}'


async def read_response(reader: asyncio.StreamReader) -> bytes:
    """One whole HTTP/1.1 response (its head and its ``Content-Length`` body)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return head + (await reader.readexactly(length) if length else b"")


async def _answer(reader: asyncio.StreamReader) -> int:
    """Read one response; its status."""
    response = await read_response(reader)
    return int(response.split(b" ", 2)[1])


async def run(url: str, connections: int, seconds: float, timeout: float, body: bytes) -> dict[str, object]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    request = (
        f"POST {parts.path or '/'} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    answers: dict[int, list[float]] = {}
    counts = {"timeout": 0, "connect": 0, "read": 0}
    until = time.monotonic() + seconds
    begun = time.monotonic()
    timed_out: list[float] = []
    first_timeouts = [0]

    async def connection() -> None:
        reader = writer = None
        served = 0
        while time.monotonic() < until:
            if writer is None:
                served = 0
                try:
                    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
                except (OSError, TimeoutError):
                    counts["connect"] += 1
                    await asyncio.sleep(0.05)
                    continue
            assert reader is not None and writer is not None
            started = time.monotonic()
            try:
                writer.write(request)
                status = await asyncio.wait_for(_answer(reader), timeout)
            except TimeoutError:
                counts["timeout"] += 1  # no answer in time: give up on it, as a client would
                timed_out.append(started - begun)
                first_timeouts[0] += served == 0
            except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
                counts["read"] += 1
            else:
                answers.setdefault(status, []).append(time.monotonic() - started)
                served += 1
                continue
            writer.close()
            reader = writer = None

    started = time.monotonic()
    await asyncio.gather(*(connection() for _ in range(connections)))
    elapsed = time.monotonic() - started
    ok = sorted(answers.get(200, []))
    everything = sorted(s for latencies in answers.values() for s in latencies)
    total = len(everything) + counts["timeout"] + counts["read"]

    def pct(values: list[float], q: float) -> float | None:
        return round(values[min(int(q / 100 * len(values)), len(values) - 1)] * 1000, 2) if values else None

    return {
        "connections": connections,
        "seconds": round(elapsed, 2),
        "requests": total,
        "statuses": {str(k): len(v) for k, v in sorted(answers.items())},
        **counts,
        "ok_per_s": round(len(ok) / elapsed, 1),
        "shed_fraction": round(len(answers.get(503, [])) / total, 4) if total else 0.0,
        "ok_p50_ms": pct(ok, 50),
        "ok_p99_ms": pct(ok, 99),
        "ok_max_ms": pct(ok, 100),
        "shed_p99_ms": pct(sorted(answers.get(503, [])), 99),
        "all_p99_ms": pct(everything, 99),
        "first_request_timeouts": first_timeouts[0],
        "timeouts_sent_at_s": [round(t, 1) for t in sorted(timed_out)[:: max(len(timed_out) // 10, 1)]],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.overload", description=__doc__.split("\n\n")[0])
    parser.add_argument("url")
    parser.add_argument("--connections", type=int, default=1024)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--timeout", type=float, default=2.0, help="client timeout per request (s)")
    parser.add_argument("--body", default=DEFAULT_BODY.decode())
    args = parser.parse_args(argv)
    try:
        import uvloop  # the client must not be the bottleneck

        uvloop.install()
    except ImportError:
        pass
    result = asyncio.run(run(args.url, args.connections, args.seconds, args.timeout, args.body.encode()))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
