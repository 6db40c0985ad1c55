"""The `commlab` command line: version, the algorithm listing, and argument errors."""

from __future__ import annotations

import json

import pytest

from commlab import __version__
from commlab.cli import main
from commlab.collectives.algorithms import ALGORITHMS
from commlab.collectives.schedule import OPS


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"commlab {__version__}"


def test_algorithms_lists_every_op_and_algorithm(capsys):
    assert main(["algorithms"]) == 0
    out = capsys.readouterr().out
    for op in OPS:
        assert f"\n{op}\n" in out
    for name in ALGORITHMS:
        assert f"  {name} " in out


def test_algorithms_json_matches_the_registry(capsys):
    assert main(["algorithms", "--json", "--ranks", "5", "--bytes", "4096"]) == 0
    rows = json.loads(capsys.readouterr().out)
    expected = {(op, name) for name, a in ALGORITHMS.items() for op in OPS if a.supports(op)}
    assert {(r["op"], r["algorithm"]) for r in rows} == expected
    assert all(r["predicted_us"] > 0 for r in rows)


def test_bad_ranks_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["algorithms", "--ranks", "0"])
    assert exit_info.value.code == 2
    assert "accepted: an integer >= 1" in capsys.readouterr().err


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "algorithms" in capsys.readouterr().out
