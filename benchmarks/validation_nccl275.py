"""The NCCL 2.7.5 model's validation (the tables docs/validation.md had before the 2.27 model).

    python benchmarks/validation.py --nccl-version 2.7.5   # this module; about a minute
    python benchmarks/validation_nccl275.py --out other.md

`benchmarks/validation.py` (NCCL 2.27.7 model) appends these tables to docs/validation.md as its last section.

Targets: nccl-tests all_reduce_perf, out-of-place busbw, on Azure ND A100 v4 (8x A100-SXM4-40GB per node
on NVSwitch, one 200 Gb/s HDR InfiniBand NIC per GPU), as logged in the NetX-lab/Echo repository
(nccl-test-log/nccl_8.log and nccl_16.log). Goal (issue 5): within 15% at >= 16 MiB, within 30% at 1 MiB.

The model (commlab.sim.network.nccl): NCCL 2.7.5's tuner picks the algorithm and protocol per size; the chosen
schedule runs on a DGX cluster topology in the flow engine with NCCL's protocol bandwidth factors and
per-hop latencies. Inputs that are not in NCCL's source or a datasheet are calibrated on logs of the same
repository that are *not* validation targets (held out), never on the targets themselves:
- launch: nccl-tests drives all GPUs of a process from one thread, so its launch cost grows with the GPUs
  per process. Fitted as seconds per GPU (least squares through the origin) on the small-message floor
  (median time, 8 B .. 1 KiB) of nccl_2.log and nccl_4.log, minus the model's own time at those sizes.
- NIC bandwidth (model B only): the datasheet's 25 GB/s per NIC (model A) predicts ~195 GB/s busbw for
  two nodes, far above any multi-node log of the repository (~125 GB/s at 16 and 32 GPUs alike); model
  B rescales the NIC bandwidth so the 4-node run (nccl_32.log, >= 1 GiB) matches, then predicts 16 GPUs.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
from pathlib import Path

from commlab.sim.network.nccl import NcclCluster, simulate_nccl_allreduce

MIB = 1 << 20
SOURCE = "NetX-lab/Echo nccl-test-log (Azure ND A100 v4, nccl-tests all_reduce_perf, float, out-of-place)"
# Validation targets: busbw GB/s by size (bytes).
TARGETS = {
    8: {1 * MIB: 25.30, 16 * MIB: 124.60, 128 * MIB: 209.83, 1024 * MIB: 230.86},
    16: {1 * MIB: 19.64, 16 * MIB: 85.66, 128 * MIB: 123.37, 1024 * MIB: 124.50},
}
# Held-out calibration data from the same repository.
FLOOR_US = {  # GPUs in one nccl-tests thread -> out-of-place times (us) at 8 B .. 1 KiB
    2: [8.65, 8.68, 8.76, 8.69, 8.63, 8.51, 9.22, 8.85],  # nccl_2.log
    4: [16.42, 16.32, 16.33, 16.01, 16.05, 16.17, 15.83, 16.10],  # nccl_4.log
}
FOUR_NODE_BUSBW = {1024 * MIB: 125.61, 2048 * MIB: 124.61, 4096 * MIB: 123.70}  # nccl_32.log


def fit_launch() -> float:
    """Seconds of launch per GPU driven by one thread, from the held-out small-message floors."""
    xs, ys = [], []
    for gpus, times in FLOOR_US.items():
        model, _, _ = simulate_nccl_allreduce(NcclCluster(1, gpus_per_node=gpus), 1024)
        xs.append(gpus)
        ys.append(statistics.median(times) * 1e-6 - model.time)
    return sum(x * y for x, y in zip(xs, ys, strict=True)) / sum(x * x for x in xs)


def fit_nic(launch_per_gpu: float) -> float:
    """NIC bandwidth (bytes/s) that makes the held-out 4-node run's large-message busbw match."""
    base = NcclCluster(4, launch=launch_per_gpu)
    scale = []
    for size, measured in FOUR_NODE_BUSBW.items():
        result, _, _ = simulate_nccl_allreduce(base, size)
        scale.append(measured / (result.busbw / 1e9))
    return base.nic_rate() * statistics.mean(scale)


