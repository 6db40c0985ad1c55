"""Topologies from text: builder specs ('fat-tree:k=8'), TOML/YAML/JSON files, and ASTRA-sim's network.yml.

A commlab topology file lists nodes and links:

    name = "two switches"
    endpoints_forward = false          # optional; default true
    placement = ["a0", "a1", "b0"]     # optional: the endpoint of rank 0, 1, ...
    [[nodes]]
    name = "a0"
    kind = "npu"                       # or "switch", "nic"; omit every kind to make all nodes endpoints
    [[links]]
    src = "a0"
    dst = "s0"
    bandwidth = "50GB/s"               # bytes/s as a number, or a string with a unit
    latency = "500ns"                  # seconds as a number, or a string with a unit
    duplex = true                      # optional; default true: one link each way

An ASTRA-sim analytical network file has, per dimension, `topology` (Ring, FullyConnected or Switch),
`npus_count`, `bandwidth` (GB/s per link and direction) and `latency` (ns). ASTRA-sim's analytical backend
converts GB/s with 2^30 bytes (astra-sim/astra-network-analytical, `bw_GBps_to_Bpns`), and so does this
loader by default, so both simulators see the same links.
"""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path

import networkx as nx

from commlab.errors import InvalidArgumentError, TopologyError, invalid
from commlab.sim.network.topology import BUILDERS, NPU, SWITCH, Topology
from commlab.sim.network.units import parse_bandwidth, parse_time

SUFFIXES = (".toml", ".yaml", ".yml", ".json")
ASTRA_KINDS = ("Ring", "FullyConnected", "Switch")
ASTRA_GB = float(1 << 30)


def read_mapping(path: str | Path) -> dict:
    """Parse a .toml, .yaml/.yml or .json file into a dict, with errors that name the file."""
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise invalid("path", str(path), f"a file ending in {', '.join(SUFFIXES)}")
    try:
        text = path.read_text()
    except OSError as error:
        raise TopologyError(f"cannot read {path}: {error.strerror or error}") from None
    try:
        if path.suffix.lower() == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                try:
                    import tomli as tomllib  # type: ignore[no-redef]
                except ModuleNotFoundError:
                    raise TopologyError(
                        f"reading {path} needs Python 3.11+ or the tomli package (pip install tomli)"
                    ) from None
            data = tomllib.loads(text)
        elif path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except TopologyError:
        raise
    except Exception as error:  # each parser has its own error class
        kind = {".toml": "TOML", ".json": "JSON"}.get(path.suffix.lower(), "YAML")
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise TopologyError(f"{path} is not valid {kind}: {first}") from None
    if not isinstance(data, dict):
        raise TopologyError(f"{path}: expected a table at the top level, got {type(data).__name__}")
    return data


def is_astra_network(data: dict) -> bool:
    """Whether a mapping looks like an ASTRA-sim analytical network file."""
    return "npus_count" in data and "topology" in data


