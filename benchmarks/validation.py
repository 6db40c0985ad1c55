"""Validate the NCCL model against published nccl-tests runs and write docs/validation.md (+ a PNG plot).

    python benchmarks/validation.py                         # NCCL 2.27.7 model; appends the 2.7.5 tables
    python benchmarks/validation.py --nccl-version 2.7.5    # only the earlier 2.7.5 model's tables
    python benchmarks/validation.py --out other.md --plot other.png --no-legacy

Every case below is a published measurement with its source, marked "calibration" (constants are fitted on
it) or "validation" (only predicted). The model (`commlab.sim.network.nccl_model`): NCCL 2.27.7's tuner
picks the algorithm and protocol; the time is its modelled time with fitted constants:
- `efficiency[family]` (achieved / NCCL-modelled bandwidth; families by algorithm and node count), fitted on
  the bandwidth-bound sizes (>= BANDWIDTH_BOUND) of the calibration cases; a family with no calibration
  case keeps 1.0;
- `launch` (seconds per call and per GPU one host thread drives: nccl-tests `-g N` launches N kernels per
  call, each case says what its run used) and `latency_scale` (on NCCL's modelled latency), fitted on the
  smaller sizes of the same cases, alternating with the efficiencies (each constant is fitted where it
  decides the time);
- per system, the net's extra latency where a calibration case shows its small-message floor, and an
  efficiency where a calibration case of that system exists (a fabric slower than its datasheet).
Each case also carries the NCCL settings its source ran with (NCCL_ALGO, NCCL_PROTO, NVLS on or off).
Fits minimise the squared log error of busbw (golden-section search, one constant at a time, repeated).
Held-out sources the project reserves for its own test are not used here (see docs/nccl_model.md).
"""

from __future__ import annotations

import argparse
import datetime
import math
import statistics
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from commlab.sim.network.nccl_model import DEFAULT_VERSION, FITTED, Calibration, NcclModel, family
from commlab.sim.network.systems import NodePreset, system

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
BANDWIDTH_BOUND = 256 * MIB  # calibration sizes from here up fit efficiencies; below, launch and latency
ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Case:
    """One published nccl-tests run: system, nodes, collective, busbw (GB/s) by size, role and source."""

    name: str
    role: str  # "calibration" or "validation"
    preset: NodePreset
    nodes: int
    points: dict[int, float]  # busbw (GB/s) by size; for a "latency" fit, time (us) by size
    source: str
    op: str = "allreduce"
    nvls: bool = True
    algorithms: str | None = None  # NCCL_ALGO the run set (NCCL's syntax), where its source says
    protocols: str | None = None  # NCCL_PROTO likewise
    note: str = ""
    fit: tuple[str, ...] = field(default=())  # what a calibration case fits: launch, efficiency, latency
    gpus_per_thread: int = 1  # nccl-tests -g: GPUs one thread drives (launches per call), where known


# The A3 Mega run sourced Google's nccl-env-profile.sh for GPUDirect-TCPXO (the create-a3mega README's
# nccl-tests command, `mpirun -np 16 -npernode 8 all_reduce_perf -g 1`; its image lists libnccl.so.2.21.5);
# Google's published A3 Mega job scripts with that profile set NCCL_ALGO=Ring,Tree, NCCL_PROTO=Simple and
# NCCL_NVLS_ENABLE=0, and load a tuner plugin (libnccl-tuner.so, a3plus_tuner_config.textproto) that
# google/nccl-plugin-gpudirect-tcpxo's README says ships only as a closed-source binary: its rules for
# 2 x 8 ranks are not in our sources, so the model takes NCCL's own choice among what the settings allow.
A3_ENV = {"nvls": False, "algorithms": "Ring,Tree", "protocols": "Simple"}
A3_ENV_NOTE = (
    "NCCL 2.21.5, NCCL_ALGO=Ring,Tree, NCCL_PROTO=Simple, NVLS off (Google's TCPXO profile), one process per "
    "GPU; its tuner plugin (closed source, rules not public) not modelled"
)


