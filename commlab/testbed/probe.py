"""Point-to-point probes run inside emulated hosts: TCP throughput and round-trip time.

    python -m commlab.testbed.probe serve PORT TIMEOUT          # one connection, then exit
    python -m commlab.testbed.probe send ADDRESS PORT BYTES TIMEOUT
    python -m commlab.testbed.probe rtt ADDRESS PORT COUNT TIMEOUT

The server prints "ready" once listening. `send` streams BYTES and prints the receiver's JSON: bytes and
the seconds from the first to the last byte received (so connection setup is not counted). `rtt` bounces
64-byte messages COUNT times and prints the median and minimum round trip. Every socket has a timeout.
"""

from __future__ import annotations

import json
import socket
import statistics
import sys
import time

CHUNK = 1 << 20
PING = 64


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        part = sock.recv(n - len(data))
        if not part:
            raise ConnectionError("peer closed the connection")
        data += part
    return bytes(data)


def serve(port: int, timeout: float) -> None:
    """Accept one connection: 's' streams bytes to us (we answer with what we timed), 'e' echoes."""
    with socket.create_server(("0.0.0.0", port)) as server:
        server.settimeout(timeout)
        print("ready", flush=True)
        conn, _ = server.accept()
        with conn:
            conn.settimeout(timeout)
            mode = _recv_exact(conn, 1)
            if mode == b"e":
                while True:
                    try:
                        message = _recv_exact(conn, PING)
                    except ConnectionError:
                        return
                    conn.sendall(message)
            buffer = bytearray(CHUNK)
            total, first, last = 0, 0.0, 0.0
            while True:
                n = conn.recv_into(buffer)
                if not n:
                    break
                last = time.perf_counter()
                first = first or last
                total += n
            conn.sendall(json.dumps({"bytes": total, "seconds": last - first}).encode())


def send(address: str, port: int, size: int, timeout: float) -> dict:
    with socket.create_connection((address, port), timeout=timeout) as sock:
        sock.sendall(b"s")
        payload = bytes(CHUNK)
        left = size
        while left > 0:
            n = min(left, CHUNK)
            sock.sendall(payload[:n])
            left -= n
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        while True:
            part = sock.recv(4096)
            if not part:
                break
            reply += part
    return json.loads(reply)


def rtt(address: str, port: int, count: int, timeout: float) -> dict:
    with socket.create_connection((address, port), timeout=timeout) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(b"e")
        message = bytes(PING)
        times = []
        for _ in range(count):
            start = time.perf_counter()
            sock.sendall(message)
            _recv_exact(sock, PING)
            times.append(time.perf_counter() - start)
    return {"median": statistics.median(times), "min": min(times), "count": count}


def main(argv: list[str]) -> int:
    command, *rest = argv
    if command == "serve":
        serve(int(rest[0]), float(rest[1]))
    elif command == "send":
        print(json.dumps(send(rest[0], int(rest[1]), int(rest[2]), float(rest[3]))))
    elif command == "rtt":
        print(json.dumps(rtt(rest[0], int(rest[1]), int(rest[2]), float(rest[3]))))
    else:
        print(f"unknown probe {command!r}; accepted: serve, send, rtt", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
