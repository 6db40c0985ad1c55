"""What the testbed's token bucket does to one exchange step: the experiment behind its bucket size.

    sudo python benchmarks/testbed_bucket.py [--buckets-ms 5,1] [--rate 1Gb/s] [--reps 6] [--trials 3]

Two emulated hosts on one switch (`commlab testbed`, the wire's rate set by tbf). Both hosts send each
other N bytes at once over one TCP connection (TCP_NODELAY, as gloo's pairs), which is one step of
recursive doubling between two ranks, `--reps` steps back to back after an idle gap of `--gap` seconds,
for N = 64 KiB .. 4 MiB. Printed per bucket size (and per `net.ipv4.tcp_slow_start_after_idle`, set in
the hosts' namespaces): the first step after the idle gap and the median of the back-to-back ones, each
beside the wire time N / rate (the peer: what a real link of that rate takes at least). A first step
faster than the wire time is the bucket's burst: bytes leaving at the veth's speed. Medians over
--trials rounds. JSON (with the machine's load) in benchmarks/results/testbed_bucket.json. Needs root;
about 1 minute per variant.

Inside the hosts it runs as `--worker serve|client ...`.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = [64 << 10, 256 << 10, 1 << 20, 4 << 20]
PORT = 29517
TIMEOUT = 60.0  # seconds for any socket wait and for a whole variant's run


# ------------------------------------------------------------------------------------------ in the hosts


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if not n:
            raise ConnectionError("the peer closed the connection")
        got += n


def _step(sock: socket.socket, payload: memoryview, buffer: memoryview, follower: bool) -> None:
    """Send and receive len(payload) bytes at once; the follower starts sending when the leader's first
    byte arrives (the steps of the two ends stay aligned without a round trip of their own)."""
    if follower:
        sock.recv_into(buffer[:1], 1, socket.MSG_PEEK)
    sender = threading.Thread(target=sock.sendall, args=(payload,))
    sender.start()
    _recv_exact(sock, buffer)
    sender.join(TIMEOUT)


def worker(role: str, address: str, reps: int, trials: int, gap: float) -> None:
    """`serve` (the follower) or `client` (the leader, which prints every step's seconds as JSON)."""
    if role == "serve":
        with socket.create_server(("0.0.0.0", PORT)) as server:
            server.settimeout(TIMEOUT)
            print("ready", flush=True)
            sock, _ = server.accept()
    else:
        sock = socket.create_connection((address, PORT), timeout=TIMEOUT)
    with sock:
        sock.settimeout(TIMEOUT)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        payload, buffer = memoryview(bytes(max(SIZES))), memoryview(bytearray(max(SIZES)))
        steps: dict[int, list[list[float]]] = {n: [] for n in SIZES}
        for _ in range(trials):
            for n in SIZES:
                time.sleep(gap)  # both ends idle: the buckets refill, TCP's idle timer runs
                times = []
                for _ in range(reps):
                    start = time.perf_counter()
                    _step(sock, payload[:n], buffer[:n], follower=role == "serve")
                    times.append(time.perf_counter() - start)
                steps[n].append(times)
    if role == "client":
        print(json.dumps(steps))


# ------------------------------------------------------------------------------------------ the driver


def run_variant(bucket_ms: float, slow_start_after_idle: int, args: argparse.Namespace) -> dict:
    """Build the two hosts with this bucket, set the sysctl in both, run one exchange; per size the
    first step after idle and the back-to-back steps (medians over the trials), in seconds."""
    from commlab.sim.network.units import parse_bandwidth
    from commlab.testbed import system
    from commlab.testbed.testbed import Testbed

    spec = f"switch:n=2,bandwidth={args.rate}"
    with Testbed.up(spec, bucket=bucket_ms / 1e3) as testbed:
        a, b = testbed.plan.hosts
        for host in (a, b):
            system.run(["ip", "netns", "exec", testbed.namespace(host), "sysctl", "-q", "-w",
                        f"net.ipv4.tcp_slow_start_after_idle={slow_start_after_idle}"])  # fmt: skip
        me = [sys.executable, str(Path(__file__).resolve()), "--worker"]
        tail = [str(args.reps), str(args.trials), str(args.gap)]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        server = subprocess.Popen(testbed.command(b, [*me, "serve", "-", *tail]), stdout=subprocess.PIPE,
                                  text=True, env=env)  # fmt: skip
        try:
            if server.stdout.readline().strip() != "ready":
                raise RuntimeError("the exchange server did not start")
            done = subprocess.run(testbed.command(a, [*me, "client", b.address, *tail]), capture_output=True,
                                  text=True, timeout=TIMEOUT * 4, env=env)  # fmt: skip
            if done.returncode != 0:
                raise RuntimeError(f"the exchange client failed: {done.stderr.strip()}")
        finally:
            server.wait(TIMEOUT)
        rate = parse_bandwidth(args.rate)
        burst = system.bucket_bytes(rate, bucket_ms / 1e3)
    steps = {int(n): trials for n, trials in json.loads(done.stdout).items()}
    return {
        "bucket_ms": bucket_ms, "bucket_bytes": burst, "slow_start_after_idle": slow_start_after_idle,
        "rate": rate,
        "sizes": {n: {"first": statistics.median(t[0] for t in trials),
                      "back_to_back": statistics.median(x for t in trials for x in t[1:]),
                      "wire": n / rate} for n, trials in steps.items()},
    }  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", nargs=5, metavar=("ROLE", "ADDRESS", "REPS", "TRIALS", "GAP"))
    parser.add_argument("--buckets-ms", default="5,1", help="bucket sizes to compare, ms of the rate (5,1)")
    parser.add_argument("--rate", default="1Gb/s", help="the wire's rate (1Gb/s)")
    parser.add_argument("--reps", type=int, default=6, help="steps back to back after each idle gap (6)")
    parser.add_argument("--trials", type=int, default=3, help="rounds over the sizes; medians (3)")
    parser.add_argument("--gap", type=float, default=0.3, help="idle seconds before each size's steps")
    parser.add_argument("--slow-start", action="store_true", help="also at slow-start-after-idle 0")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "testbed_bucket.json"))
    args = parser.parse_args()
    if args.worker:
        role, address, reps, trials, gap = args.worker
        worker(role, address, int(reps), int(trials), float(gap))
        return 0
    load = os.getloadavg()
    variants = []
    for bucket_ms in (float(b) for b in args.buckets_ms.split(",")):
        for ssai in (1, 0) if args.slow_start else (1,):
            variants.append(run_variant(bucket_ms, ssai, args))
            v = variants[-1]
            print(
                f"bucket {bucket_ms:g} ms ({v['bucket_bytes'] / 1e3:.0f} kB), slow-start-after-idle {ssai}:"
            )
            print("   size       first step (ms)  back to back (ms)  wire (ms)  first/wire  back/wire")
            for n, s in v["sizes"].items():
                print(f"   {n >> 10:5d} KiB  {s['first'] * 1e3:15.2f}  {s['back_to_back'] * 1e3:17.2f}  "
                      f"{s['wire'] * 1e3:9.2f}  {s['first'] / s['wire']:10.2f}  "
                      f"{s['back_to_back'] / s['wire']:9.2f}", flush=True)  # fmt: skip
    machine = {"cores": os.cpu_count(), "load_at_start": load, "load_at_end": os.getloadavg()}
    print(f"load average {load[0]:.2f} at the start, {machine['load_at_end'][0]:.2f} at the end")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"machine": machine, "variants": variants}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