def astra_network(
    topology: list[str],
    npus_count: list[int],
    bandwidth: list[float],
    latency: list[float],
    gb: float = ASTRA_GB,
) -> nx.DiGraph:
    """The multi-dimensional network of an ASTRA-sim network.yml: NPU i has coordinates with dimension 0
    fastest; in every dimension, NPUs equal in all other coordinates form a Ring, a FullyConnected group or
    hang off one Switch, with that dimension's bandwidth (GB/s, per link and direction) and latency (ns)."""
    dims = len(npus_count)
    for name, value in (("topology", topology), ("bandwidth", bandwidth), ("latency", latency)):
        if not isinstance(value, list) or len(value) != dims:
            raise TopologyError(
                f"network.yml: {name} must list one value per dimension ({dims}), got {value!r}"
            )
    for d in range(dims):
        if topology[d] not in ASTRA_KINDS:
            raise TopologyError(
                f"network.yml: topology[{d}]={topology[d]!r}; accepted: {', '.join(ASTRA_KINDS)}"
            )
        n = npus_count[d]
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise TopologyError(f"network.yml: npus_count[{d}]={n!r}; accepted: an integer >= 1")
        for name, value, low in (("bandwidth", bandwidth[d], 0.0), ("latency", latency[d], -1.0)):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not ok or value <= low or (name == "latency" and value < 0):
                raise TopologyError(f"network.yml: {name}[{d}]={value!r}; accepted: a number > 0 ({name})")
    graph = nx.DiGraph(
        name="astra-sim " + "_".join(f"{t}{n}" for t, n in zip(topology, npus_count, strict=True))
    )
    graph.graph["endpoints_forward"] = True
    size = math.prod(npus_count)
    strides = [math.prod(npus_count[:d]) for d in range(dims)]
    for i in range(size):
        graph.add_node(f"npu{i}", kind=NPU, layer=0)
    for d in range(dims):
        n, bw, lat = npus_count[d], bandwidth[d] * gb, latency[d] * 1e-9
        if n == 1:
            continue
        for base in range(size):
            if (base // strides[d]) % n:
                continue  # one group per base NPU with coordinate 0 in dimension d
            members = [f"npu{base + j * strides[d]}" for j in range(n)]
            if topology[d] == "Ring":
                pairs = [(members[j], members[(j + 1) % n]) for j in range(n if n > 2 else 1)]
            elif topology[d] == "FullyConnected":
                pairs = [(members[a], members[b]) for a in range(n) for b in range(a + 1, n)]
            else:
                hub = f"dim{d}.switch{base}"
                graph.add_node(hub, kind=SWITCH, layer=1 + d)
                pairs = [(m, hub) for m in members]
            for a, b in pairs:
                graph.add_edge(a, b, bandwidth=bw, latency=lat)
                graph.add_edge(b, a, bandwidth=bw, latency=lat)
    return graph


def graph_from_mapping(data: dict, source: str = "topology") -> tuple[nx.DiGraph, list | None]:
    """A graph (and placement, if given) from a commlab topology mapping or an ASTRA-sim network mapping."""
    if is_astra_network(data):
        try:
            return astra_network(
                data["topology"], data["npus_count"], data["bandwidth"], data["latency"]
            ), None
        except KeyError as missing:
            raise TopologyError(f"{source}: an ASTRA-sim network needs {missing}") from None
    known = {"name", "endpoints_forward", "placement", "nodes", "links"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise TopologyError(
            f"{source}: unknown keys {unknown}; accepted: {', '.join(sorted(known))} "
            "(or an ASTRA-sim network.yml with topology, npus_count, bandwidth, latency)"
        )
    links = data.get("links")
    if not isinstance(links, list) or not links:
        raise TopologyError(
            f"{source}: needs a non-empty list of links (each with src, dst, bandwidth, latency)"
        )
    graph = nx.DiGraph(name=str(data.get("name", Path(source).stem)))
    graph.graph["endpoints_forward"] = bool(data.get("endpoints_forward", True))
    nodes = data.get("nodes", [])
    if not isinstance(nodes, list):
        raise TopologyError(f"{source}: nodes must be a list of tables with name and kind")
    for i, node in enumerate(nodes):
        if not isinstance(node, dict) or "name" not in node:
            raise TopologyError(f"{source}: nodes[{i}] needs a name")
        kind = node.get("kind", NPU)
        if kind not in (NPU, SWITCH, "nic"):
            raise TopologyError(f"{source}: nodes[{i}] kind={kind!r}; accepted: 'npu', 'switch', 'nic'")
        host = {"host": str(node["host"])} if "host" in node else {}  # the host an endpoint sits in
        graph.add_node(node["name"], kind=kind, **host)
    declared = set(graph.nodes)
    for i, link in enumerate(links):
        where = f"{source}: links[{i}]"
        if not isinstance(link, dict):
            raise TopologyError(f"{where} must be a table with src, dst, bandwidth, latency")
        missing = [k for k in ("src", "dst", "bandwidth", "latency") if k not in link]
        if missing:
            raise TopologyError(f"{where} lacks {', '.join(missing)}")
        extra = sorted(set(link) - {"src", "dst", "bandwidth", "latency", "duplex"})
        if extra:
            raise TopologyError(
                f"{where} has unknown keys {extra}; accepted: src, dst, bandwidth, latency, duplex"
            )
        for end in ("src", "dst"):
            if declared and link[end] not in declared:
                raise TopologyError(f"{where} {end}={link[end]!r} is not a declared node")
        try:
            bw = parse_bandwidth(link["bandwidth"])
            lat = parse_time(link["latency"])
        except InvalidArgumentError as error:
            raise TopologyError(f"{where}: {error}") from None
        graph.add_edge(link["src"], link["dst"], bandwidth=bw, latency=lat)
        if link.get("duplex", True):
            graph.add_edge(link["dst"], link["src"], bandwidth=bw, latency=lat)
    placement = data.get("placement")
    if placement is not None and not isinstance(placement, list):
        raise TopologyError(f"{source}: placement must be a list of endpoint names")
    return graph, placement


def load_topology(path: str | Path, routing: str = "ecmp") -> Topology:
    """A Topology from a commlab topology file or an ASTRA-sim network.yml (.toml, .yaml/.yml, .json)."""
    graph, placement = graph_from_mapping(read_mapping(path), str(path))
    return Topology(graph, placement, routing)


_INTS = {"n", "k", "nodes", "gpus", "gpus_per_node", "leaf_ports", "spines"}
_BANDWIDTHS = {"bandwidth", "nvlink_bandwidth", "nic_bandwidth"}


def _builder_arguments(builder, text: str, spec: str) -> dict:
    """Keyword arguments for `builder` from 'key=value,key=value'."""
    accepted = [p for p in inspect.signature(builder).parameters]
    kwargs: dict = {}
    for position, item in enumerate(filter(None, text.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep and position == 0 and key.isdigit() and accepted and accepted[0] in _INTS:
            key, sep, value = accepted[0], "=", key  # 'local:4' is 'local:n=4'; 'ring:8' is 'ring:n=8'
        key = key.strip().replace("-", "_")
        if not sep or key not in accepted:
            raise invalid(
                "topology", spec, f"parameters of the form key=value with keys {', '.join(accepted)}"
            )
        value = value.strip()
        if key in _INTS:
            if not value.isdigit():
                raise invalid(key, value, "a positive integer")
            kwargs[key] = int(value)
        elif key in _BANDWIDTHS:
            kwargs[key] = parse_bandwidth(value, key)
        elif key == "latency":
            kwargs[key] = parse_time(value, key)
        elif key == "dims":
            parts = value.lower().split("x")
            if not all(p.isdigit() for p in parts):
                raise invalid("dims", value, "sizes joined by x, like 4x4x4")
            kwargs[key] = tuple(int(p) for p in parts)
        elif key == "oversubscription":
            try:
                kwargs[key] = float(value)
            except ValueError:
                raise invalid(key, value, "a number > 0") from None
        else:
            kwargs[key] = value
    return kwargs


def parse_topology(spec: str, routing: str = "ecmp") -> Topology:
    """A Topology from 'builder:key=value,...' (e.g. 'fat-tree:k=8', 'torus:dims=4x4x4', 'cluster:nodes=2')
    or from a file path (.toml, .yaml/.yml, .json; an ASTRA-sim network.yml works too)."""
    if not isinstance(spec, str) or not spec:
        raise invalid("topology", spec, f"a builder spec ({', '.join(BUILDERS)}) or a topology file")
    if Path(spec).suffix.lower() in SUFFIXES:
        return load_topology(spec, routing)
    name, _, params = spec.partition(":")
    name = name.strip().lower()
    if name not in BUILDERS:
        raise invalid(
            "topology", spec, f"a builder ({', '.join(BUILDERS)}) with key=value parameters, or a file"
        )
    builder = BUILDERS[name]
    kwargs = _builder_arguments(builder, params, spec)
    required = [
        p.name
        for p in inspect.signature(builder).parameters.values()
        if p.default is inspect.Parameter.empty and p.name not in kwargs
    ]
    if required:
        raise invalid("topology", spec, f"{name} with {', '.join(f'{r}=...' for r in required)}")
    return Topology(builder(**kwargs), routing=routing)
