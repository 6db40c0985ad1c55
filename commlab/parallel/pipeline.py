"""Pipeline parallelism: a model's blocks split into stages, microbatches run by GPipe or 1F1B.

`Pipeline(model, mesh, micro_batches, schedule)` keeps this rank's stage of `model` (a GPT or ViT: any
module with embed(), blocks, head(), loss() and stage_parts()): the embedding on the first stage, head and
loss on the last, blocks balanced by parameter count or given per stage. `train_step(inputs, targets)`
splits the batch into microbatches and runs the schedule; activations go forward and their gradients
back point-to-point (p2p.py). Loss is scaled by 1/m, so the accumulated gradients are those of the
whole batch. With dp > 1 the stage is wrapped in DataParallel and gradients are synced during the last
microbatch's backward only; a tied embedding's two copies (first and last stage) are then summed, and
with sequence parallelism the norms' gradients over TP.

Schedules, as each stage's list of (F|B, microbatch):
  gpipe: every forward, then every backward: a stage holds all m microbatches' activations.
  1f1b:  pp - stage - 1 warm-up forwards, then alternate one forward, one backward, then cool-down
         backwards: a stage never holds more than pp - stage microbatches. Same bubble, (p-1)/(m+p-1).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from commlab.collectives.api import all_reduce
from commlab.errors import invalid
from commlab.parallel.data import DataParallel
from commlab.parallel.memory import ActivationMeter
from commlab.parallel.mesh import Mesh, check_model
from commlab.parallel.p2p import PointToPoint, encode_header
from commlab.parallel.sequence import sync_sequence_parallel_grads, uses_sequence_parallel
from commlab.parallel.tensor import is_tensor_parallel
from commlab.shared.pipeline_order import FORWARD, pipeline_order

SCHEDULES = ("gpipe", "1f1b")  # of `commlab.shared.pipeline_order.SCHEDULES`: one model chunk per stage


def balanced_partition(costs: Sequence[int], stages: int, first: int = 0, last: int = 0) -> list[int]:
    """Blocks per stage (contiguous, at least one each) minimizing the largest stage's cost.

    costs: each block's cost (parameters); first / last: what the first and last stage hold besides.
    """
    n = len(costs)
    if not isinstance(stages, int) or not 1 <= stages <= n:
        raise invalid("pp", stages, f"an int in [1, n_layer={n}] (each stage holds a block)")
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[j][i]: the smallest possible maximum over stages 0..j-1 holding blocks 0..i-1; cut: argmin.
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0
    for j in range(1, stages + 1):
        extra = (first if j == 1 else 0) + (last if j == stages else 0)
        for i in range(j, n - (stages - j) + 1):
            for k in range(j - 1, i):
                value = max(best[j - 1][k], prefix[i] - prefix[k] + extra)
                if value < best[j][i]:
                    best[j][i], cut[j][i] = value, k
    counts, i = [], n
    for j in range(stages, 0, -1):
        counts.append(i - cut[j][i])
        i = cut[j][i]
    return counts[::-1]


def schedule_actions(schedule: str, stage: int, stages: int, micro_batches: int) -> list[tuple[str, int]]:
    """The ordered (kind, microbatch) actions of one stage; kind 'F' (forward) or 'B' (backward). The
    order is `commlab.shared.pipeline_order`'s, the one the training simulator times."""
    if schedule not in SCHEDULES:
        raise invalid("schedule", schedule, SCHEDULES)
    order = pipeline_order(schedule, stage, stages, micro_batches)
    return [("F" if kind == FORWARD else "B", microbatch) for kind, microbatch, _ in order]


