"""rpc: pieces/s with SmolLM2's layers on a localhost `lvr rpc-server` against fully local,
and the RPC bytes per piece."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace

from lvr_local.bench import PROMPT
from lvr_local.benchmarks.common import BUNDLED, free_port
from lvr_local.runner.config import ModelSpec
from lvr_local.runner.run import Runner
from lvr_local.runner.settings import RunSettings


class CountingRelay:
    """A localhost TCP relay to an RPC server that counts the bytes each way: llama.cpp
    keeps no such counts, so the traffic is measured here. It adds latency, so speeds
    are measured without it, and bytes in a separate run of the same generation."""

    def __init__(self, target: int) -> None:
        import threading

        self.target = target
        self.up = self.down = 0  # client -> server, server -> client
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._threading = threading
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            for a, b, way in ((client, server, "up"), (server, client, "down")):
                self._threading.Thread(target=self._pump, args=(a, b, way), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, way: str) -> None:
        try:
            while data := src.recv(1 << 20):
                setattr(self, way, getattr(self, way) + len(data))
                dst.sendall(data)
        except OSError:
            pass
        finally:  # shutdown, not just close: it wakes the other pump blocked in recv
            for end in (src, dst):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)
                end.close()

    def close(self) -> None:
        self._listener.close()


def _start_rpc_server(threads: int) -> tuple[subprocess.Popen, int]:
    """`lvr rpc-server` on a free localhost port, waited for; (its process, the port)."""
    from lvr_local.errors import LvrError
    from lvr_local.llama.rpc import Endpoint, preflight

    port = free_port()
    command = [sys.executable, "-m", "lvr_local.cli", "rpc-server", "--port", str(port)]
    server = subprocess.Popen([*command, "--threads", str(threads)], stdout=subprocess.DEVNULL)
    for _ in range(150):
        try:
            preflight(Endpoint("127.0.0.1", port), timeout=1)
            return server, port
        except LvrError:
            time.sleep(0.2)
    server.kill()
    raise RuntimeError("the RPC server did not start")


def _greedy_rate(runner: Runner, n_pieces: int) -> tuple[int, float, str]:
    """(pieces, seconds from the first piece to the last, text) of one raw greedy run."""
    run = runner.complete(PROMPT, replace(runner.settings, max_pieces=n_pieces))
    times = [time.perf_counter() for _ in run]
    return len(times) - 1, times[-1] - times[0], run.text


def rpc(n_pieces: int = 64, rounds: int = 3) -> None:
    """Pieces/s of the bundled ensemble with SmolLM2's layers on an `lvr rpc-server` on
    localhost against the same ensemble fully local, taking turns in one process; then
    the RPC traffic per piece, through a counting relay."""
    server, port = _start_rpc_server(threads=1)
    settings = RunSettings(n_ctx=1024).for_mode("raw")

    def remote(at: int) -> list[ModelSpec]:
        return [replace(BUNDLED[0], rpc=(f"127.0.0.1:{at}",)), BUNDLED[1]]

    runners = {"local": Runner(BUNDLED, settings).load(), "rpc": Runner(remote(port), settings)}
    try:
        runners["rpc"].load()
        figures = {k: [0, 0.0] for k in runners}
        texts = {k: _greedy_rate(r, 8)[2] for k, r in runners.items()}  # warm-up
        for _ in range(rounds):
            for label, runner in runners.items():
                pieces, seconds, texts[label] = _greedy_rate(runner, n_pieces)
                figures[label][0] += pieces
                figures[label][1] += seconds
        _print_rpc_rates(figures, texts, n_pieces, rounds)
        runners.pop("rpc").close()  # a server serves one client at a time
        _print_rpc_traffic(remote, port, settings, n_pieces)
    finally:
        for runner in runners.values():
            runner.close()
        server.terminate()


def _print_rpc_rates(
    figures: dict[str, list], texts: dict[str, str], n_pieces: int, rounds: int
) -> None:
    rate = {k: pieces / seconds for k, (pieces, seconds) in figures.items()}
    print(
        f"rpc: smollm2 + gemma3, mean over the MCV, greedy, {rounds} rounds of "
        f"{n_pieces} pieces each, in turn; the RPC server on localhost, 1 thread"
    )
    print(f"  fully local             {rate['local']:6.1f} pieces/s")
    print(
        f"  smollm2 over RPC        {rate['rpc']:6.1f} pieces/s  ratio "
        f"{rate['rpc'] / rate['local']:.3f}; same text: {texts['rpc'] == texts['local']}"
    )


def _print_rpc_traffic(
    remote: Callable[[int], list[ModelSpec]], port: int, settings: RunSettings, n_pieces: int
) -> None:
    relay = CountingRelay(port)
    try:
        with Runner(remote(relay.port), settings) as runner:
            runner.load()
            loaded = relay.up + relay.down
            up, down = relay.up, relay.down
            pieces, _, _ = _greedy_rate(runner, n_pieces)
            pieces += 1
            up, down = relay.up - up, relay.down - down
    finally:
        relay.close()
    print(f"  traffic (a counting relay, separate run): loading {loaded / 2**20:.1f} MiB;")
    print(
        f"  per piece {(up + down) / pieces / 1024:.1f} KiB ({up / pieces / 1024:.1f} KiB "
        f"to the server, {down / pieces / 1024:.1f} KiB back), prompt included"
    )
