"""Starting the ranks of `commlab calibrate` and what each runs; rank 0 fits, saves and reports.

python -m commlab.calibrate.worker   (the configuration in $COMMLAB_CALIBRATE_CONFIG)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback

from commlab.calibrate import CONFIG_ENV, CalibrateConfig

PRINT_JSON_ENV = "COMMLAB_CALIBRATE_JSON"


def launch(config: CalibrateConfig, print_json: bool = False) -> int:
    """Start `config.ranks` ranks of this module (gloo processes or `mpiexec -n`); wait for them all."""
    from commlab.bench.launch import find_mpiexec, free_port, wait_for

    env = dict(os.environ)
    env[CONFIG_ENV] = config.to_env()
    env[PRINT_JSON_ENV] = "1" if print_json else "0"
    env.setdefault("OMP_NUM_THREADS", "1")
    command = [sys.executable, "-m", "commlab.calibrate.worker"]
    if config.backend == "mpi":
        procs = [subprocess.Popen([find_mpiexec(), "-n", str(config.ranks), *command], env=env)]
    else:
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(config.ranks))
        procs = []
        for rank in range(config.ranks):
            rank_env = dict(env, RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(config.ranks))
            out = None if rank == 0 else subprocess.DEVNULL
            procs.append(subprocess.Popen(command, env=rank_env, stdout=out))
    return wait_for(procs)


def run_worker(config: CalibrateConfig, print_json: bool = False) -> None:
    """Measure on every rank; on rank 0 fit, save the profile and print the report (or the JSON)."""
    from commlab.calibrate.measure import join, measure
    from commlab.calibrate.profile import build_calibration, machine, report

    group = join(config)
    try:
        if group.world < 2:
            raise ValueError(f"calibration needs at least 2 ranks; this run has {group.world}")
        measurements = measure(group, config)
        if group.rank == 0:
            calibration = build_calibration(config, measurements, machine(config, group.world, group.detail))
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
    try:
        run_worker(CalibrateConfig.from_env(), os.environ.get(PRINT_JSON_ENV) == "1")
    except Exception:
        traceback.print_exc()
        sys.stderr.flush()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
