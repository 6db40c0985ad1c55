"""PNG plots: bus bandwidth against message size per algorithm, and a drawing of a topology.

matplotlib is imported only here, with the non-interactive Agg backend, so the simulator runs without it;
install commlab's `plot` extra to draw.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import networkx as nx

from commlab.errors import CommlabError
from commlab.sim.network.engine import SimResult
from commlab.sim.network.topology import NIC, NPU, Topology
from commlab.sim.network.units import format_size

_MAX_DRAWN_NODES = 5000


def _pyplot():
    try:
        import matplotlib
    except ModuleNotFoundError:
        raise CommlabError("plots need matplotlib: pip install 'commlab[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_busbw(results: Mapping[str, Sequence[SimResult]], path: str | Path, title: str = "") -> Path:
    """One line per algorithm: busbw (GB/s) against message size (log scale), saved as PNG."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, series in results.items():
        series = sorted(series, key=lambda r: r.nbytes)
        ax.plot(
            [r.nbytes for r in series], [r.busbw / 1e9 for r in series], marker="o", markersize=3, label=name
        )
    ax.set_xscale("log", base=2)
    sizes = sorted({r.nbytes for series in results.values() for r in series})
    if sizes:
        ticks = sizes[:: max(1, len(sizes) // 8)]
        ax.set_xticks(ticks, [format_size(s) for s in ticks])
    ax.set_xlabel("message size (bytes)")
    ax.set_ylabel("bus bandwidth (GB/s)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _layout(graph: nx.DiGraph) -> dict:
    coords = nx.get_node_attributes(graph, "coord")
    if len(coords) == graph.number_of_nodes():
        positions = {}
        for v, c in coords.items():
            x = c[0] if len(c) > 0 else 0
            y = c[1] if len(c) > 1 else 0
            z = c[2] if len(c) > 2 else 0
            positions[v] = (x + 0.3 * z, y + 0.3 * z)
        if all(len(c) == 1 for c in coords.values()):
            return nx.circular_layout(graph)
        return positions
    layers = nx.get_node_attributes(graph, "layer")
    if len(layers) == graph.number_of_nodes():
        return nx.multipartite_layout(graph, subset_key="layer", align="horizontal")
    return nx.spring_layout(graph, seed=0)


def draw_topology(topology: Topology, path: str | Path) -> Path:
    """Draw the topology (endpoints, switches and NICs in different colours) to a PNG file."""
    graph = topology.graph
    if graph.number_of_nodes() > _MAX_DRAWN_NODES:
        raise CommlabError(
            f"{topology.name} has {graph.number_of_nodes()} nodes; drawing is limited to {_MAX_DRAWN_NODES}"
        )
    plt = _pyplot()
    positions = _layout(graph)
    kinds = [graph.nodes[v].get("kind", NPU) for v in graph.nodes]
    colours = ["tab:green" if k == NPU else "tab:orange" if k == NIC else "tab:blue" for k in kinds]
    small = graph.number_of_nodes() <= 64
    fig, ax = plt.subplots(figsize=(10, 7))
    nx.draw_networkx(
        graph.to_undirected(as_view=True),
        positions,
        ax=ax,
        node_color=colours,
        node_size=220 if small else 20,
        with_labels=small,
        font_size=6,
        width=0.4,
    )
    ax.set_title(f"{topology.name}: green endpoints, blue switches, orange NICs")
    ax.set_axis_off()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
