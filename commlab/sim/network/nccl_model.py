"""Predicted NCCL collective times on preset systems, by NCCL version: NCCL's choice, then its cost.

For the current release (`DEFAULT_VERSION`, NCCL 2.27.7, `nccl_tuner`) every collective NCCL tunes
(allreduce, allgather, reduce-scatter, broadcast, reduce) is predicted as NCCL's tuner sees it: NCCL picks
the (algorithm, protocol) of least modelled time; the prediction is that choice's modelled time with two
kinds of fitted constants, fitted only on calibration cases (`benchmarks/validation.py`):
- `efficiency[family]`: achieved / modelled bandwidth for a family of algorithms (`FAMILIES`: NVLink rings
  and trees on one node, NVLS on one node, rings/trees/PAT/CollNet across nodes, NVLS tree across
  nodes), optionally per system (a system whose measured fabric is slower than its datasheet);
- `launch`: seconds per call and per GPU its host thread drives, outside NCCL's model: one thread that
  drives g GPUs (nccl-tests `-g g`, a single-process launcher) launches their g kernels one after
  another in each call (ncclGroupStart/End), so the call costs g launches (`NcclModel.gpus_per_thread`);
- `latency_scale`: one factor on NCCL's modelled latencies (its per-step hop latencies are coarse).
All-to-all, which NCCL runs as grouped sends and receives without a tuner, is priced as one round of
concurrent point-to-point transfers: each rank's bytes to peers on its node over NVLink, to other nodes
over its share of the node's NICs, the slower of the two plus one Simple-protocol network latency.

`--nccl-version 2.7.5` keeps the earlier model (`commlab.sim.network.nccl`: NCCL 2.7.5's tuner, allreduce
only, its schedule run in the flow engine), so docs/validation.md's 2.7.5 tables still reproduce.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from commlab.errors import invalid
from commlab.shared.ops import op_info
from commlab.sim.network import nccl_tuner as tuner
from commlab.sim.network.nccl import NcclCluster, NcclSystem, simulate_nccl_allreduce
from commlab.sim.network.systems import NodePreset, system

VERSIONS = ("2.27.7", "2.7.5")
DEFAULT_VERSION = "2.27.7"
FAMILIES = ("nvlink", "nvls", "net", "nvls_tree")
OPS = (*tuner.FUNCTIONS, "alltoall")


def check_version(version: str) -> str:
    """`version` if the model knows it, else InvalidArgumentError listing the accepted versions."""
    if version not in VERSIONS:
        raise invalid("nccl_version", version, VERSIONS)
    return version


def family(algorithm: str, nnodes: int) -> str:
    """Which efficiency constant prices `algorithm` on `nnodes` nodes."""
    if algorithm in ("nvls", "nvls_tree"):
        return "nvls" if nnodes == 1 else "nvls_tree"
    return "nvlink" if nnodes == 1 else "net"


@dataclass(frozen=True)
class Calibration:
    """Fitted constants: efficiency per family (default 1: NCCL's own model), per-system overrides
    ({system name: {family: efficiency}}), launch seconds per call and driven GPU, and a scale on NCCL's
    modelled latencies (1: NCCL's own)."""

    efficiency: dict[str, float] = field(default_factory=dict)
    per_system: dict[str, dict[str, float]] = field(default_factory=dict)
    launch: float = 0.0
    latency_scale: float = 1.0

    def factor(self, system_name: str, fam: str) -> float:
        own = self.per_system.get(system_name, {})
        return own.get(fam, self.efficiency.get(fam, 1.0))


# The constants `python benchmarks/validation.py` fitted on its calibration cases (2026-12-07): what the
# CLI uses. Refit there and copy here when cases or the model change. `launch` is per GPU a host thread
# drives (NcclModel.gpus_per_thread; 1 for the usual one process per GPU).
FITTED = Calibration(
    efficiency={"nvlink": 0.951, "nvls": 0.797},
    per_system={"azure-nd-a100-v4": {"net": 0.662}},
    launch=2.772e-6,
    latency_scale=0.735,
)


@dataclass(frozen=True)
class Prediction:
    """One predicted collective: seconds, NCCL's (algorithm, protocol) and its own modelled seconds."""

    op: str
    nbytes: int
    nranks: int
    time: float
    algorithm: str
    protocol: str
    nccl_time: float

    @property
    def algbw(self) -> float:
        return self.nbytes / self.time if self.time > 0 else float("inf")

    @property
    def busbw(self) -> float:
        return self.algbw * op_info(self.op).bus_factor(self.nranks)


@dataclass(frozen=True)
class NcclModel:
    """`nodes` nodes of a preset `system` running NCCL `version`; `collnet` when a SHARP (CollNet) plugin
    is enabled; `nvls` False to model NCCL_NVLS_ENABLE=0; `algorithms`/`protocols` to model NCCL_ALGO and
    NCCL_PROTO (NCCL's list syntax: the tuner picks among what they allow). `calibration`: the fitted
    constants (`FITTED`; `Calibration()` is NCCL's own model); the 2.7.5 model keeps its own constants."""

    system: NodePreset
    nodes: int
    version: str = DEFAULT_VERSION
    calibration: Calibration = FITTED
    collnet: bool = False
    nvls: bool = True
    algorithms: str | None = None  # NCCL_ALGO as NCCL reads it ("Ring,Tree", "^NVLS"); None: all
    protocols: str | None = None  # NCCL_PROTO ("Simple", "^LL128"); None: all
    gpus_per_thread: int = 1  # GPUs one host thread drives (nccl-tests -g): launches per call

    @classmethod
    def of(cls, system_name: str | NodePreset, nodes: int, **kwargs) -> NcclModel:
        if not isinstance(nodes, int) or isinstance(nodes, bool) or nodes < 1:
            raise invalid("nodes", nodes, "an integer >= 1")
        return cls(system(system_name), nodes, **kwargs)

    def __post_init__(self) -> None:
        check_version(self.version)
        if self.version == "2.7.5" and (self.algorithms or self.protocols):
            raise invalid("version", self.version, "2.27.7 for NCCL_ALGO / NCCL_PROTO settings")
        tuner.parse_selection("NCCL_ALGO", self.algorithms)  # a bad setting fails here, not at predict
        g = self.gpus_per_thread
        if not isinstance(g, int) or isinstance(g, bool) or not 1 <= g <= self.system.gpus:
            raise invalid("gpus_per_thread", g, f"an integer from 1 to {self.system.gpus} (GPUs per node)")
        tuner.parse_selection("NCCL_PROTO", self.protocols)

    @property
    def nranks(self) -> int:
        return self.nodes * self.system.gpus

    def inputs(self) -> tuner.TunerInputs:
        """NCCL 2.27's view of the communicator (graphs from `nccl_tuner.graphs_for`)."""
        acc, nic = self.system.accelerator(), self.system.nic_link()
        arch = tuner.arch_of(acc.nvlink.name)
        graphs = tuner.graphs_for(
            arch,
            self.system.gpus,
            self.nodes,
            acc.nccl_nvlink_bandwidth / 1e9,
            nic.bandwidth / 1e9,
            self.system.nics,
            self.system.net_latency_us,
            self.system.nvswitch,
        )
        return tuner.TunerInputs(
            self.nranks,
            self.nodes,
            arch,
            graphs,
            nvls=self.nvls and self.system.nvswitch,
            collnet=self.collnet,
            cpu_vendor=self.system.cpu_vendor,
            algorithms=tuner.parse_selection("NCCL_ALGO", self.algorithms),
            protocols=tuner.parse_selection("NCCL_PROTO", self.protocols),
        )

    def choose(self, op: str, nbytes: int) -> tuple[str, str, float]:
        """NCCL's (algorithm, protocol) for `op` on `nbytes` and its own modelled time (seconds)."""
        self._check(op, nbytes)
        if self.version == "2.7.5":
            legacy = self._legacy()
            algorithm, protocol = legacy.choose(nbytes)
            return algorithm, protocol, legacy.predicted_time(algorithm, protocol, nbytes)
        if op == "alltoall":
            return "p2p", "Simple", self._alltoall(nbytes, 1.0)
        algorithm, protocol, us = tuner.choose(self.inputs(), op, nbytes)
        return algorithm, protocol, us * 1e-6

    def predict(self, op: str, nbytes: int) -> Prediction:
        """Predicted seconds of `op` on a buffer of `nbytes` (nccl-tests' size), NCCL's choice, its time."""
        algorithm, protocol, nccl_time = self.choose(op, nbytes)
        cal = self.calibration
        launch = cal.launch * self.gpus_per_thread
        if self.version == "2.7.5":
            # The earlier model: NCCL 2.7.5's choice, its schedule run in the flow engine.
            legacy = NcclCluster(
                self.nodes, self.system.gpu, self.system.nic, self.system.gpus, launch=launch
            )
            result, _, _ = simulate_nccl_allreduce(legacy, nbytes)
            time = result.time
        elif self.nranks == 1:
            time = nccl_time + launch
        elif op == "alltoall":
            time = self._alltoall(nbytes, cal.factor(self.system.name, family("ring", self.nodes))) + launch
        else:
            lat, bw = tuner.time_parts(self.inputs(), op, algorithm, protocol, nbytes)
            eff = cal.factor(self.system.name, family(algorithm, self.nodes))
            time = (lat * cal.latency_scale + nbytes / (1000 * bw * eff)) * 1e-6 + launch
        return Prediction(op, nbytes, self.nranks, time, algorithm, protocol, nccl_time)

    def _alltoall(self, nbytes: int, efficiency: float) -> float:
        """One round of concurrent sends: a rank's blocks to its node over NVLink, the rest over its NICs."""
        n, g = self.nranks, self.system.gpus
        if n == 1:
            return 0.0
        acc, nic = self.system.accelerator(), self.system.nic_link()
        block = nbytes / n
        intra = block * (g - 1) / (acc.nccl_nvlink_bandwidth * efficiency)
        inter = 0.0
        if self.nodes > 1:
            per_gpu_nic = nic.bandwidth * self.system.nics / g
            inter = block * (n - g) / (per_gpu_nic * efficiency)
        lat = tuner.HW_LATENCY["net" if self.nodes > 1 else "nvlink"]["ring"][2]
        return lat * 1e-6 + max(intra, inter)

    def _legacy(self) -> NcclSystem:
        """NCCL 2.7.5's tuner (commlab.sim.network.nccl) for this system."""
        if self.system.nics != self.system.gpus:
            raise invalid(
                "system",
                self.system.name,
                "a system with one NIC per GPU for --nccl-version 2.7.5 (its model has no other layout)",
            )
        return NcclCluster(self.nodes, self.system.gpu, self.system.nic, self.system.gpus).system()

    def _check(self, op: str, nbytes: int) -> None:
        accepted = ("allreduce",) if self.version == "2.7.5" else OPS
        if op not in accepted:
            raise invalid("op", op, f"{', '.join(accepted)} (NCCL {self.version} model)")
        if not isinstance(nbytes, int) or nbytes < 1:
            raise invalid("nbytes", nbytes, "an integer >= 1")