# Azure's AI-benchmarking-guide measures with Benchmarks/NCCLBandwidth.py: `NCCL_ALGO=NVLS all_reduce_perf
# -b 8 -e 8G -f 2 -g 8` on 8-GPU Hopper hosts (the result pages say "NVLS algorithm"), NCCL_ALGO=Ring on
# 4-GPU hosts: one process, one thread driving every GPU of the host.
AZURE_NOTE = "NCCL_ALGO=NVLS, one process drives the 8 GPUs (-g 8: the guide's NCCLBandwidth.py)"


def _azure(sizes: str, values: str) -> dict[int, float]:
    """Azure AI-benchmarking-guide tables label powers of two as 1K, 65K, 132K, 1M, 33M, 1G..."""
    units = {"K": KIB, "M": MIB, "G": GIB}
    out = {}
    for label, value in zip(sizes.split(), values.split(), strict=True):
        number, unit = int(label[:-1]), units[label[-1]]
        out[1 << round(math.log2(number * unit))] = float(value)
    return out


AZURE_SIZES = "1K 2K 4K 8K 16K 32K 65K 132K 256K 524K 1M 2M 4M 8M 16M 33M 67M 134M 268M 536M 1G 2G 4G 8G"
A100_4HDR = NodePreset(
    "a100-40gb-4hdr",
    "a100-40gb",
    8,
    "hdr",
    4,
    source="NVIDIA/nccl-tests issue 119: 8x A100-SXM4-40GB, 4x HDR InfiniBand, 2x Xeon 8358 per server",
)
GB200_HOST = NodePreset(
    "azure-nd-gb200-v6-host",
    "gb200",
    4,
    "ndr",
    4,
    cpu_vendor="arm",
    source="Azure ND GB200 v6: one host of 4 GB200 GPUs (NVLink5), Grace (Arm) CPUs",
)

