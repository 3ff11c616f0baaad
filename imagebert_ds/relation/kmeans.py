"""k-means over rows spread across ranks, and the statistics that compare two clusterings.

A small library for deep multimodal clustering (the image-text relation framework, Sun et al.;
PAPERS.md), in plain torch: collectives come in through a :class:`Collective` (rank, world size,
an in-place sum), so it knows nothing of DeepSpeed and one rank needs no process group.

* :func:`kmeans` — k-means++ initialisation and Lloyd iterations over rows spread across ranks.
  Every rank holds some rows; sums and counts are all-reduced (float64), and every random draw
  comes from one ``torch.Generator`` seeded identically on every rank, so all ranks get the same
  centroids — the same, up to float64 rounding, as one rank holding all the rows in rank order.
  An empty cluster is re-seeded by splitting the largest one (its centroid ± a small seeded
  perturbation; Faiss / DeepCluster), so every cluster keeps members.
* :func:`contingency`, :func:`nmi_from_contingency` — label-pair counts over every rank's rows
  and their normalised mutual information; :func:`match_clusters` — the Hungarian matching of a
  new clustering onto the previous one (DeepCluster's permutation problem).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch


@dataclass
class Collective:
    """The process group as k-means sees it: this rank, the world size, an in-place sum."""
    rank: int = 0
    world: int = 1
    all_reduce: Optional[Callable[[torch.Tensor], object]] = None

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the ranks (in place; returned for chaining)."""
        if self.world > 1:
            self.all_reduce(t)
        return t

    @classmethod
    def from_torch(cls) -> "Collective":
        """torch.distributed's default group when initialised with > 1 rank, else one rank."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return cls(dist.get_rank(), dist.get_world_size(), dist.all_reduce)
        return cls()


@dataclass
class KMeansResult:
    """Centroids (k, D) float32, this rank's labels (n,), global counts (k,), inertia (the
    global sum of squared distances), empty clusters re-seeded and Lloyd iterations run."""
    centroids: torch.Tensor
    labels: torch.Tensor
    counts: torch.Tensor
    inertia: float
    reseeded: int
    iters: int


def _sq_dist(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """(n, D), (k, D) -> (n, k) squared Euclidean distances (float64)."""
    return ((x * x).sum(1, keepdim=True) - 2 * x @ c.T + (c * c).sum(1)[None, :]).clamp(min=0)


def nearest(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """(n, D) rows -> (n,) index of the nearest centroid (ties: the lower index)."""
    return _sq_dist(x.double(), centroids.to(x.device).double()).argmin(1)


def _offsets(n_local: int, comm: Collective, device) -> tuple[int, int]:
    """(this rank's first global row, total rows): rows are numbered rank-major."""
    counts = torch.zeros(comm.world, dtype=torch.float64, device=device)
    counts[comm.rank] = n_local
    comm.sum(counts)
    return int(counts[:comm.rank].sum()), int(counts.sum())


def _rows(x: torch.Tensor, idx: torch.Tensor, offset: int, comm: Collective) -> torch.Tensor:
    """The global rows ``idx`` (m,), on every rank: the owner contributes, the sum spreads."""
    out = x.new_zeros(len(idx), x.shape[1])
    mine = (idx >= offset) & (idx < offset + len(x))
    out[mine] = x[idx[mine] - offset]
    return comm.sum(out)


def kmeans_pp_init(x: torch.Tensor, k: int, gen: torch.Generator, comm: Collective) -> torch.Tensor:
    """k-means++ (Arthur & Vassilvitskii 2007) over rows spread across ranks -> (k, D) float64.

    Each next centroid is a row drawn with probability ∝ its squared distance to the nearest
    chosen one: the per-rank totals are summed, one uniform draw (the same on every rank) picks
    the rank and then the row within it."""
    offset, n = _offsets(len(x), comm, x.device)
    first = torch.randint(n, (1,), generator=gen).to(x.device)
    cents = [_rows(x, first, offset, comm)]
    d2 = _sq_dist(x, cents[0]).squeeze(1)                                    # (n_local,)
    for _ in range(1, k):
        totals = torch.zeros(comm.world, dtype=torch.float64, device=x.device)
        totals[comm.rank] = d2.sum()
        comm.sum(totals)
        u = float(torch.rand((), generator=gen, dtype=torch.float64)) * float(totals.sum())
        cum = totals.cumsum(0)
        owner = min(int((cum <= u).sum()), comm.world - 1)
        pick = torch.zeros(1, dtype=torch.float64, device=x.device)
        if comm.rank == owner and len(x):
            local_u = u - float(cum[owner] - totals[owner])
            j = min(int((d2.cumsum(0) <= local_u).sum()), len(x) - 1)
            pick[0] = offset + j
        comm.sum(pick)
        c = _rows(x, pick.long(), offset, comm)
        cents.append(c)
        d2 = torch.minimum(d2, _sq_dist(x, c).squeeze(1))
    return torch.cat(cents)


def _reseed_empty(c: torch.Tensor, counts: torch.Tensor, gen: torch.Generator) -> int:
    """Split the largest cluster into each empty one (in place); returns how many."""
    empty = (counts == 0).nonzero().flatten().tolist()
    for e in empty:
        big = int(counts.argmax())
        scale = 1e-3 * (float(c[big].norm()) + 1e-6)
        noise = torch.randn(c.shape[1], generator=gen, dtype=torch.float64).to(c.device) * scale
        c[e] = c[big] + noise
        c[big] = c[big] - noise
        counts[e] = counts[big] = counts[big] / 2
    return len(empty)


def kmeans(x: torch.Tensor, k: int, iters: int, gen: torch.Generator,
           comm: Collective = Collective(), init: Optional[torch.Tensor] = None,
           tol: float = 1e-10) -> KMeansResult:
    """Lloyd's k-means of this rank's rows ``x`` (n, D) together with the other ranks' rows.

    ``init`` (k, D) replaces k-means++. Stops after ``iters`` updates or when no centroid moves
    more than ``tol`` (squared). Every rank must call it with the same ``k``, ``iters``, D and a
    generator in the same state."""
    x = x.double()
    c = (init.to(x.device).double().clone() if init is not None
         else kmeans_pp_init(x, k, gen, comm))
    reseeded, it = 0, 0
    D = x.shape[1]
    for it in range(1, iters + 1):
        labels = nearest(x, c)
        stats = torch.zeros(k, D + 1, dtype=torch.float64, device=x.device)
        stats[:, :D].index_add_(0, labels, x)
        stats[:, D].index_add_(0, labels, torch.ones_like(labels, dtype=torch.float64))
        comm.sum(stats)
        counts = stats[:, D].clone()
        new = torch.where(counts[:, None] > 0, stats[:, :D] / counts.clamp(min=1)[:, None], c)
        n_empty = _reseed_empty(new, counts, gen)
        reseeded += n_empty
        shift = float((new - c).pow(2).sum(1).max())
        c = new
        if n_empty == 0 and shift <= tol:
            break
    labels = nearest(x, c)
    tail = torch.zeros(k + 1, dtype=torch.float64, device=x.device)
    tail[:k].index_add_(0, labels, torch.ones_like(labels, dtype=torch.float64))
    tail[k] = _sq_dist(x, c).gather(1, labels[:, None]).sum()
    comm.sum(tail)
    return KMeansResult(centroids=c.float(), labels=labels, counts=tail[:k].round().long(),
                        inertia=float(tail[k]), reseeded=reseeded, iters=it)


def contingency(a: torch.Tensor, b: torch.Tensor, k: int, comm: Collective) -> torch.Tensor:
    """(k, k) float64 counts of label pairs (a_i, b_i) over every rank's rows."""
    t = torch.zeros(k * k, dtype=torch.float64, device=a.device)
    t.index_add_(0, a * k + b, torch.ones_like(a, dtype=torch.float64))
    return comm.sum(t).view(k, k)


def nmi_from_contingency(table: torch.Tensor) -> float:
    """Normalised mutual information, arithmetic-mean normalisation (scikit-learn's default):
    ``I(a; b) / ((H(a) + H(b)) / 2)``; 1.0 when both labelings are a single cluster."""
    p = table / table.sum()
    pa, pb = p.sum(1), p.sum(0)
    nz = p > 0
    mi = float((p[nz] * (p[nz] / (pa[:, None] * pb[None, :])[nz]).log()).sum())
    ha = float(-(pa[pa > 0] * pa[pa > 0].log()).sum())
    hb = float(-(pb[pb > 0] * pb[pb > 0].log()).sum())
    denom = (ha + hb) / 2
    return 1.0 if denom <= 0 else max(0.0, mi / denom)


def match_clusters(table: torch.Tensor) -> torch.Tensor:
    """(k, k) contingency of (previous class, new cluster) -> perm (k,): new cluster j becomes
    class perm[j], maximising the rows that keep their class (Hungarian matching)."""
    from scipy.optimize import linear_sum_assignment  # scipy: a dependency of scikit-learn

    rows, cols = linear_sum_assignment(-table.cpu().numpy())
    perm = torch.empty(table.shape[0], dtype=torch.long)
    perm[torch.as_tensor(cols)] = torch.as_tensor(rows)
    return perm
