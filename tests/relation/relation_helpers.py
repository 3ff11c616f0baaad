"""Shared by the relation tests: well separated blobs and a partition comparison."""
import torch

from imagebert_ds.relation.kmeans import Collective, contingency

CENTRES = torch.tensor([[0., 0, 0], [8, 0, 0], [0, 8, 0], [0, 0, 8]])


def blobs(n_per: int = 40, seed: int = 0):
    """Four well separated blobs, shuffled; returns (points (4n, 3), true blob (4n,))."""
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([c + 0.5 * torch.randn(n_per, 3, generator=g) for c in CENTRES])
    y = torch.arange(4).repeat_interleave(n_per)
    perm = torch.randperm(len(x), generator=g)
    return x[perm], y[perm]


def same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when a and b group the rows identically (cluster ids may differ)."""
    table = contingency(a, b, 4, Collective())
    return bool(((table > 0).sum(1) == 1).all() and ((table > 0).sum(0) == 1).all())