CASES = [
    Case(
        "Azure ND H100 v5, 8x H100, allreduce (NVLS), NCCL 2.18.5",
        "calibration",
        system("dgx-h100"),
        1,
        _azure(
            AZURE_SIZES,
            "0.07 0.14 0.27 0.53 0.95 1.71 2.72 5.40 10.86 21.35 43.70 81.93 128.73 172.13 234.45 295.53 "
            "361.78 400.61 423.38 438.46 466.35 472.36 475.54 478.87",
        ),
        "Azure/AI-benchmarking-guide Azure_Results/ND_H100_v5_results.md (copy in samuel-bohman's fork), "
        "in-place busbw",
        fit=("launch", "efficiency"),
        algorithms="NVLS",
        note=AZURE_NOTE,
        gpus_per_thread=8,
    ),
    Case(
        "Azure NDm A100 v4, 8x A100 80GB, allreduce, NCCL 2.18.5",
        "calibration",
        system("dgx-a100"),
        1,
        _azure(
            AZURE_SIZES,
            "0.04 0.08 0.17 0.33 0.67 1.37 2.70 5.15 10.11 19.24 36.22 53.54 71.43 89.99 109.22 132.77 "
            "166.63 174.18 213.87 221.58 228.10 230.22 230.48 231.58",
        ),
        "Azure/AI-benchmarking-guide Azure_Results/ND_A100_v4_results.md, in-place busbw",
        fit=("launch", "efficiency"),
        note="one process drives the 8 GPUs (-g 8: the guide's NCCLBandwidth.py); no NVLS on A100",
        gpus_per_thread=8,
    ),
    Case(
        "Azure ND A100 v4, 32x A100 40GB (4 nodes), allreduce",
        "calibration",
        system("azure-nd-a100-v4"),
        4,
        {1 * GIB: 125.61, 2 * GIB: 124.61, 4 * GIB: 123.70},
        "NetX-lab/Echo nccl-test-log/nccl_32.log (out-of-place busbw)",
        note="fits this system's net efficiency: its multi-node runs plateau far below 8x HDR",
        fit=("system-efficiency",),
    ),
    Case(
        "Azure ND A100 v4, 32x A100 40GB (4 nodes), allreduce: small-message floor",
        "calibration",
        system("azure-nd-a100-v4"),
        4,
        {1 * KIB: 53.00, 4 * KIB: 58.97, 8 * KIB: 62.35},
        "NetX-lab/Echo nccl-test-log/nccl_32.log (out-of-place times 53.00, 58.97, 62.35 us at 1, 4, 8 KiB)",
        note="times, not busbw: fits this system's net extra latency (2 KiB, 146.7 us, an outlier, left out)",
        fit=("latency",),
    ),
    Case(
        "GCP A3 Mega, 16x H100 (2 nodes), allreduce: small-message floor",
        "calibration",
        system("a3-mega"),
        2,
        {8: 135.8, 64: 123.4, 256: 123.6, 1 * KIB: 147.1},
        "lessizzmore/create-a3mega-ztan-fork ztan-NCCL-test-result (out-of-place times 135.8, 123.4, "
        "123.6, 147.1 us)",
        note="times, not busbw: fits the GPUDirect-TCPXO net's extra latency; " + A3_ENV_NOTE,
        fit=("latency",),
        **A3_ENV,
    ),
    Case(
        "Azure ND H200 v5, 8x H200, allreduce (NVLS), NCCL 2.20.5",
        "validation",
        system("hgx-h200"),
        1,
        {
            size: value
            for size, value in _azure(
                AZURE_SIZES,
                "0.06 0.12 0.23 0.47 0.93 1.84 3.72 7.39 14.75 29.38 52.96 88.78 138.44 181.94 240.41 300.91 "
                "368.11 412.45 432.24 442.72 467.58 472.57 477.41 479.98",
            ).items()
            if size >= MIB
        },
        "Azure/AI-benchmarking-guide Azure_Results/ND_H200_v5_results.md, in-place busbw",
        algorithms="NVLS",
        note=AZURE_NOTE,
        gpus_per_thread=8,
    ),
    Case(
        "Azure ND A100 v4, 8x A100 40GB, allreduce",
        "validation",
        system("azure-nd-a100-v4"),
        1,
        {1 * MIB: 25.30, 16 * MIB: 124.60, 128 * MIB: 209.83, 1 * GIB: 230.86},
        "NetX-lab/Echo nccl-test-log/nccl_8.log (out-of-place busbw)",
        note="one process drives the 8 GPUs (the log's device list)",
        gpus_per_thread=8,
    ),
    Case(
        "Azure ND A100 v4, 16x A100 40GB (2 nodes), allreduce",
        "validation",
        system("azure-nd-a100-v4"),
        2,
        {1 * MIB: 19.64, 16 * MIB: 85.66, 128 * MIB: 123.37, 1 * GIB: 124.50},
        "NetX-lab/Echo nccl-test-log/nccl_16.log (out-of-place busbw)",
    ),
    Case(
        "GCP A3 Mega, 16x H100 (2 nodes, 8x 200 Gb/s TCPXO), allreduce",
        "validation",
        system("a3-mega"),
        2,
        {
            1 * MIB: 9.68,
            16 * MIB: 32.18,
            64 * MIB: 99.74,
            256 * MIB: 213.19,
            1 * GIB: 297.86,
            4 * GIB: 330.58,
            8 * GIB: 338.82,
        },
        "lessizzmore/create-a3mega-ztan-fork ztan-NCCL-test-result (out-of-place busbw)",
        note=A3_ENV_NOTE,
        **A3_ENV,
    ),
    Case(
        "GB200 NVL72 rack, 72 GPUs, allreduce",
        "validation",
        system("gb200-nvl72"),
        1,
        {512 * MIB: 586.06, 1 * GIB: 681.17, 2 * GIB: 757.78, 4 * GIB: 839.16, 8 * GIB: 834.57},
        "coreweave/nccl-tests pull request 43 (GB200 NVL72 example output, out-of-place busbw)",
        note="NCCL 2.25.1, NCCL_NVLS_ENABLE=1, 18 hosts x 4 GPUs, one process per GPU (-g 1): the PR's "
        "slurm/nccl-test-distributed-gb200-nvl72-enroot.slurm",
    ),
    Case(
        "Azure ND GB200 v6, 4x GB200 (one host), allreduce (ring)",
        "validation",
        GB200_HOST,
        1,
        {
            size: value
            for size, value in _azure(
                AZURE_SIZES,
                "0.10 0.19 0.38 0.76 1.46 2.88 5.71 11.29 22.41 44.07 80.48 110.43 146.27 253.46 331.09 "
                "422.62 550.73 574.19 593.53 618.74 646.87 666.63 673.06 679.61",
            ).items()
            if size >= MIB
        },
        "Azure/AI-benchmarking-guide Azure_Results/ND_GB200_v6_results.md, NCCL 2.25.1, in-place busbw",
        nvls=False,
        algorithms="ring",
        note="NCCL_ALGO=Ring, one process drives the 4 GPUs (-g 4: the guide's NCCLBandwidth.py runs Ring on "
        "4-GPU hosts)",
        gpus_per_thread=4,
    ),
    Case(
        "8x A100 40GB x 3 nodes, 4x HDR per node, allreduce (peak)",
        "validation",
        A100_4HDR,
        3,
        {128 * MIB: 96.0},
        'NVIDIA/nccl-tests issue 119 ("peak performance reaches about 96GB/s" at <= 128 MiB)',
    ),
    Case(
        "8x H100 NVSwitch, allreduce with NCCL_ALGO=RING (NVLS off)",
        "validation",
        system("dgx-h100"),
        1,
        {8 * GIB: 370.0},
        "NVIDIA/nccl-tests issue 212, maintainer's figure: ring busbw ~370 GB/s (a statement, not a table)",
        nvls=False,
        algorithms="ring",
    ),
]


