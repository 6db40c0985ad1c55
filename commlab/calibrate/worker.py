"""Starting the ranks of `commlab calibrate` and what each runs; rank 0 fits, saves and reports.

python -m commlab.calibrate.worker   (the configuration in $COMMLAB_CALIBRATE_CONFIG)
"""

from __future__ import annotations

import json
import os
import sys

from commlab.bench.launch import start_ranks, worker_main
from commlab.calibrate.config import CONFIG_ENV, CalibrateConfig
from commlab.calibrate.measure import join, measure, measure_algorithms
from commlab.calibrate.profile import build_calibration, machine, report

PRINT_JSON_ENV = "COMMLAB_CALIBRATE_JSON"


def launch(config: CalibrateConfig, print_json: bool = False) -> int:
    """Start `config.ranks` ranks of this module (gloo processes or `mpiexec -n`); wait for them all."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env[CONFIG_ENV] = config.to_env()
    env[PRINT_JSON_ENV] = "1" if print_json else "0"
    return start_ranks(config.backend, config.ranks, ("-m", "commlab.calibrate.worker"), env)


def run_worker(config: CalibrateConfig, print_json: bool = False) -> None:
    """Measure on every rank; on rank 0 fit, save the profile and print the report (or the JSON)."""
    group = join(config)
    try:
        if group.world < 2:
            raise ValueError(f"calibration needs at least 2 ranks; this run has {group.world}")
        measurements = measure(group, config)
        description = machine(config, group.world, group.detail)
        if config.algorithms:  # every rank fits the same numbers: the segments of the timed algorithms
            fitted = build_calibration(config, measurements, description)
            measurements["algorithms"] = measure_algorithms(group, config, fitted)
        if group.rank == 0:
            calibration = build_calibration(config, measurements, description)
            calibration.save(config.output)
            if print_json:
                print(json.dumps(calibration.to_dict(), indent=1))
            else:
                print(report(calibration))
                print(f"profile written to {config.output}")
            sys.stdout.flush()
        group.barrier()
    finally:
        group.close()


def main() -> int:
    return worker_main(lambda: run_worker(CalibrateConfig.from_env(), os.environ.get(PRINT_JSON_ENV) == "1"))


if __name__ == "__main__":
    sys.exit(main())
