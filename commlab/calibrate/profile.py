"""From measurements to a Calibration (the fits) and the fit-quality report `commlab calibrate` prints."""

from __future__ import annotations

import dataclasses
import math
import platform
import statistics
from typing import Any

from commlab.bench.report import format_size, machine_description
from commlab.calibrate.config import CalibrateConfig
from commlab.calibrate.fit import fit_gamma, fit_piecewise, relative_errors
from commlab.calibrate.measure import fan_large_sizes, fan_messages
from commlab.collectives.calibration import AlgorithmTimes, Calibration, Level, LinkFit, RateCurve


def machine(config: CalibrateConfig, world: int, detail: str) -> dict[str, Any]:
    """The machine description stored in the profile: host, cores, versions, date, ranks."""
    info = machine_description(detail)
    info["hostname"] = info.pop("host")
    info["ranks"] = world
    info["backend"] = config.backend
    info["mpi"] = _mpi_version() if config.backend == "mpi" else None
    info["machine"] = platform.machine()
    return info


def _mpi_version() -> str | None:
    try:
        from mpi4py import MPI

        return MPI.Get_library_version().splitlines()[0].strip()
    except ImportError:
        return None


def _series(table: dict) -> tuple[list[float], list[float]]:
    sizes = sorted(table, key=float)
    return [float(s) for s in sizes], [float(table[s]) for s in sizes]


def step_latency(fan: dict, ring: dict, messages: int, link: LinkFit) -> float:
    """The part of a message's alpha paid once per step, from small-message steps of one message (`ring`)
    and of `messages` messages (`fan`), both seconds per step by size: with a step costing S + k x A for k
    messages, A = (fan - ring) / (k - 1) and S = ring - A. The median over the sizes, kept within
    0..(the smallest alpha of the link's segments that price those sizes), so no message of those sizes is
    priced below zero; 0 without fan measurements. (A segment of other sizes whose alpha is below the
    step pays its alpha per step: `PiecewiseCostModel.of`.)"""
    samples, alphas = [], []
    for size, fan_time in fan.items():
        if size in ring:
            per_message = (float(fan_time) - float(ring[size])) / (messages - 1)
            samples.append(float(ring[size]) - per_message)
            alphas.append(link.segment(float(size)).alpha)
    if not samples:
        return 0.0
    return min(max(0.0, statistics.median(samples)), min(alphas))


def concurrency_gain(fan: dict, ring: dict, messages: int, link: LinkFit, step: float) -> float:
    """How much faster `messages` concurrent messages move their bytes than one after another, from the
    large-size fan steps (`fan`, seconds per step by size): (k x ring's bandwidth time) / (fan's bandwidth
    time), each less its latency (a ring step: the fitted alpha; a fan step: step + k x (alpha - step)).
    The median over the sizes, kept within 1..k; 1 without large fan measurements."""
    samples = []
    for size, fan_time in fan.items():
        alpha = link.segment(float(size)).alpha
        one = float(ring[size]) - alpha
        many = float(fan_time) - step - messages * (alpha - step)
        if one > 0 and many > 0:
            samples.append(messages * one / many)
    if not samples:
        return 1.0
    return min(max(1.0, statistics.median(samples)), float(messages))


def build_calibration(config: CalibrateConfig, measurements: dict, description: dict) -> Calibration:
    """Fit every level's message times, launch and reduction costs into a Calibration."""
    levels = {}
    for key, table in measurements["ring"].items():
        p = int(key)
        link = fit_piecewise(*_series(table))
        launch_samples = [
            measurements["launch"][key][s] - link.time(float(s)) for s in measurements["launch"].get(key, {})
        ]
        launch = max(0.0, statistics.median(launch_samples)) if launch_samples else 0.0
        gamma = tuple(
            (dtype, fit_gamma(*_series(times)))
            for dtype, times in measurements["reduce"].get(key, {}).items()
        )
        clone = fit_gamma(*_series(measurements["clone"][key])) if measurements.get("clone") else 0.0
        copy = fit_gamma(*_series(measurements["copy"][key])) if measurements.get("copy") else 0.0
        curves = tuple(
            (dtype, RateCurve.from_times(times))
            for dtype, times in measurements["reduce"].get(key, {}).items()
            if times
        )
        clone_curve, copy_curve = (
            RateCurve.from_times(measurements[kind][key]) if measurements.get(kind, {}).get(key) else None
            for kind in ("clone", "copy")
        )
        fan = {s: t for s, t in measurements.get("fan", {}).get(key, {}).items() if s in table}
        large = {str(s) for s in fan_large_sizes(sorted(int(s) for s in table))}
        small = {s: t for s, t in fan.items() if s not in large}
        step = step_latency(small, table, fan_messages(p), link)
        concurrency = concurrency_gain(
            {s: t for s, t in fan.items() if s in large}, table, fan_messages(p), link, step
        )
        timed = measurements.get("algorithms", {}).get(key)
        algorithms = AlgorithmTimes.from_dict(timed, f"algorithms[{key!r}]") if timed else None
        levels[p] = Level(
            p, link, launch, gamma, clone, copy, step, concurrency, curves, clone_curve, copy_curve,
            algorithms,
        )  # fmt: skip
    intra_host, inter_host = across_host_levels(measurements, levels)
    pingpong = fit_piecewise(*_series(measurements["pingpong"])) if measurements.get("pingpong") else None
    settings = {
        "min_bytes": config.min_bytes,
        "max_bytes": config.max_bytes,
        "factor": config.factor,
        "repeats": config.repeats,
        "passes": config.passes,
        "sample_seconds": config.sample_seconds,
        "steps": config.steps,
        "quick": config.quick,
        "dtypes": list(config.dtypes),
        "algorithm_sizes": config.algorithm_sizes(),
    }
    return Calibration(
        config.backend, levels, pingpong, description, settings, measurements, config.output, intra_host,
        inter_host, measurements.get("hosts") if inter_host is not None else None,
    )  # fmt: skip


