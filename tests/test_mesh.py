"""The dp x pp x tp mesh: coordinates (TP innermost), the groups of every axis, and clear layout errors."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import commlab
from commlab.errors import InvalidArgumentError
from commlab.models import GPTConfig, ViTConfig
from commlab.parallel.mesh import axis_groups, check_layout, check_model, coordinates, layout_from, rank_at
from tests.test_tensor_parallel import mesh_of


def test_tp_is_innermost_and_coordinates_round_trip():
    dp, pp, tp = 2, 3, 4
    seen = set()
    for rank in range(dp * pp * tp):
        d, p, t = coordinates(rank, pp, tp)
        assert rank_at(d, p, t, pp, tp) == rank
        seen.add((d, p, t))
    assert len(seen) == 24
    assert [coordinates(r, pp, tp) for r in range(5)] == [
        (0, 0, 0),
        (0, 0, 1),
        (0, 0, 2),
        (0, 0, 3),
        (0, 1, 0),
    ]


def test_axis_groups_of_a_2x2x2_mesh():
    groups = axis_groups(dp=2, pp=2, tp=2)
    assert groups["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]  # neighbours
    assert groups["pp"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert groups["dp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert groups["embedding"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    deep = axis_groups(dp=1, pp=4, tp=2)
    assert deep["pp"] == [[0, 2, 4, 6], [1, 3, 5, 7]] and deep["embedding"] == [[0, 6], [1, 7]]
    assert "embedding" not in axis_groups(dp=4, pp=1, tp=2)
    for axis, size in (("tp", 2), ("pp", 4), ("dp", 1)):  # every rank in exactly one group per axis
        assert sorted(r for g in deep[axis] for r in g) == list(range(8))
        assert all(len(g) == size for g in deep[axis])


@pytest.mark.parametrize(
    ("layout", "words"),
    [
        ((2, 2, 2), ["2 x 2 x 2 = 8", "world size 4"]),
        ((0, 2, 2), ["dp=0", "positive int"]),
        ((1, 2, 1.5), ["tp=1.5"]),
    ],
)
def test_bad_layouts_give_clear_errors(layout, words):
    with pytest.raises(InvalidArgumentError) as info:
        check_layout(4, *layout)
    for word in words:
        assert word in str(info.value)


def test_layout_from_fills_in_dp():
    assert layout_from(8, tp=2, pp=2) == (2, 2, 2)
    assert layout_from(4) == (4, 1, 1)
    with pytest.raises(InvalidArgumentError, match="tp x pp=3"):
        layout_from(8, tp=3)


def test_models_that_do_not_split_give_clear_errors():
    check_model(GPTConfig.preset("tiny"), tp=2, pp=2)
    check_model(ViTConfig.preset("digits"), tp=4, pp=4)
    with pytest.raises(InvalidArgumentError, match=r"config.n_head=2 .*multiple of tp=4"):
        check_model(GPTConfig.preset("tiny"), tp=4, pp=1)
    with pytest.raises(InvalidArgumentError, match=r"config\.vocab_size=50257"):
        check_model(GPTConfig.preset("gpt3-125m"), tp=2, pp=1)
    with pytest.raises(InvalidArgumentError, match=r"pp=3.*n_layer=2"):
        check_model(GPTConfig.preset("tiny"), tp=1, pp=3)


def mesh_facts(dp: int, pp: int, tp: int) -> dict:
    """Runs on every rank: coordinates, neighbours, and each axis group's sum of global ranks."""
    mesh = mesh_of(dp, pp, tp)
    sums = {}
    for axis in ("tp", "pp", "dp"):
        value = torch.tensor([float(dist.get_rank())])
        commlab.all_reduce(value, group=getattr(mesh, f"{axis}_group"))
        sums[axis] = value.item()
    return {
        "coords": (mesh.dp_rank, mesh.pp_rank, mesh.tp_rank),
        "sums": sums,
        "stages": (mesh.prev_stage, mesh.next_stage, mesh.is_first_stage, mesh.is_last_stage),
        "embedding": mesh.embedding_group is not None and mesh.embedding_group.size,
        "ranks": mesh.ranks("pp"),
    }


def test_mesh_groups_on_four_ranks(rank_pools):
    facts = rank_pools(4).run(mesh_facts, 1, 2, 2)
    assert [f["coords"] for f in facts] == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1)]
    assert [f["sums"]["tp"] for f in facts] == [1, 1, 5, 5]
    assert [f["sums"]["pp"] for f in facts] == [2, 4, 2, 4]
    assert [f["sums"]["dp"] for f in facts] == [0, 1, 2, 3]
    assert [f["stages"] for f in facts] == [(None, 1, True, False)] * 2 + [(0, None, False, True)] * 2
    assert [f["embedding"] for f in facts] == [2, 2, 2, 2]
    assert facts[3]["ranks"] == [1, 3]


def test_mesh_groups_keep_the_timeout_of_the_default_group():
    """init_process_group(timeout=7 s) reaches every mesh group (torch's new_group would give each the
    gloo default of 30 minutes, which commlab reads as its own 60 s): a job's short timeout must bound
    the pipeline's receives and DataParallel's allreduces too. In a fresh process: it owns the group."""
    import subprocess
    import sys

    code = (
        "from datetime import timedelta; import torch.distributed as dist; "
        "from commlab.parallel.mesh import Mesh; "
        "dist.init_process_group('gloo', store=dist.HashStore(), rank=0, world_size=1, "
        "timeout=timedelta(seconds=7)); "
        "m = Mesh(); print(m.dp_group.timeout, m.pp_group.timeout, m.tp_group.timeout, m.world_group.timeout)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["7.0"] * 4