class PipelineStage(nn.Module):
    """One stage's part of `model`: its blocks, plus the embedding (first stage) and head (last stage).

    The model is cut in place: other blocks are dropped and the parts no stage of ours needs set to None.
    """

    def __init__(
        self, model: nn.Module, stage: int, stages: int, layers_per_stage: Sequence[int] | None = None
    ) -> None:
        super().__init__()
        for attr in ("embed", "blocks", "head", "loss", "stage_parts"):
            if not hasattr(model, attr):
                raise invalid("model", type(model).__name__, "a GPT or ViT (embed, blocks, head, loss)")
        first, last = model.stage_parts()
        size = {name: sum(p.numel() for p in _parameters(getattr(model, name))) for name in {*first, *last}}
        blocks = list(model.blocks)
        if layers_per_stage is None:
            costs = [sum(p.numel() for p in b.parameters()) for b in blocks]
            counts = balanced_partition(
                costs, stages, sum(size[n] for n in first), sum(size[n] for n in last)
            )
        else:
            counts = list(layers_per_stage)
            if len(counts) != stages or sum(counts) != len(blocks) or min(counts) < 0:
                raise invalid(
                    "layers_per_stage", counts, f"{stages} ints >= 0 summing to n_layer={len(blocks)}"
                )
        self.layers_per_stage = counts
        self.first_layer = sum(counts[:stage])
        self.is_first, self.is_last = stage == 0, stage == stages - 1
        model.blocks = nn.ModuleList(blocks[self.first_layer : self.first_layer + counts[stage]])
        keep = {*(first if self.is_first else ()), *(last if self.is_last else ())}
        for name in {*first, *last} - keep:
            setattr(model, name, None)
        self.model = model
        # Held by the first and the last stage (GPT's tied embedding): their gradients are summed.
        shared = set(first) & set(last) if stages > 1 else set()
        self.shared = [p for name in sorted(shared & keep) for p in _parameters(getattr(model, name))]

    def embed(self, inputs: Tensor) -> Tensor:
        return self.model.embed(inputs)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.model.blocks:
            x = block(x)
        return x

    def head_loss(self, x: Tensor, targets: Tensor | None) -> tuple[Tensor, Tensor | None]:
        logits = self.model.head(x)
        return logits, None if targets is None else self.model.loss(logits, targets)

    def global_name(self, name: str) -> str:
        """A parameter's name in the whole model: 'model.blocks.0.x' on stage 2 -> 'blocks.<first+0>.x'."""
        name = name.removeprefix("model.")
        if name.startswith("blocks."):
            index, rest = name[len("blocks.") :].split(".", 1)
            return f"blocks.{int(index) + self.first_layer}.{rest}"
        return name


def _parameters(part: nn.Module | nn.Parameter | None) -> list[nn.Parameter]:
    if part is None:
        return []
    return [part] if isinstance(part, nn.Parameter) else list(part.parameters())


