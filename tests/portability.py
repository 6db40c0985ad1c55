"""The portability run (`make test-portability`): do the tests hold on another CPU and on a busy machine?

- Tests marked `numerics` run once per CPU code path this machine can take: ATen's kernels under
  ATEN_CPU_CAPABILITY=default, avx2 and avx512 (where the CPU has them), and MKL's under
  MKL_ENABLE_INSTRUCTIONS=AVX2 and SSE4_2. A tolerance tuned on one CPU fails here.
- Tests marked `timing` run while busy loops hold every core (one spinning process per core, at normal
  priority), as on a shared CI machine. A test that needs a quiet machine fails here.

Each run is a pytest child with the variable set; the child's reported capability is checked, so a
silently ignored setting cannot pass for a tested one. Prints one line per run and a summary; exits
non-zero if any run failed.

    python -m tests.portability [--only numerics|timing] [-- extra pytest arguments]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# ATen capability -> the /proc/cpuinfo flags it needs (aten/src/ATen/native/DispatchStub.cpp).
ATEN_FLAGS = {
    "default": (),
    "avx2": ("avx2", "fma"),
    "avx512": ("avx512f", "avx512bw", "avx512vl", "avx512dq"),
}
MKL_PATHS = ("AVX2", "SSE4_2")


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux); empty where /proc/cpuinfo is absent."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def numerics_configs(flags: set[str]) -> list[tuple[str, dict[str, str]]]:
    """(label, environment) for every kernel path this CPU can run."""
    configs = [
        (f"ATEN_CPU_CAPABILITY={name}", {"ATEN_CPU_CAPABILITY": name})
        for name, needed in ATEN_FLAGS.items()
        if all(flag in flags for flag in needed)
    ]
    configs += [(f"MKL_ENABLE_INSTRUCTIONS={path}", {"MKL_ENABLE_INSTRUCTIONS": path}) for path in MKL_PATHS]
    return configs


def reported_capability(env: dict[str, str]) -> str:
    """What torch says it runs under `env` (ATen's dispatch level)."""
    code = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    return done.stdout.strip() or f"unknown ({done.stderr.strip()[-200:]})"


def _spin(stop: mp.Event) -> None:
    while not stop.is_set():
        for _ in range(100_000):
            pass


def run_pytest(marker: str, extra: dict[str, str], pytest_args: list[str]) -> tuple[bool, str, float]:
    """pytest -m marker under the extra environment; (passed, last summary line, seconds)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", marker, *pytest_args]
    start = time.monotonic()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    seconds = time.monotonic() - start
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    summary = lines[-1] if lines else done.stderr.strip()[-300:]
    if done.returncode != 0:
        print(done.stdout[-6000:], done.stderr[-2000:], sep="\n", file=sys.stderr)
    return done.returncode == 0, summary, seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("numerics", "timing"), help="run one of the two parts")
    parser.add_argument("pytest_args", nargs="*", help="passed to pytest (after --)")
    args = parser.parse_args(argv)
    results: list[tuple[str, bool, str, float]] = []

    if args.only in (None, "numerics"):
        for label, extra in numerics_configs(cpu_flags()):
            capability = reported_capability({**os.environ, **extra})
            expected = extra.get("ATEN_CPU_CAPABILITY", capability).upper()
            if capability.upper() != expected:
                results.append((f"numerics, {label}", False, f"torch reports {capability}", 0.0))
                continue
            print(f"numerics under {label} (torch: {capability}) ...", flush=True)
            ok, summary, seconds = run_pytest("numerics", extra, args.pytest_args)
            results.append((f"numerics, {label} (torch: {capability})", ok, summary, seconds))
            print(f"  {'ok' if ok else 'FAILED'}: {summary} ({seconds:.0f} s)", flush=True)

    if args.only in (None, "timing"):
        cores = os.cpu_count() or 1
        print(f"timing with {cores} busy loops holding the cores ...", flush=True)
        stop = mp.Event()
        spinners = [mp.Process(target=_spin, args=(stop,), daemon=True) for _ in range(cores)]
        for spinner in spinners:
            spinner.start()
        try:
            ok, summary, seconds = run_pytest("timing", {}, args.pytest_args)
        finally:
            stop.set()
            for spinner in spinners:
                spinner.join(timeout=5)
                if spinner.is_alive():
                    spinner.kill()
        results.append((f"timing, {cores} cores busy", ok, summary, seconds))
        print(f"  {'ok' if ok else 'FAILED'}: {summary} ({seconds:.0f} s)", flush=True)

    print("\nportability summary")
    for label, ok, summary, seconds in results:
        print(f"  {'PASS' if ok else 'FAIL'}  {label}: {summary} [{seconds:.0f} s]")
    return 0 if results and all(ok for _, ok, _, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
