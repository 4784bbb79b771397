"""A TCP relay in front of a server's port that can pause it or delay some of its calls: a
stand-in for a Triton replica that stalls now and then (a garbage-collection pause, a noisy
neighbour, a busy GPU), for the hedging tests and benchmark. Real servers, real models: only
the bytes are held back.

Every ``every_ms`` the relay holds the bytes sent to the server for ``pause_ms`` (the phase of
the first pause is drawn at random from the seed), then lets them through in order. Over gRPC,
whose calls share one connection, every call sent during a pause waits for its end, as they
would behind a stalled server.

Besides, each chunk of bytes sent to the server is held ``delay_ms`` with probability
``delay_fraction`` (drawn from the seed). Over HTTP/1.1, where a connection carries one call at
a time and a chunk is one request, that slows that fraction of the calls and no other: the slow
calls a balancer cannot see coming, which hedging is for. (Over gRPC every call behind the held
chunk on the connection waits too.)

With neither, it relays without delay, so that a healthy
replica can pay the same relay cost as a slow one. SIGUSR1 holds every byte until SIGUSR2
(``Relay.hold`` and ``Relay.release``), for tests that need requests held in flight for sure.

    python -m local_triton.slow_port --listen 9101 --upstream 127.0.0.1:8001 --pause-ms 200 --every-ms 2000
    python -m local_triton.slow_port --listen 9100 --upstream :8000 --delay-fraction 0.05 --delay-ms 100
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from local_triton.server import die_with_parent, free_ports, terminate

CHUNK = 65536


class Pauses:
    """When the relay holds bytes back: ``pause_s`` out of every ``every_s``."""

    def __init__(
        self, pause_s: float, every_s: float, seed: int = 0, delay_fraction: float = 0.0, delay_s: float = 0.0
    ) -> None:
        self.pause_s = pause_s
        self.held = 0  # chunks held back so far
        self.every_s = every_s
        self._random = random.Random(seed)
        self._start = time.monotonic() - self._random.uniform(0, every_s)
        self.delay_fraction = delay_fraction
        self.delay_s = delay_s

    def release_at(self, now: float) -> float:
        """When bytes that arrive at ``now`` may go on: after the pause they fall in, and after
        a delay if they are drawn for one."""
        release = now
        if self.pause_s > 0:
            phase = (now - self._start) % self.every_s
            if phase < self.pause_s:
                release += self.pause_s - phase
        if self.delay_fraction and self._random.random() < self.delay_fraction:
            release += self.delay_s
        return release


async def _pump(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    pauses: Pauses | None,
    gate: asyncio.Event,
    count: Path | None = None,
) -> None:
    try:
        while data := await reader.read(CHUNK):
            await gate.wait()
            if pauses is not None:
                # In order: bytes that arrive during a pause wait for its end, and nothing
                # overtakes them.
                wait = pauses.release_at(time.monotonic()) - time.monotonic()
                if wait > 0:
                    pauses.held += 1
                    if count is not None:  # for tests: proof that the relay held calls
                        count.write_text(str(pauses.held))
                    await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def relay(
    listen: int, upstream_host: str, upstream_port: int, pauses: Pauses, count: Path | None = None
) -> None:
    gate = asyncio.Event()
    gate.set()

    async def connected(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection(upstream_host, upstream_port)
        except OSError:
            client_writer.close()
            return
        with contextlib.suppress(asyncio.CancelledError):  # the relay is stopping
            await asyncio.gather(
                _pump(client_reader, server_writer, pauses, gate, count),
                _pump(server_reader, client_writer, None, gate),
            )

    server = await asyncio.start_server(connected, "127.0.0.1", listen)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, gate.clear)
    loop.add_signal_handler(signal.SIGUSR2, gate.set)
    async with server:
        print(f"relaying 127.0.0.1:{listen} -> {upstream_host}:{upstream_port}", flush=True)
        await stop.wait()


class Relay:
    """A running relay: its ``address`` (``host:port``), and a switch that holds every byte."""

    def __init__(self, address: str, process: subprocess.Popen[str], count: Path) -> None:
        self.address = address
        self._process = process
        self._count = count

    def held(self) -> int:
        """Chunks of bytes the relay has held back in a pause or a delay so far."""
        text = self._count.read_text() if self._count.exists() else ""
        return int(text) if text.strip() else 0

    def hold(self) -> None:
        """From now on, nothing passes (calls in flight and new ones wait) until ``release``."""
        self._process.send_signal(signal.SIGUSR1)
        time.sleep(0.05)  # the relay's loop has taken the signal

    def release(self) -> None:
        self._process.send_signal(signal.SIGUSR2)


@contextlib.contextmanager
def slow_port(
    upstream: str,
    pause_ms: float = 0.0,
    every_ms: float = 1000.0,
    seed: int = 0,
    delay_fraction: float = 0.0,
    delay_ms: float = 0.0,
) -> Iterator[Relay]:
    """A relay to ``upstream`` (``host:port``) in its own process."""
    (port,) = free_ports(1)
    folder = Path(tempfile.mkdtemp(prefix="slow-port-"))
    count = folder / "held"
    args = [
        sys.executable, "-m", "local_triton.slow_port", "--listen", str(port), "--upstream", upstream,
        "--pause-ms", str(pause_ms), "--every-ms", str(every_ms), "--seed", str(seed),
        "--delay-fraction", str(delay_fraction), "--delay-ms", str(delay_ms), "--count-file", str(count),
    ]  # fmt: skip
    process = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        if not process.stdout.readline().startswith("relaying"):
            raise RuntimeError(f"the relay to {upstream} did not start")
        yield Relay(f"127.0.0.1:{port}", process, count)
    finally:
        terminate(process, timeout=10)
        if process.stdout is not None:
            process.stdout.close()
        shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m local_triton.slow_port", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--listen", type=int, required=True, help="port to listen on (127.0.0.1)")
    parser.add_argument("--upstream", required=True, help="host:port to relay to")
    parser.add_argument("--pause-ms", type=float, default=0.0, help="how long each pause lasts")
    parser.add_argument("--every-ms", type=float, default=1000.0, help="how often a pause begins")
    parser.add_argument("--seed", type=int, default=0, help="draws the phase of the pauses and the delays")
    parser.add_argument("--delay-fraction", type=float, default=0.0, help="chance a chunk is delayed")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="how long a delayed chunk waits")
    parser.add_argument("--count-file", type=Path, help="a file kept holding how many chunks were held")
    args = parser.parse_args(argv)
    if args.pause_ms and not 0 < args.pause_ms < args.every_ms:
        parser.error("--pause-ms must be shorter than --every-ms")
    host, _, port = args.upstream.rpartition(":")
    die_with_parent()
    asyncio.run(
        relay(
            args.listen,
            host or "127.0.0.1",
            int(port),
            Pauses(
                args.pause_ms / 1000,
                args.every_ms / 1000,
                args.seed,
                args.delay_fraction,
                args.delay_ms / 1000,
            ),
            args.count_file,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