def _model(case: Case, cal: Calibration, latency: dict[str, float]) -> NcclModel:
    preset = case.preset
    if preset.name in latency:
        preset = replace(preset, net_latency_us=latency[preset.name])
    return NcclModel(
        preset,
        case.nodes,
        DEFAULT_VERSION,
        cal,
        nvls=case.nvls,
        algorithms=case.algorithms,
        protocols=case.protocols,
        gpus_per_thread=case.gpus_per_thread,
    )


def _log_error(case: Case, cal: Calibration, latency: dict[str, float], sizes: list[int]) -> float:
    model = _model(case, cal, latency)
    if "latency" in case.fit:
        return sum(math.log(model.predict(case.op, s).time * 1e6 / case.points[s]) ** 2 for s in sizes)
    return sum(math.log(model.predict(case.op, s).busbw / 1e9 / case.points[s]) ** 2 for s in sizes)


def _golden(cost, lo: float, hi: float, steps: int = 60) -> float:
    """The argument in [lo, hi] of least cost (golden-section search; the costs here are unimodal)."""
    ratio = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    for _ in range(steps):
        c, d = b - ratio * (b - a), a + ratio * (b - a)
        if cost(c) < cost(d):
            b = d
        else:
            a = c
    return (a + b) / 2


def fit() -> tuple[Calibration, dict[str, float]]:
    """Fit the constants on the calibration cases only.

    launch, latency_scale and the families' efficiencies together (coordinate descent, four rounds) on every
    size of the cases marked launch/efficiency; then each system's net latency on its small-message floor
    and each system's own efficiency on its case."""
    calibration = [c for c in CASES if c.role == "calibration"]
    shared = [(c, sorted(c.points)) for c in calibration if "efficiency" in c.fit or "launch" in c.fit]
    families = sorted(
        {
            family(_model(c, Calibration(), {}).choose(c.op, s)[0], c.nodes)
            for c, sizes in shared
            for s in sizes
            if s >= 16 * MIB
        }
    )
    params: dict[str, float] = {"launch": 10e-6, "latency_scale": 1.0, **dict.fromkeys(families, 1.0)}
    bounds = {"launch": (0.0, 100e-6), "latency_scale": (0.2, 3.0)}

    def calibration_of(p: dict[str, float]) -> Calibration:
        return Calibration({f: p[f] for f in families}, launch=p["launch"], latency_scale=p["latency_scale"])

    def cost(p: dict[str, float], big: bool) -> float:
        return sum(
            _log_error(c, calibration_of(p), {}, [s for s in sizes if (s >= BANDWIDTH_BOUND) == big])
            for c, sizes in shared
        )

    # Bandwidth-bound sizes fix the efficiencies, the others the launch and latency constants: each constant
    # is fitted where it decides the time, so the latency-bound sizes do not pull the bandwidths.
    for _ in range(4):
        for name in params:
            lo, hi = bounds.get(name, (0.2, 2.0))
            big = name in families
            params[name] = _golden(
                lambda x, name=name, big=big: cost({**params, name: x}, big), lo, hi, steps=40
            )
    base = calibration_of(params)
    latency: dict[str, float] = {}
    for case in (c for c in calibration if "latency" in c.fit):
        latency[case.preset.name] = _golden(
            lambda x, case=case: _log_error(case, base, {case.preset.name: x}, list(case.points)),
            0.0,
            500.0,
        )
    per_system: dict[str, dict[str, float]] = {}
    for case in (c for c in calibration if "system-efficiency" in c.fit):
        fam = family(_model(case, base, latency).choose(case.op, max(case.points))[0], case.nodes)
        value = _golden(
            lambda x, case=case, fam=fam: _log_error(
                case, replace(base, per_system={case.preset.name: {fam: x}}), latency, list(case.points)
            ),
            0.2,
            2.0,
        )
        per_system.setdefault(case.preset.name, {})[fam] = value
    return replace(base, per_system=per_system), latency