def predict(gpus: int, launch_per_gpu: float, nic_bandwidth: float | None) -> list[dict]:
    nodes = gpus // 8
    per_thread = 8 if nodes == 1 else 1  # nccl_8: one process drives 8 GPUs; nccl_16: one GPU per process
    system = NcclCluster(nodes, launch=launch_per_gpu * per_thread, nic_bandwidth=nic_bandwidth)
    tuner = system.system()
    rows = []
    for size, measured in TARGETS[gpus].items():
        result, algorithm, protocol = simulate_nccl_allreduce(system, size)
        predicted = result.busbw / 1e9
        nccl_own = size / tuner.predicted_time(algorithm, protocol, size) * 2 * (gpus - 1) / gpus / 1e9
        error = (predicted - measured) / measured
        limit = 0.15 if size >= 16 * MIB else 0.30
        rows.append(
            {
                "gpus": gpus,
                "size": size,
                "measured": measured,
                "predicted": predicted,
                "error": error,
                "limit": limit,
                "met": abs(error) <= limit,
                "choice": f"{algorithm}/{protocol}",
                "nccl_model": nccl_own,
                "time_us": result.time * 1e6,
            }
        )
    return rows


def table(rows: list[dict]) -> list[str]:
    lines = [
        "| GPUs | size | measured busbw | predicted | error | target | met | NCCL picks | NCCL's own model |",
        "|---:|---:|---:|---:|---:|---:|:---:|---|---:|",
    ]
    for r in rows:
        size = f"{r['size'] // MIB} MiB" if r["size"] < 1024 * MIB else f"{r['size'] // (1024 * MIB)} GiB"
        lines.append(
            f"| {r['gpus']} | {size} | {r['measured']:.2f} | {r['predicted']:.2f} | "
            f"{r['error'] * 100:+.1f}% | ±{r['limit'] * 100:.0f}% | {'yes' if r['met'] else '**no**'} | "
            f"{r['choice']} | {r['nccl_model']:.2f} |"
        )
    return lines


def report() -> list[str]:
    """The 2.7.5 model's validation as markdown lines."""
    launch = fit_launch()
    nic = fit_nic(launch)
    model_a = predict(8, launch, None) + predict(16, launch, None)
    model_b = predict(16, launch, nic)
    met_a = sum(r["met"] for r in model_a)
    met_b = sum(r["met"] for r in model_a[:4] + model_b)
    lines = [
        "# NCCL 2.7.5 model: validation against published nccl-tests runs",
        "",
        f"Generated by `python benchmarks/validation.py --nccl-version 2.7.5` on "
        f"{datetime.date.today().isoformat()}; do not edit by hand.",
        "",
        f"Measurements: {SOURCE}, busbw in GB/s. Predictions: `commlab.sim.network.nccl` "
        "(NCCL 2.7.5 tuner picks",
        "algorithm and protocol, the flow engine runs the chosen schedule on a `cluster` topology of",
        "A100-40GB nodes with HDR NICs). Error = (predicted - measured) / measured. Target (issue 5): within",
        "15% at >= 16 MiB, within 30% at 1 MiB. \"NCCL's own model\" is the busbw NCCL's tuner itself",
        "predicts for its choice, for comparison.",
        "",
        "Calibrated on held-out logs of the same repository (never on the targets):",
        f"- launch: {launch * 1e6:.2f} us per GPU driven by one nccl-tests thread (nccl_2.log, nccl_4.log",
        "  small-message floors); the 8-GPU run drives 8 GPUs from one thread, the 16-GPU run one.",
        f"- model B only: NIC bandwidth {nic / 1e9:.2f} GB/s instead of the HDR line rate 25 GB/s",
        "  (nccl_32.log, 4 nodes, >= 1 GiB).",
        "",
        "## Model A: datasheet links and NCCL's constants",
        "",
        *table(model_a),
        "",
        f"Targets met: {met_a} of {len(model_a)}.",
        "",
        "## Model B: as A, with the NIC bandwidth calibrated on the held-out 4-node run",
        "",
        *table(model_b),
        "",
        f"Targets met (8 GPUs from model A, 16 GPUs from model B): {met_b} of 8.",
        "",
        "## Reading the misses",
        "",
        "- 8 GPUs, 16 MiB: the model is about 18% fast. NCCL's own tuner is further off (+30%): at this",
        "  size Simple-protocol rings on NVSwitch reach only ~54% of their asymptotic busbw, a ramp that a",
        "  fixed per-step latency plus launch cost (all the model has) does not reproduce. No fudge factor",
        "  is applied to close it.",
        "- 16 GPUs, >= 128 MiB, model A: the logs plateau at ~125 GB/s busbw for 2 and 4 nodes alike,",
        "  while eight 200 Gb/s NICs per node allow ~195 GB/s for NCCL's rail-aligned rings (NCCL's own",
        "  model says the same). Something on that system caps inter-node traffic at ~16 GB/s per NIC; the",
        "  logs do not say what (GPUDirect RDMA off, PCIe topology, NCCL version). Model B measures that",
        "  cap on the held-out 4-node run and then predicts the 2-node points.",
        "",
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", default=str(Path(__file__).resolve().parent.parent / "docs" / "validation_nccl275.md")
    )
    args = parser.parse_args(argv)
    lines = report()
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
