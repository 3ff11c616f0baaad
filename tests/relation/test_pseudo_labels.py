"""Pseudo-label bookkeeping across re-clusterings (``relation/pseudo_labels.py``): stable
classes, class weights, the state a resume restores."""
import pytest
import torch

from imagebert_ds.relation.kmeans import kmeans
from imagebert_ds.relation.pseudo_labels import Reclusterer
from relation_helpers import CENTRES, blobs, same_partition


def test_pseudo_labels_stable_when_nothing_changed():
    """Re-clustering the same features (a fresh seed: another k-means++ draw) gives the same
    labels, because new clusters are re-mapped onto the previous classes."""
    x, _ = blobs()
    rc = Reclusterer(k=4, iters=50, normalize="none", seed=5)
    rc.recluster(x, step=0)
    first, cents = rc.labels.clone(), rc.centroids.clone()
    rec = rc.recluster(x, step=100)
    assert torch.equal(rc.labels, first)
    assert torch.allclose(rc.centroids, cents, atol=1e-6)
    assert rec["cluster/nmi_prev"] == pytest.approx(1.0) and rec["cluster/kept_frac"] == 1.0
    labels, weights = rc.assign(x)
    assert torch.equal(labels, first) and torch.allclose(weights, torch.ones(len(x)))


def test_remap_keeps_classes_when_kmeans_permutes_them():
    """The same partition found in another cluster order keeps each row's class (DeepCluster's
    permutation problem); switching the re-mapping off shows the check can fail."""
    x, _ = blobs()
    rc = Reclusterer(k=4, iters=50, normalize="none", seed=0)
    rc.recluster(x, step=0)
    first = rc.labels.clone()
    permuted = 0
    for step in range(1, 10):  # the seeds Reclusterer draws for these steps (seed 0)
        raw = kmeans(x, 4, 50, torch.Generator().manual_seed(step))
        rc.recluster(x, step=step)
        if not same_partition(raw.labels, first):
            continue  # k-means++ led to another local optimum: a different partition
        permuted += not torch.equal(raw.labels, first)
        assert torch.equal(rc.labels, first)
        rc.recluster(x, step=0)  # back to the first draw for the next round
    assert permuted > 0


def test_class_balanced_weights():
    x, _ = blobs()
    x = torch.cat([x, CENTRES[0] + 0.1 * torch.randn(120, 3)])  # blob 0 has 160 of 280 rows
    rc = Reclusterer(k=4, iters=50, normalize="none", seed=0)
    rc.recluster(x, step=0)
    sizes = rc.sizes.double()
    assert torch.allclose(rc.weights.double(), len(x) / (4 * sizes), rtol=1e-6)
    assert float((rc.weights.double() * sizes).sum()) == pytest.approx(len(x))


def test_state_restored_exactly_on_resume():
    """Stop after the 2nd re-clustering, restore into a new Reclusterer (as the trainer does from
    rank_state), continue: the 3rd re-clustering and every label equal an uninterrupted run's."""
    g = torch.Generator().manual_seed(2)
    feats = [torch.randn(64, 6, generator=g) + (i * 0.3) for i in range(3)]  # a drifting model

    def run(rc, steps):
        return [rc.recluster(feats[i], step=100 * i) for i in steps]

    full = Reclusterer(k=4, iters=10, normalize="standardize", seed=9)
    recs = run(full, range(3))
    part = Reclusterer(k=4, iters=10, normalize="standardize", seed=9)
    run(part, range(2))
    state = part.state_dict()
    resumed = Reclusterer(k=4, iters=10, normalize="standardize", seed=9)
    resumed.load_state_dict(state)
    rec = resumed.recluster(feats[2], step=200)
    assert rec == recs[2]
    for key in ("centroids", "labels", "weights", "mean", "std", "sizes"):
        assert torch.equal(getattr(resumed, key), getattr(full, key)), key
    probe = torch.randn(16, 6, generator=g)
    assert all(torch.equal(a, b) for a, b in zip(resumed.assign(probe), full.assign(probe)))
    # a restore that lost the previous assignments would not reproduce the remap / NMI
    lost = Reclusterer(k=4, iters=10, normalize="standardize", seed=9)
    lost.load_state_dict({**state, "labels": None})
    assert "cluster/nmi_prev" not in lost.recluster(feats[2], step=200)
    with pytest.raises(ValueError, match="k=4"):
        Reclusterer(k=3, iters=10, normalize="standardize", seed=9).load_state_dict(state)