def rows(cal: Calibration, latency: dict[str, float]) -> list[dict]:
    out = []
    for case in CASES:
        if "latency" in case.fit:
            continue
        model = _model(case, cal, latency)
        for size, measured in sorted(case.points.items()):
            p = model.predict(case.op, size)
            predicted = p.busbw / 1e9
            nccl_own = size / p.nccl_time / 1e9 * (p.busbw / p.algbw)
            out.append(
                {
                    "case": case.name,
                    "role": case.role,
                    "size": size,
                    "measured": measured,
                    "predicted": predicted,
                    "error": (predicted - measured) / measured,
                    "choice": f"{p.algorithm}/{p.protocol}",
                    "nccl_model": nccl_own,
                }
            )
    return out


def _size(n: int) -> str:
    return f"{n // GIB} GiB" if n >= GIB else f"{n // MIB} MiB" if n >= MIB else f"{n // KIB} KiB"


def summary(table: list[dict]) -> dict[str, float | int | None]:
    """The targets' statistics on validation rows: median and max |error| at >= 16 MiB, max at 1 MiB."""
    big = [abs(r["error"]) for r in table if r["role"] == "validation" and r["size"] >= 16 * MIB]
    one = [abs(r["error"]) for r in table if r["role"] == "validation" and r["size"] == MIB]
    return {
        "median_16m": statistics.median(big) if big else None,
        "max_16m": max(big) if big else None,
        "max_1m": max(one) if one else None,
        "n_16m": len(big),
        "n_1m": len(one),
    }