class Pipeline:
    """Runs training steps of `model` over `mesh`'s pipeline (and data-parallel) dimension.

    micro_batches: microbatches per step per data-parallel replica; schedule: 'gpipe' or '1f1b';
    layers_per_stage: explicit blocks per stage (default: balanced by parameter count); bucket_mb,
    algorithm: DataParallel's (dp > 1); timeout: seconds any receive may wait; measure_memory: track the
    activation bytes held (ActivationMeter; costs a hook per saved tensor).
    """

    def __init__(
        self, model: nn.Module, mesh: Mesh, micro_batches: int = 1, schedule: str = "1f1b",
        layers_per_stage: Sequence[int] | None = None, bucket_mb: float = 25.0, algorithm: str = "auto",
        timeout: float | None = None, measure_memory: bool = False,
    ) -> None:  # fmt: skip
        if schedule not in SCHEDULES:
            raise invalid("schedule", schedule, SCHEDULES)
        if not isinstance(micro_batches, int) or micro_batches < 1:
            raise invalid("micro_batches", micro_batches, "a positive int")
        if hasattr(model, "config"):  # heads, d_ff, vocabulary over tp; blocks over pp
            check_model(model.config, mesh.tp, mesh.pp)
        self.mesh, self.schedule, self.micro_batches = mesh, schedule, micro_batches
        self.stage = PipelineStage(model, mesh.pp_rank, mesh.pp, layers_per_stage)
        self.ddp = None
        if mesh.dp > 1:
            self.ddp = DataParallel(self.stage, mesh.dp_group, bucket_mb, algorithm, timeout)
        self.p2p = PointToPoint(mesh.pp_group, timeout)
        self.device = next(self.stage.parameters()).device
        self.meter = ActivationMeter(list(self.stage.parameters())) if measure_memory else None
        self.sequence_parallel = uses_sequence_parallel(self.stage)
        self.peak_in_flight = 0  # most microbatches whose activations a stage held in the last step
        self._shapes: dict[tuple, tuple] = {}  # microbatch input shape -> received (shape, dtype)
        self._announced: set[tuple] = set()  # microbatch input shapes whose activation shape was sent

    def parameters(self):
        return self.stage.parameters()

    def named_parameters(self):
        """(name in the whole model, parameter) of this stage."""
        return ((self.stage.global_name(n), p) for n, p in self.stage.named_parameters())

    def train_step(self, inputs: Tensor, targets: Tensor) -> Tensor | None:
        """Forward and backward of every microbatch; gradients are left in .grad (summed over the
        microbatches of the 1/m-scaled loss, synced over dp). Returns the mean loss on the last stage."""
        micro = self._split(inputs, targets)
        m, stage, mesh = len(micro), self.stage, self.mesh
        actions = schedule_actions(self.schedule, mesh.pp_rank, mesh.pp, m)
        saved: dict[int, tuple[Tensor | None, Tensor]] = {}
        total = torch.zeros((), dtype=torch.float64, device=self.device)  # fp64: exact for fp64 models
        self.peak_in_flight = 0
        with self.meter if self.meter is not None else contextlib.nullcontext():
            for k, (kind, i) in enumerate(actions):
                following = actions[k + 1][0] if k + 1 < len(actions) else None
                if kind == "F":  # a send forward pairs with the next backward's receive from that stage
                    x, out = self._forward(i, micro[i][0], defer=following == "B")
                    if stage.is_last:
                        out = stage.head_loss(out, micro[i][1])[1] / m
                        total += out.detach()
                    saved[i] = (x, out)
                    self.peak_in_flight = max(self.peak_in_flight, len(saved))
                    continue
                x, out = saved.pop(i)
                last = self.ddp is None or i == m - 1  # dp: sync during the step's last backward only
                with contextlib.nullcontext() if last else self.ddp.no_sync():
                    if stage.is_last:
                        out.backward()
                    else:
                        grad = self.p2p.recv(
                            out.shape, out.dtype, self.device, mesh.next_stage, i, "gradient"
                        )
                        torch.autograd.backward(out, grad)
                if not stage.is_first:
                    self.p2p.send(x.grad, mesh.prev_stage, i, "gradient", defer=following == "F")
        self.p2p.flush()
        if self.sequence_parallel:  # norms saw only this rank's tokens: sum their gradients over TP
            sync_sequence_parallel_grads(stage.parameters(), mesh.tp_group)
        for param in stage.shared:  # tied embedding: first and last stage each hold part of its gradient
            all_reduce(param.grad, group=mesh.embedding_group)
        return total if stage.is_last else None

    @torch.no_grad()
    def forward_only(
        self, inputs: Tensor, targets: Tensor | None = None, micro_batches: int | None = None
    ) -> tuple[Tensor | None, Tensor | None]:
        """(head outputs, mean loss) on the last stage, (None, None) elsewhere; no gradients.

        micro_batches: how many pieces the batch goes through the pipeline in (default: the pipeline's).
        """
        micro = self._split(inputs, targets, micro_batches)
        outputs, losses = [], []
        for i, (x, y) in enumerate(micro):
            out = self._forward(i, x, defer=False)[1]
            if self.stage.is_last:
                logits, loss = self.stage.head_loss(out, y)
                outputs.append(logits)
                losses.append(loss)
        self.p2p.flush()
        if not self.stage.is_last:
            return None, None
        return torch.cat(outputs), None if targets is None else torch.stack(losses).mean()

    def _split(
        self, inputs: Tensor, targets: Tensor | None, micro_batches: int | None = None
    ) -> list[tuple[Tensor, Tensor | None]]:
        m = micro_batches or self.micro_batches
        if inputs.shape[0] % m:
            raise invalid("micro_batches", m, f"a divisor of the batch size {inputs.shape[0]}")
        pieces = inputs.to(self.device).chunk(m)
        labels = targets.to(self.device).chunk(m) if targets is not None else [None] * m
        return list(zip(pieces, labels, strict=True))

    def _forward(self, i: int, inputs: Tensor, defer: bool) -> tuple[Tensor | None, Tensor]:
        """Microbatch i through this stage's blocks: (the received input or None, the blocks' output).

        A stage announces an activation's shape once per microbatch input shape; the receiver keeps it.
        """
        stage, mesh, p2p = self.stage, self.mesh, self.p2p
        key = tuple(inputs.shape)
        if stage.is_first:
            x, h = None, stage.embed(inputs)
        else:
            if key not in self._shapes:
                self._shapes[key] = p2p.recv_header(self.device, mesh.prev_stage, i)
            x = p2p.recv(*self._shapes[key], self.device, mesh.prev_stage, i, "activation")
            h = x.requires_grad_() if torch.is_grad_enabled() else x
        h = stage(h)
        if not stage.is_last:
            if key not in self._announced:
                self._announced.add(key)
                p2p.send(encode_header(h), mesh.next_stage, i, "activation shape", defer=True)
            p2p.send(h, mesh.next_stage, i, "activation", defer=defer)
        return x, h

    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        """Clip the whole model's gradient norm (all stages, TP shards counted once) to max_norm."""
        squares = torch.zeros(1, dtype=torch.float64, device=self.device)
        shared = {id(p) for p in self.stage.shared} if not self.stage.is_first else set()
        for p in self.stage.parameters():
            if p.grad is None or id(p) in shared or (not is_tensor_parallel(p) and self.mesh.tp_rank):
                continue
            squares += p.grad.detach().double().pow(2).sum()
        all_reduce(squares, group=self.mesh.world_group)
        norm = (squares / self.mesh.dp).sqrt()  # float64, like the squares: no rounding to the grads' dtype
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for p in self.stage.parameters():
            if p.grad is not None:
                p.grad.mul_(scale.to(p.grad.device, p.grad.dtype))
        return norm[0]
