"""Deep multimodal clustering's pseudo-labels, and the stage hook that feeds them to training.

The image-text relation framework (Sun et al.; PAPERS.md) re-clusters the multimodal embeddings of
a sample of the data every so often and trains a head to predict the clusters. The model only has
that head (``model/objectives/cluster.py``); this file makes the labels with ``kmeans.py``.

* :class:`Reclusterer` — the state across re-clusterings: the new clusters are **re-mapped**
  onto the previous ones (Hungarian matching of the contingency table over the same sample), so
  the head's class c keeps meaning the same cluster and needs no re-initialisation under ZeRO
  (whose fp32 master weights and Adam moments live in the optimizer's partitions, out of reach of
  an in-place reset); class-balanced weights ``n / (k · count_c)``; NMI between consecutive
  assignments of the sample; ``state_dict`` for checkpoints (centroids, normalisation
  statistics, this rank's assignments, step).
* :class:`ClusterHook` — the ``cluster`` objective's stage hook (``train/hooks.py``):
  ``on_step(step, model)`` at each step boundary re-clusters when due (embeds ``sample_size``
  pairs of the stage's data, read by a separate, seeded loader with no masking and no swapped
  captions); ``batch_inputs(model, batch)`` labels every micro-batch (the nearest centroid of the
  pair's current embedding, one forward without gradient); ``pop_log()``; ``state_dict()``.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Optional

import torch
import torch.nn.functional as F

from .kmeans import Collective, contingency, kmeans, match_clusters, nearest, nmi_from_contingency

log = logging.getLogger(__name__)

#: offset of the clustering sample loader's seed from the data seed (another shuffle than the
#: training stream's, the same at every re-clustering)
SAMPLE_SEED_OFFSET = 7919


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
    """The ``cluster`` objective's stage hook: its options ``opts`` (``ClusterConfig``), the
    stage's ``DataConfig``, this rank of ``world``, its device and the run seed; ``comm`` defaults
    to torch.distributed's group."""

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

    def batch_inputs(self, model, batch: dict) -> dict:
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
