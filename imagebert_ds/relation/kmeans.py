"""Deep multimodal clustering, the trainer's side: distributed k-means and the pseudo-labels.

The image-text relation framework (Sun et al.; PAPERS.md) re-clusters the multimodal embeddings of
a sample of the data every so often and trains a head to predict the clusters. The model only
has that head (``model/objectives/cluster.py``); this file makes the labels, knowing nothing of
DeepSpeed: collectives come in through a :class:`Collective` (rank, world size, an in-place sum).

* :func:`kmeans` — k-means++ initialisation and Lloyd iterations over rows spread across ranks.
  Every rank holds some rows; sums and counts are all-reduced (float64), and every random draw
  comes from one ``torch.Generator`` seeded identically on every rank, so all ranks get the same
  centroids — the same, up to float64 rounding, as one rank holding all the rows in rank order.
  An empty cluster is re-seeded by splitting the largest one (its centroid ± a small seeded
  perturbation; Faiss / DeepCluster), so every cluster keeps members.
* :class:`Reclusterer` — the state across re-clusterings: the new clusters are **re-mapped**
  onto the previous ones (Hungarian matching of the contingency table over the same sample,
  DeepCluster's permutation problem), so the head's class c keeps meaning the same cluster and
  needs no re-initialisation under ZeRO (whose fp32 master weights and Adam moments live in the
  optimizer's partitions, out of reach of an in-place reset); class-balanced weights
  ``n / (k · count_c)``; NMI between consecutive assignments of the sample; ``state_dict`` for
  checkpoints (centroids, normalisation statistics, this rank's assignments, step).
* :class:`ClusterHook` — what the trainer calls: ``on_step(step, model)`` at each step boundary
  (re-clusters when due: embeds ``sample_size`` pairs of the stage's data, read by a separate,
  seeded loader with no masking and no swapped captions), ``label(model, batch)`` for every
  micro-batch (the nearest centroid of the pair's current embedding, one forward without
  gradient), ``pop_log()``, ``state_dict()``.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

#: offset of the clustering sample loader's seed from the data seed (another shuffle than the
#: training stream's, the same at every re-clustering)
SAMPLE_SEED_OFFSET = 7919


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


class Reclusterer:
    """Clusters feature samples, keeps the classes stable across re-clusterings and labels rows.

    ``k``, ``iters``, ``normalize`` (none / l2 / standardize) and ``seed`` as in
    ``ClusterConfig``; ``comm`` the ranks. ``recluster(feats, step)`` takes this rank's part of
    the sample, ``assign(feats)`` labels new rows with the current centroids."""

    def __init__(self, k: int, iters: int, normalize: str, seed: int,
                 comm: Collective = Collective()):
        self.k, self.iters, self.normalize, self.seed, self.comm = k, iters, normalize, seed, comm
        self.step = -1            # step of the last re-clustering (-1: none yet)
        self.count = 0            # re-clusterings so far
        self.centroids: Optional[torch.Tensor] = None  # (k, D) float32, index = head class
        self.mean: Optional[torch.Tensor] = None       # (D,) standardize statistics
        self.std: Optional[torch.Tensor] = None
        self.labels: Optional[torch.Tensor] = None     # this rank's sample assignments (n,)
        self.weights: Optional[torch.Tensor] = None    # (k,) class-balanced loss weights
        self.sizes: Optional[torch.Tensor] = None      # (k,) global cluster sizes

    def _normed(self, x: torch.Tensor) -> torch.Tensor:
        x = x.double()
        if self.normalize == "l2":
            return F.normalize(x, dim=1)
        if self.normalize == "standardize":
            return (x - self.mean.to(x.device)) / self.std.to(x.device)
        return x

    def _fit_stats(self, x: torch.Tensor) -> None:
        if self.normalize != "standardize":
            return
        x = x.double()
        s = torch.cat([x.sum(0), (x * x).sum(0), x.new_tensor([len(x)])])
        self.comm.sum(s)
        D, n = x.shape[1], float(s[-1])
        mean = s[:D] / n
        var = (s[D:2 * D] / n - mean * mean).clamp(min=0)
        self.mean, self.std = mean.float().cpu(), var.sqrt().clamp(min=1e-6).float().cpu()

    def recluster(self, feats: torch.Tensor, step: int) -> dict:
        """k-means of the sample (this rank's rows ``feats`` (n, D)); the new clusters are
        re-mapped onto the previous classes. Returns the metrics to log."""
        self._fit_stats(feats)
        x = self._normed(feats)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        res = kmeans(x, self.k, self.iters, gen, self.comm)
        cents, labels, counts = res.centroids, res.labels, res.counts
        rec: dict = {"cluster/step": step, "cluster/inertia": res.inertia,
                     "cluster/reseeded": res.reseeded, "cluster/kmeans_iters": res.iters}
        if self.labels is not None and len(self.labels) == len(labels):
            prev = self.labels.to(labels.device)
            table = contingency(prev, labels, self.k, self.comm)
            rec["cluster/nmi_prev"] = nmi_from_contingency(table)
            perm = match_clusters(table).to(labels.device)
            labels = perm[labels]
            cents = cents[torch.argsort(perm.cpu()).to(cents.device)]  # class c <- cluster inv[c]
            counts = counts[torch.argsort(perm.cpu()).to(counts.device)]
            rec["cluster/kept_frac"] = float(self.comm.sum(
                (labels == prev).double().sum().reshape(1))[0]) / float(counts.sum())
        n = float(counts.sum())
        self.centroids = cents.cpu()
        self.labels = labels.cpu()
        self.sizes = counts.cpu()
        self.weights = (n / (self.k * counts.double().clamp(min=1))).float().cpu()
        self.step, self.count = step, self.count + 1
        rec.update({f"cluster/size_{c}": int(v) for c, v in enumerate(self.sizes.tolist())})
        return rec

    def assign(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, D) features -> (labels (B,) int64, weights (B,) float32) on ``feats``' device."""
        if self.centroids is None:
            raise RuntimeError("no clusters yet: recluster() before assign()")
        labels = nearest(self._normed(feats), self.centroids)
        return labels, self.weights.to(feats.device)[labels]

    def state_dict(self) -> dict:
        """Everything ``load_state_dict`` needs to continue exactly (CPU tensors)."""
        return {"step": self.step, "count": self.count, "k": self.k, "normalize": self.normalize,
                "centroids": self.centroids, "mean": self.mean, "std": self.std,
                "labels": self.labels, "weights": self.weights, "sizes": self.sizes}

    def load_state_dict(self, state: dict) -> None:
        """Restore a ``state_dict()``; refuses one made with another k or normalisation."""
        for key in ("k", "normalize"):
            if state[key] != getattr(self, key):
                raise ValueError(f"cluster state has {key}={state[key]!r}, this run "
                                 f"{getattr(self, key)!r}")
        self.step, self.count = state["step"], state["count"]
        for key in ("centroids", "mean", "std", "labels", "weights", "sizes"):
            setattr(self, key, state[key])


class ClusterHook:
    """The trainer's handle on clustering for one stage (``cluster`` objective options ``opts``,
    the stage's ``DataConfig``, this rank, its device)."""

    def __init__(self, opts, data_cfg, rank: int, world: int, device: torch.device, seed: int,
                 comm: Optional[Collective] = None):
        self.opts, self.rank, self.world, self.device = opts, rank, world, device
        self.comm = comm or Collective.from_torch()
        self.data_cfg = dataclasses.replace(
            data_cfg, mlm_prob=0.0, region_mask_prob=0.0, itm_neg_prob=0.0, prefetch_batches=0,
            seed=data_cfg.seed + SAMPLE_SEED_OFFSET)
        self.state = Reclusterer(opts.k, opts.kmeans_iters, opts.normalize, seed, self.comm)
        self._pending: dict = {}

    def due(self, step: int) -> bool:
        """Re-cluster before step ``step + 1``: at every multiple of ``recluster_every`` (0
        included) not done yet."""
        return step % self.opts.recluster_every == 0 and self.state.step != step

    def on_step(self, step: int, model) -> None:
        """At a step boundary (``step`` steps done): re-cluster when due. Every rank calls it."""
        if not self.due(step):
            return
        feats = self.embed_sample(model)
        rec = self.state.recluster(feats, step)
        if self.rank == 0:
            log.info("re-clustered at step %d: sizes %s, NMI to previous %s", step,
                     self.state.sizes.tolist(), rec.get("cluster/nmi_prev"))
        self._pending.update(rec)

    def embed_sample(self, model) -> torch.Tensor:
        """This rank's share (``ceil(sample_size / world)`` pairs) of the clustering sample,
        embedded with the current model -> (n, F) float32."""
        from imagebert_ds.data import build_pretrain_loader

        per_rank = math.ceil(self.opts.sample_size / self.world)
        batches = math.ceil(per_rank / self.data_cfg.batch_size)
        loader = build_pretrain_loader(self.data_cfg, self.rank, self.world, str(self.device))
        try:
            feats = [self.features(model, next(loader)) for _ in range(batches)]
        finally:
            loader.close()
        return torch.cat(feats)[:per_rank]

    def features(self, model, batch: dict) -> torch.Tensor:
        """``model.relation_features`` of a batch's clean pairs (the MLM-masked tokens restored;
        region masking is applied inside the model's training forward only) -> (B, F)."""
        dev = self.device
        ids = batch["input_ids"]
        if batch.get("mlm_labels") is not None:
            ids = torch.where(batch["mlm_labels"] != -100, batch["mlm_labels"], ids)
        get = lambda k: batch[k].to(dev) if batch.get(k) is not None else None  # noqa: E731
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = model.relation_features(
                    ids.to(dev), get("attention_mask"), get("region_feats"), get("region_boxes"),
                    get("region_mask"), get("token_type_ids"), get("pixel_values"),
                    modalities=self.opts.features == "joint+modalities")
        finally:
            model.train(was_training)
        return out.float()

    def label(self, model, batch: dict) -> dict:
        """``cluster_labels`` and ``cluster_weights`` of a training micro-batch, on the device."""
        labels, weights = self.state.assign(self.features(model, batch))
        return {"cluster_labels": labels, "cluster_weights": weights}

    def pop_log(self) -> dict:
        """Metrics of the re-clusterings since the last call (for the next logged record)."""
        rec, self._pending = self._pending, {}
        return rec

    def state_dict(self) -> dict:
        """The re-clustering state (``Reclusterer.state_dict``), for this rank's checkpoint."""
        return self.state.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Restore it on resume."""
        self.state.load_state_dict(state)


def build_cluster_hook(stage_objectives: dict, data_cfg, rank: int, world: int,
                       device: torch.device, seed: int) -> Optional[ClusterHook]:
    """The stage's ``ClusterHook`` when it runs the ``cluster`` objective, else None."""
    opts = stage_objectives.get("cluster")
    if opts is None:
        return None
    return ClusterHook(opts, data_cfg, rank, world, device, seed)
