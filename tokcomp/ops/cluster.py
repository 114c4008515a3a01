"""DPC-KNN: density-peak clustering with k-nearest-neighbour density (as HoliTom, PruneVid and FastVID use it).

For N points x (N, D), with distances d_ij = ||x_i - x_j|| / sqrt(D):
- density rho_i = exp(-mean of d_ij^2 over the k nearest j, the point itself included, as the
  TCFormer-derived code those methods share takes ``topk(..., largest=False)`` on the full matrix);
  k is clamped to 1..N here (the official ``topk`` would raise for k > N);
- delta_i = distance to the nearest point of higher density (the largest distance in the set for
  the densest point);
- score_i = rho_i * delta_i; the ``n_clusters`` highest scores are the centres and every point
  joins its nearest centre (centres join themselves).

Which k to pass is the caller's choice: PruneVid's official ``merge_frames_dynamic`` passes a fixed
k = 7, HoliTom's passes min(K, number of clusters) (``strategies/holitom.py``); this module only
clamps it to N. Likewise the merge: ``cluster_means`` (every member, centre included, equally) is
PruneVid's ``compute_cluster_vectors``; HoliTom's beta merge, which leaves the centre out of the
mean, is ``tokcomp.ops.static_windows.beta_merge``.

``centre_order`` matters only for the order of the returned centres and for exact distance ties:
``"score"`` (the default, PruneVid's: descending score, as ``topk`` returns them) or ``"index"``
(HoliTom sorts its centres by index before it assigns the other points, so a point equidistant from
two centres joins the lower-index one).

The official code breaks density ties with uniform noise of 1e-6; here ties are broken by index
(the lower index counts as denser), so results are deterministic. With k = 1 a density carries no
information: the nearest point is the point itself, so every density is exp(-d_ii^2), i.e. 1 up to
``cdist``'s rounding of the self-distance (not exactly 0 on its matmul path, N > 25), and the
centres are picked by that rounding and the official noise, here by that rounding and index.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor


def scaled_distances(x: Tensor) -> Tensor:
    """(N, N) float32 Euclidean distances divided by sqrt(D)."""
    x = x.float()
    return torch.cdist(x[None], x[None])[0] / x.shape[-1] ** 0.5


def knn_density(dist: Tensor, k: int) -> Tensor:
    """(N,) exp(-mean squared distance to the k nearest points, self included)."""
    k = max(1, min(k, dist.shape[0]))
    nearest = torch.topk(dist, k, dim=-1, largest=False).values
    return torch.exp(-(nearest**2).mean(dim=-1))


def denser_than(density: Tensor) -> Tensor:
    """(N, N) bool: entry [i, j] is True when j is denser than i (ties: the lower index is denser)."""
    n = density.numel()
    idx = torch.arange(n, device=density.device)
    higher = density[None, :] > density[:, None]
    tie = (density[None, :] == density[:, None]) & (idx[None, :] < idx[:, None])
    return higher | tie


def _dpc_from_distances(dist: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    density = knn_density(dist, k)
    if dist.shape[0] == 1:
        return density, torch.zeros_like(density), torch.zeros_like(density)
    far = dist.max()
    delta = torch.where(denser_than(density), dist, far).min(dim=-1).values
    return density, delta, density * delta


def dpc_scores(x: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """(density, delta, score), each (N,) float32, for the points x (N, D)."""
    return _dpc_from_distances(scaled_distances(x), k)


def dpc_knn_cluster(x: Tensor, n_clusters: int, k: int,
                    centre_order: Literal["score", "index"] = "score") -> tuple[Tensor, Tensor]:
    """Cluster x (N, D) into ``n_clusters`` (clamped to 1..N) with k density neighbours (clamped to 1..N).

    Returns (centres (C,) point indices, in descending score order, or in ascending index order
    with ``centre_order="index"``; assignment (N,) the position in ``centres`` of each point's
    nearest centre, the first in ``centres`` order on exact distance ties; a centre is assigned
    to itself).
    """
    if centre_order not in ("score", "index"):
        raise ValueError(f"centre_order={centre_order!r} is not 'score' or 'index'")
    n = x.shape[0]
    c = max(1, min(n_clusters, n))
    dist = scaled_distances(x)
    _, _, score = _dpc_from_distances(dist, k)
    centres = torch.sort(score, descending=True, stable=True).indices[:c]
    if centre_order == "index":
        centres = torch.sort(centres).values
    assignment = dist[centres].argmin(dim=0)
    assignment[centres] = torch.arange(c, device=x.device)
    return centres, assignment


def cluster_means(x: Tensor, assignment: Tensor, n_clusters: int) -> Tensor:
    """(C, D) mean of each cluster's members (float32 accumulation, x's dtype out)."""
    sums = torch.zeros(n_clusters, x.shape[-1], dtype=torch.float32, device=x.device)
    sums.index_add_(0, assignment, x.float())
    counts = torch.bincount(assignment, minlength=n_clusters).clamp(min=1)
    return (sums / counts[:, None]).to(x.dtype)