def across_host_levels(measurements: dict, levels: dict[int, Level]) -> tuple[dict[int, Level], Level | None]:
    """The intra-host levels and the rails level of a calibration whose ranks spanned hosts (empty, None
    otherwise). Their message fits are their own rings'; launch, reduction and copy costs, step and
    concurrency come from the flat level of as many ranks (the same host's processes: what they
    compute does not depend on where their messages go). The rails level's concurrency is 1: its ring
    already has the local ranks crossing at once. Hosts of different sizes are handled alike (the
    variants `host_schedules` times on them)."""
    if not measurements.get("rails"):
        return {}, None
    intra = {}
    for key, table in measurements.get("intra", {}).items():
        flat = levels[int(key)]
        intra[int(key)] = dataclasses.replace(flat, link=fit_piecewise(*_series(table)), algorithms=None)
    world = max(levels)
    rails = dataclasses.replace(
        levels[world], link=fit_piecewise(*_series(measurements["rails"])), concurrency=1.0, algorithms=None
    )
    return intra, rails


def _range(lo: float, hi: float) -> str:
    def fmt(x: float) -> str:
        return format_size(int(x)) if x < 1 << 40 else "inf"

    return f"{fmt(lo)}..{fmt(hi)}"


def describe_fit(name: str, fit: LinkFit) -> list[str]:
    """One line per size range of a fit: range, alpha, bandwidth 1/beta; then R^2 and the worst error."""
    lines = [f"{name}: R^2 {fit.r2:.4f} (log time), max |error| {fit.max_relative_error * 100:.1f}%"]
    lo = 0.0
    for s in fit.segments:
        bandwidth = f"{1 / s.beta / 1e9:8.3f} GB/s" if s.beta > 0 else "       inf GB/s"
        lines.append(f"    {_range(lo, s.max_bytes):>14} B  alpha {s.alpha * 1e6:8.2f} us  {bandwidth}")
        lo = s.max_bytes
    return lines


def _rate(per_byte: float) -> str:
    return f"{1 / per_byte / 1e9:.2f}" if per_byte > 0 else "inf"


def report(calibration: Calibration) -> str:
    """The human report: machine, fits per level, the relative error at every size, launch and gamma."""
    m = calibration.machine
    out = [
        f"# commlab calibrate: {calibration.backend} on {m.get('hostname', '?')} "
        f"({m.get('logical_cores', '?')} cores, {m.get('ranks', '?')} ranks), {m.get('transport', '')}, "
        f"{m.get('time', '')}"
    ]
    meas = calibration.measurements
    fits: list[tuple[str, LinkFit, dict]] = []
    if calibration.pingpong is not None:
        fits.append(("pingpong", calibration.pingpong, meas.get("pingpong", {})))
    for p, level in sorted(calibration.levels.items()):
        fits.append((f"ring {p}", level.link, meas.get("ring", {}).get(str(p), {})))
    for p, level in sorted(calibration.intra_host.items()):
        fits.append((f"intra {p}", level.link, meas.get("intra", {}).get(str(p), {})))
    if calibration.inter_host is not None:
        fits.append((f"rails {calibration.hosts}", calibration.inter_host.link, meas.get("rails", {})))
    for name, fit, _ in fits:
        out += describe_fit(f"{name} (one message per rank and step)", fit)
    out.append("")
    out.append("# measured time per message (us) and the fit's relative error at each size")
    header = f"{'size (B)':>10}" + "".join(f"  {name:>10} {'err':>6}" for name, _, _ in fits)
    out.append(header)
    sizes = sorted({float(s) for _, _, table in fits for s in table})
    for size in sizes:
        row = f"{int(size):>10}"
        for _, fit, table in fits:
            key = str(int(size))
            if key in table:
                error = float(relative_errors(fit, [size], [table[key]])[0])
                row += f"  {table[key] * 1e6:>10.2f} {error * 100:>5.1f}%"
            else:
                row += f"  {'-':>10} {'':>6}"
        out.append(row)
    out.append("")
    for p, level in sorted(calibration.levels.items()):
        gammas = ", ".join(f"{d} {1 / g / 1e9:.2f}" if g > 0 else f"{d} inf" for d, g in level.gamma)
        out.append(
            f"ring {p}: launch {level.launch * 1e6:.1f} us per call, "
            f"{level.step * 1e6:.1f} us of alpha per step, concurrent messages x{level.concurrency:.2f} "
            f"bandwidth; reduction GB/s: {gammas}"
        )
        out.append(f"ring {p}: local copies GB/s: clone {_rate(level.clone)}, copy {_rate(level.copy)}")
        curve = level.gamma_curve("float32")
        if curve is not None:
            by_size = ", ".join(f"{format_size(int(n))} {_rate(r)}" for n, r in curve.points)
            out.append(f"ring {p}: float32 reduction GB/s by size (in cache, then not): {by_size}")
    timed = [(p, level.algorithms) for p, level in sorted(calibration.levels.items()) if level.algorithms]
    if timed:
        out.append("")
        out.append("# fastest measured algorithm (time per call) by total size: what auto picks there")
    for p, algorithms in timed:
        for op, per_alg in algorithms.times.items():
            sizes = sorted({n for points in per_alg.values() for n, _ in points})
            cells = []
            for n in sizes:
                name = algorithms.fastest(op, n)
                seconds = dict(per_alg[name])[n] if name else math.nan
                cells.append(f"{format_size(int(n))} {name} {seconds * 1e6:.0f} us")
            out.append(f"{p} ranks {op}: " + ", ".join(cells))
    return "\n".join(out)