def plot(table: list[dict], path: Path) -> str:
    """Predicted and measured busbw against size, one panel per case; a sentence on what was written."""
    try:
        import matplotlib
    except ModuleNotFoundError:
        return "matplotlib is not installed in this environment: no plot was drawn."
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["case"] for r in table))
    cols = 3
    rows_ = -(-len(names) // cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(5 * cols, 3.4 * rows_), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        mine = [r for r in table if r["case"] == name]
        sizes = [r["size"] for r in mine]
        ax.plot(sizes, [r["measured"] for r in mine], "o-", label="measured")
        ax.plot(sizes, [r["predicted"] for r in mine], "s--", label="predicted")
        ax.set_xscale("log", base=2)
        ax.set_title(f"[{mine[0]['role']}] {name}"[:70], fontsize=7)
        ax.set_xlabel("size (bytes)", fontsize=7)
        ax.set_ylabel("busbw (GB/s)", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"![predicted vs measured busbw]({path.name})"


def stale_constants(cal: Calibration, tolerance: float = 0.005) -> list[str]:
    """Where the CLI's FITTED (nccl_model.py) differs from this fit by more than `tolerance` (relative):
    the constants live in one place the CLI reads, and this script says when that copy is out of date."""
    mine = {"launch": cal.launch, "latency_scale": cal.latency_scale, **cal.efficiency}
    mine |= {f"{s}/{f}": v for s, own in cal.per_system.items() for f, v in own.items()}
    used = {"launch": FITTED.launch, "latency_scale": FITTED.latency_scale, **FITTED.efficiency}
    used |= {f"{s}/{f}": v for s, own in FITTED.per_system.items() for f, v in own.items()}
    return [
        f"{name}: fitted {mine.get(name, float('nan')):.4g}, FITTED has {used.get(name, float('nan')):.4g}"
        for name in sorted(set(mine) | set(used))
        if not math.isclose(mine.get(name, math.nan), used.get(name, math.nan), rel_tol=tolerance)
    ]


def report(plot_path: Path) -> list[str]:
    cal, latency = fit()
    for line in stale_constants(cal):
        print(f"warning: nccl_model.FITTED is out of date ({line}): copy this fit there", file=sys.stderr)
    table = rows(cal, latency)
    stats = summary(table)
    figure = plot(table, plot_path)

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{x * 100:.1f}%"

    lines = [
        "# Simulator validation against published nccl-tests runs",
        "",
        f"Generated by `python benchmarks/validation.py` on {datetime.date.today().isoformat()}; "
        "do not edit by hand. Model: `commlab.sim.network.nccl_model`, NCCL "
        f"{DEFAULT_VERSION} tuner (docs/nccl_model.md).",
        "",
        "Error = (predicted - measured) / measured busbw. \"NCCL's own model\" is the busbw NCCL's tuner",
        "predicts for its choice (no fitted constant), for comparison.",
        "",
        "## Cases and sources",
        "",
        "| case | role | nodes x GPUs | sizes | source | note |",
        "|---|---|---:|---:|---|---|",
    ]
    for c in CASES:
        lines.append(
            f"| {c.name} | {c.role} | {c.nodes} x {c.preset.gpus} | {len(c.points)} | {c.source} | "
            f"{c.note or '-'} |"
        )
    lines += [
        "",
        "## Fitted constants (calibration cases only)",
        "",
        f"- launch: {cal.launch * 1e6:.2f} us per call and per GPU its host thread drives (nccl-tests -g)",
        f"- latency_scale: {cal.latency_scale:.3f} (x NCCL's modelled latency)",
    ]
    for fam, value in cal.efficiency.items():
        lines.append(f"- efficiency[{fam}]: {value:.3f} (achieved / NCCL-modelled bandwidth)")
    for name, fams in cal.per_system.items():
        for fam, value in fams.items():
            lines.append(f"- efficiency[{fam}] on {name}: {value:.3f}")
    for name, value in latency.items():
        lines.append(f"- net extra latency on {name}: {value:.1f} us (NCCL's latencyInter)")
    missing = [f for f in ("nvlink", "nvls", "net", "nvls_tree") if f not in cal.efficiency]
    if missing:
        lines.append(f"- no calibration case for {', '.join(missing)}: efficiency 1.0 (NCCL's own model)")
    lines += [
        "",
        "## Results",
        "",
        "| case | role | size | measured | predicted | error | NCCL picks | NCCL's own model |",
        "|---|---|---:|---:|---:|---:|---|---:|",
    ]
    for r in table:
        lines.append(
            f"| {r['case']} | {r['role']} | {_size(r['size'])} | {r['measured']:.2f} | "
            f"{r['predicted']:.2f} | {r['error'] * 100:+.1f}% | {r['choice']} | {r['nccl_model']:.2f} |"
        )
    lines += [
        "",
        "## Targets on validation cases",
        "",
        "| target | reached | rows |",
        "|---|---:|---:|",
        f"| median \\|error\\| <= 8% at >= 16 MiB | {pct(stats['median_16m'])} | {stats['n_16m']} |",
        f"| max \\|error\\| <= 20% at >= 16 MiB | {pct(stats['max_16m'])} | {stats['n_16m']} |",
        f"| max \\|error\\| <= 25% at 1 MiB | {pct(stats['max_1m'])} | {stats['n_1m']} |",
        "",
        figure,
        "",
        "## Reading the results",
        "",
        "- The cases run what their sources say: Azure's Hopper pages are `NCCL_ALGO=NVLS all_reduce_perf",
        "  -g 8` (one thread drives 8 GPUs: 8 launches a call), its GB200 host `NCCL_ALGO=Ring -g 4`. With",
        "  the launch counted per driven GPU (2.8 us; the 2.7.5 model found 2.35 us on Echo's logs) and the",
        "  efficiencies fitted where bandwidth decides, one-node NVLS and ring cases on systems other than",
        "  the calibration ones (H200, GB200 host, the H100 ring statement) land within 10% at >= 64 MiB,",
        "  and the GB200 host and H200 at 1 MiB within 25% (-20%, -22%).",
        "- Misses left, none fitted away (docs/nccl_model.md, Known gaps): the ramp between 8 MiB and",
        "  1 GiB that latency + bytes/bandwidth does not draw (H200 NVLS +17% at 16-32 MiB: NCCL shrinks",
        "  its NVLS chunks to 32 KiB there; A100 rings +23% at 16 MiB; the GB200 NVL72 rack +41% at",
        "  512 MiB, a ~0.5 ms constant its NCCL 2.25.1 run shows and the model has no rule for); Echo's",
        "  8-GPU A100 at 1 MiB (+31%: 72 us, against 51 us on Azure's A100 with the same -g 8); and GCP's",
        "  GPUDirect-TCPXO system, whose tuner plugin's rules are not public: the run switches regime",
        "  between 16 MiB (978 us) and 32 MiB (1060 us), and at >= 1 GiB it is above what any ring can",
        "  reach there (8 x 200 Gb/s / 1.875 per node), so the plugin runs a tree that NCCL's own model",
        "  rates at half its 2-node rate.",
        "- Multi-node families (`net`, `nvls_tree`) have no calibration case on a healthy fabric; they are",
        "  NCCL's own model (efficiency 1.0), except the Echo Azure system, whose 4-node run fits its own.",
        "",
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nccl-version", default=DEFAULT_VERSION, choices=(DEFAULT_VERSION, "2.7.5"))
    parser.add_argument("--out", default=str(ROOT / "docs" / "validation.md"))
    parser.add_argument("--plot", default=str(ROOT / "docs" / "validation_nccl.png"))
    parser.add_argument("--no-legacy", action="store_true", help="skip the 2.7.5 tables (about a minute)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import validation_nccl275

    if args.nccl_version == "2.7.5":
        lines = validation_nccl275.report()
    else:
        lines = report(Path(args.plot))
        if not args.no_legacy:
            legacy = validation_nccl275.report()
            lines += ["", *("#" + line if line.startswith("#") else line for line in legacy)]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
