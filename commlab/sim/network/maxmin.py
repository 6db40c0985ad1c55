"""Max-min fair rates of flows sharing links (progressive filling, vectorized).

Every round finds the links whose fair share (remaining capacity / unfrozen flows on it) is the smallest
share seen by any of their flows; those flows cannot get more anywhere, so they are frozen at that share
and their rate is taken off every link they cross. A round freezes at least one link's flows, and shares
never shrink, so the result is the max-min fair allocation (Bertsekas and Gallager, Data Networks, 6.5).
"""

from __future__ import annotations

import numpy as np

_RELATIVE = 1e-12


def max_min_rates(
    flow_of: np.ndarray, link_of: np.ndarray, capacity: np.ndarray, num_flows: int
) -> np.ndarray:
    """Rates of `num_flows` flows; flow flow_of[i] crosses link link_of[i]; capacity is per link id."""
    links, local = np.unique(link_of, return_inverse=True)
    remaining = capacity[links].astype(float)
    rate = np.zeros(num_flows)
    frozen = np.zeros(num_flows, bool)
    flow_of = np.asarray(flow_of)
    crossed = np.zeros(num_flows, bool)
    crossed[flow_of] = True
    frozen[~crossed] = True  # a flow on no link is not limited here
    rate[~crossed] = np.inf
    while not frozen.all():
        live = ~frozen[flow_of]
        f, link = flow_of[live], local[live]
        users = np.bincount(link, minlength=len(links))
        share = np.full(len(links), np.inf)
        used = users > 0
        share[used] = np.maximum(remaining[used], 0.0) / users[used]
        flow_share = np.full(num_flows, np.inf)
        np.minimum.at(flow_share, f, share[link])
        link_floor = np.full(len(links), np.inf)
        np.minimum.at(link_floor, link, flow_share[f])
        bottleneck = used & (share <= link_floor * (1 + _RELATIVE))
        freeze_entry = bottleneck[link]
        newly = np.unique(f[freeze_entry])
        rate[newly] = flow_share[newly]
        frozen[newly] = True
        taken = np.isin(f, newly)
        np.subtract.at(remaining, link[taken], rate[f[taken]])
    return rate
