"""Linear attention (Katharopoulos et al. 2020, "Transformers are RNNs"): attention as a kernel feature map.

Softmax attention weighs value j for query i by exp(q_i . k_j); linear attention by phi(q_i) . phi(k_j)
with the positive feature map phi(x) = elu(x) + 1, so the sum over j factors:

    y_i = phi(q_i)^T S_i / (phi(q_i)^T z_i + eps),   S_i = sum_j phi(k_j) v_j^T,   z_i = sum_j phi(k_j)

where j runs over every position (non-causal: one S and z for all queries, phi(K)^T V) or over j <= i
(causal: prefix sums). No n x n matrix exists, so time and memory are O(n) in the sequence length.

Three forms of the same function:
- `linear_attention(q, k, v, causal=False)`: phi(K)^T V and the key sum, then one product per query.
- `linear_attention(q, k, v, causal=True)`: the prefix sums taken chunk by chunk. Inside a chunk of
  `chunk` positions a masked (chunk x chunk) product; across chunks an exclusive prefix sum (cumsum) of
  each chunk's phi(K)^T V. Memory: n x chunk scores plus n / chunk states of d x d per head, linear in n;
  a cumsum over every position would hold n states of d x d instead (d times more at chunk = d).
- `LinearAttentionState.step(q, k, v)`: the recurrent form for causal generation, one token at a time:
  S += phi(k) v^T, z += phi(k), y = phi(q)^T S / (phi(q)^T z + eps).

eps keeps the division finite: phi > 0, so the normaliser is positive, but it can underflow towards 0
for very negative q or k (elu(x) + 1 -> e^x); eps (1e-6, as in the authors' code) bounds y by |S| / eps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from commlab.errors import invalid
from commlab.shared.attention import ATTENTIONS

__all__ = ["ATTENTIONS", "CHUNK", "EPS", "LinearAttentionState", "feature_map", "linear_attention"]
EPS = 1e-6
CHUNK = 64  # positions per chunk of the causal parallel form


def feature_map(x: Tensor) -> Tensor:
    """phi(x) = elu(x) + 1: positive, so every weight phi(q) . phi(k) and every normaliser is positive."""
    return F.elu(x) + 1.0


def linear_attention(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, eps: float = EPS, chunk: int = CHUNK
) -> Tensor:
    """Linear attention of q, k (..., n, d) and v (..., n, e), parallel form; returns (..., n, e)."""
    if not isinstance(chunk, int) or chunk < 1:
        raise invalid("chunk", chunk, "a positive int")
    if not eps > 0:
        raise invalid("eps", eps, "a positive float")
    phi_q, phi_k = feature_map(q), feature_map(k)
    if not causal:
        state = phi_k.transpose(-2, -1) @ v  # (..., d, e): phi(K)^T V
        norm = phi_k.sum(dim=-2)  # (..., d)
        numerator = phi_q @ state
        denominator = (phi_q * norm.unsqueeze(-2)).sum(-1, keepdim=True)
        return numerator / (denominator + eps)
    return _causal_chunked(phi_q, phi_k, v, eps, chunk)


def _causal_chunked(phi_q: Tensor, phi_k: Tensor, v: Tensor, eps: float, chunk: int) -> Tensor:
    """Causal linear attention from the feature maps: masked products within chunks, prefix sums across."""
    n = phi_q.shape[-2]
    chunk = min(chunk, n)
    pad = -n % chunk
    if pad:  # zero features add nothing to any sum; the padded queries' rows are cut off at the end
        phi_q, phi_k, v = (F.pad(t, (0, 0, 0, pad)) for t in (phi_q, phi_k, v))
    lead, d, e = phi_q.shape[:-2], phi_q.shape[-1], v.shape[-1]
    blocks = (n + pad) // chunk
    q_c = phi_q.reshape(*lead, blocks, chunk, d)
    k_c = phi_k.reshape(*lead, blocks, chunk, d)
    v_c = v.reshape(*lead, blocks, chunk, e)
    chunk_states = k_c.transpose(-2, -1) @ v_c  # (..., blocks, d, e): each chunk's phi(K)^T V
    chunk_norms = k_c.sum(dim=-2)  # (..., blocks, d)
    # Exclusive prefix sums over chunks: what every earlier chunk contributes to this chunk's queries.
    states = F.pad(chunk_states.cumsum(dim=-3), (0, 0, 0, 0, 1, 0))[..., :-1, :, :]
    norms = F.pad(chunk_norms.cumsum(dim=-2), (0, 0, 1, 0))[..., :-1, :]
    mask = torch.ones(chunk, chunk, dtype=torch.bool, device=phi_q.device).tril()
    scores = (q_c @ k_c.transpose(-2, -1)).masked_fill(~mask, 0.0)  # (..., blocks, chunk, chunk)
    numerator = q_c @ states + scores @ v_c
    denominator = (q_c * norms.unsqueeze(-2)).sum(-1) + scores.sum(-1)
    out = numerator / (denominator.unsqueeze(-1) + eps)
    return out.reshape(*lead, blocks * chunk, e)[..., :n, :]


@dataclass
class LinearAttentionState:
    """Causal linear attention's recurrent state per head: S (..., d, e) and normaliser z (..., d)."""

    S: Tensor
    z: Tensor
    eps: float = EPS

    @classmethod
    def zeros(
        cls, lead: tuple[int, ...], d: int, e: int, like: Tensor, eps: float = EPS
    ) -> LinearAttentionState:
        """An empty state (no token seen) for leading shape `lead`, e.g. (batch, heads)."""
        return cls(like.new_zeros(*lead, d, e), like.new_zeros(*lead, d), eps)

    def step(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Take one token's q, k (..., d) and v (..., e) into the state; return its output (..., e)."""
        phi_q, phi_k = feature_map(q), feature_map(k)
        self.S = self.S + phi_k.unsqueeze(-1) * v.unsqueeze(-2)
        self.z = self.z + phi_k
        numerator = (phi_q.unsqueeze(-1) * self.S).sum(-2)
        denominator = (phi_q * self.z).sum(-1, keepdim=True)
        return numerator / (denominator + self.eps)
