"""DPC-KNN: density-peak clustering with k-nearest-neighbour density (as HoliTom, PruneVid and FastVID use it).

For N points x (N, D), with distances d_ij = ||x_i - x_j|| / sqrt(D):
- density rho_i = exp(-mean of d_ij^2 over the k nearest j, the point itself included, as the
  TCFormer-derived code those methods share takes ``topk(..., largest=False)`` on the full matrix);
- delta_i = distance to the nearest point of higher density (the largest distance in the set for
  the densest point);
- score_i = rho_i * delta_i; the ``n_clusters`` highest scores are the centres and every point
  joins its nearest centre (centres join themselves).

The official code breaks density ties with uniform noise of 1e-6; here ties are broken by index
(the lower index counts as denser), so results are deterministic.
"""

from __future__ import annotations

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


def dpc_scores(x: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """(density, delta, score), each (N,) float32, for the points x (N, D)."""
    dist = scaled_distances(x)
    density = knn_density(dist, k)
    if x.shape[0] == 1:
        return density, torch.zeros_like(density), torch.zeros_like(density)
    far = dist.max()
    delta = torch.where(denser_than(density), dist, far).min(dim=-1).values
    return density, delta, density * delta


def dpc_knn_cluster(x: Tensor, n_clusters: int, k: int) -> tuple[Tensor, Tensor]:
    """Cluster x (N, D) into ``n_clusters`` (clamped to 1..N).

    Returns (centres (C,) point indices in descending score order, assignment (N,) the position in
    ``centres`` of each point's nearest centre; a centre is assigned to itself).
    """
    n = x.shape[0]
    c = max(1, min(n_clusters, n))
    _, _, score = dpc_scores(x, k)
    centres = torch.sort(score, descending=True, stable=True).indices[:c]
    dist = scaled_distances(x)
    assignment = dist[centres].argmin(dim=0)
    assignment[centres] = torch.arange(c, device=x.device)
    return centres, assignment


def cluster_means(x: Tensor, assignment: Tensor, n_clusters: int) -> Tensor:
    """(C, D) mean of each cluster's members (float32 accumulation, x's dtype out)."""
    sums = torch.zeros(n_clusters, x.shape[-1], dtype=torch.float32, device=x.device)
    sums.index_add_(0, assignment, x.float())
    counts = torch.bincount(assignment, minlength=n_clusters).clamp(min=1)
    return (sums / counts[:, None]).to(x.dtype)
