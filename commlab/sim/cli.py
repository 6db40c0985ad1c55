"""`commlab sim`: the network simulator's commands (`collective`, `topology`) and the training
simulator's (`train`) under one command. It sits above both subpackages, like `commlab.cli`."""

from __future__ import annotations

import argparse

from commlab.sim.network.cli import add_network_commands
from commlab.sim.training.cli import add_train_parser


def add_sim_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `commlab sim` and its subcommands on the top-level subparsers."""
    sim = sub.add_parser("sim", help="simulate collectives on modelled networks")
    simsub = sim.add_subparsers(dest="sim_command", metavar="SUBCOMMAND")
    sim.set_defaults(run=lambda args: (sim.print_help(), 2)[1])
    add_network_commands(simsub)
    add_train_parser(simsub)
    return sim
