"""Deep multimodal clustering: k-means, pseudo-label bookkeeping, the objective, its config.

The 2-rank k-means test uses real processes (gloo); the rest runs in this process in well under a
second each."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from imagebert_ds.config_utils import ConfigError
from imagebert_ds.model import ImageBERTConfig, ImageBERTForPretraining
from imagebert_ds.model.objectives import parse_objectives
from imagebert_ds.testing import contract_batch
from imagebert_ds.relation.kmeans import (Collective, Reclusterer, contingency, kmeans,
                                          nmi_from_contingency)

CENTRES = torch.tensor([[0., 0, 0], [8, 0, 0], [0, 8, 0], [0, 0, 8]])


def _blobs(n_per: int = 40, seed: int = 0):
    """Four well separated blobs, shuffled; returns (points (4n, 3), true blob (4n,))."""
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([c + 0.5 * torch.randn(n_per, 3, generator=g) for c in CENTRES])
    y = torch.arange(4).repeat_interleave(n_per)
    perm = torch.randperm(len(x), generator=g)
    return x[perm], y[perm]


def _same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when a and b group the rows identically (cluster ids may differ)."""
    table = contingency(a, b, 4, Collective())
    return bool(((table > 0).sum(1) == 1).all() and ((table > 0).sum(0) == 1).all())


def test_kmeans_recovers_separable_blobs():
    x, y = _blobs()
    res = kmeans(x, 4, 50, torch.Generator().manual_seed(3))
    assert _same_partition(res.labels, y)
    assert sorted(res.counts.tolist()) == [40] * 4 and res.reseeded == 0
    # each centroid is the mean of its blob
    for c in range(4):
        assert torch.allclose(res.centroids[c], x[res.labels == c].mean(0), atol=1e-5)


def test_empty_cluster_is_reseeded():
    x, y = _blobs()
    init = torch.cat([CENTRES[:3], torch.tensor([[100., 100, 100]])])  # the 4th attracts nobody
    res = kmeans(x, 4, 50, torch.Generator().manual_seed(0), init=init)
    assert res.reseeded >= 1
    assert (res.counts > 0).all()
    # without re-seeding the far centroid would stay empty: one iteration shows it does
    no_reseed = torch.cdist(x, init).argmin(1)
    assert (torch.bincount(no_reseed, minlength=4) == 0).any()


def test_nmi_matches_scikit_learn():
    from sklearn.metrics import normalized_mutual_info_score

    g = torch.Generator().manual_seed(1)
    a, b = torch.randint(0, 4, (300,), generator=g), torch.randint(0, 4, (300,), generator=g)
    b[:150] = a[:150]
    ours = nmi_from_contingency(contingency(a, b, 4, Collective()))
    assert ours == pytest.approx(normalized_mutual_info_score(a.numpy(), b.numpy()), abs=1e-9)
    assert nmi_from_contingency(contingency(a, a, 4, Collective())) == pytest.approx(1.0)


def test_pseudo_labels_stable_when_nothing_changed():
    """Re-clustering the same features (a fresh seed: another k-means++ draw) gives the same
    labels, because new clusters are re-mapped onto the previous classes."""
    x, _ = _blobs()
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
    x, _ = _blobs()
    rc = Reclusterer(k=4, iters=50, normalize="none", seed=0)
    rc.recluster(x, step=0)
    first = rc.labels.clone()
    permuted = 0
    for step in range(1, 10):  # the seeds Reclusterer draws for these steps (seed 0)
        raw = kmeans(x, 4, 50, torch.Generator().manual_seed(step))
        rc.recluster(x, step=step)
        if not _same_partition(raw.labels, first):
            continue  # k-means++ led to another local optimum: a different partition
        permuted += not torch.equal(raw.labels, first)
        assert torch.equal(rc.labels, first)
        rc.recluster(x, step=0)  # back to the first draw for the next round
    assert permuted > 0


def test_class_balanced_weights():
    x, _ = _blobs()
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


# ---- 2 ranks (gloo) = 1 rank -----------------------------------------------------------------
WORLD = 2


def _worker(rank, init_file, out_dir):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        x, _ = _blobs(n_per=30, seed=4)
        x = x + 2.0 * torch.randn(x.shape, generator=torch.Generator().manual_seed(8))  # overlap
        sizes = [50, 70]  # uneven parts, rank-major
        lo = sum(sizes[:rank])
        res = kmeans(x[lo:lo + sizes[rank]], 4, 30, torch.Generator().manual_seed(11),
                     Collective.from_torch())
        torch.save({"labels": res.labels, "centroids": res.centroids, "counts": res.counts,
                    "inertia": res.inertia}, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    os._exit(0)  # skip gloo's teardown (see test_model_itc_dist.py)


@pytest.mark.dist
def test_distributed_kmeans_equals_one_rank(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    x, _ = _blobs(n_per=30, seed=4)
    x = x + 2.0 * torch.randn(x.shape, generator=torch.Generator().manual_seed(8))
    one = kmeans(x, 4, 30, torch.Generator().manual_seed(11))
    assert torch.equal(torch.cat([p["labels"] for p in parts]), one.labels)
    for p in parts:  # every rank holds the same centroids, equal to one rank's up to rounding
        assert torch.equal(p["centroids"], parts[0]["centroids"])
        assert torch.equal(p["counts"], one.counts)
        assert p["inertia"] == pytest.approx(one.inertia, rel=1e-9)
    assert torch.allclose(parts[0]["centroids"], one.centroids, atol=1e-6)


# ---- the objective and its config --------------------------------------------------------------
def _cfg(objectives: str) -> ImageBERTConfig:
    return ImageBERTConfig.from_yaml("configs/model/tiny.yaml", [f"objectives={objectives}"])


def test_cluster_loss_is_class_weighted_cross_entropy():
    cfg = _cfg("{cluster: {k: 4}}")
    torch.manual_seed(0)
    model = ImageBERTForPretraining(cfg).eval()
    b = contract_batch(cfg, 6, generator=torch.Generator().manual_seed(0))
    b["cluster_labels"] = torch.tensor([0, 1, 2, 3, -100, 1])
    b["cluster_weights"] = torch.tensor([1.0, 2.0, 0.5, 1.0, 7.0, 2.0])
    out = model(**b, return_logits=True)
    ref = torch.nn.functional.cross_entropy(out["cluster_logits"][[0, 1, 2, 3, 5]],
                                            b["cluster_labels"][[0, 1, 2, 3, 5]],
                                            weight=torch.tensor([1.0, 2.0, 0.5, 1.0]))
    assert float(out["loss/cluster"].detach()) == pytest.approx(float(ref.detach()), rel=1e-5)
    assert "cluster_labels" in model.input_keys()
    del b["cluster_labels"]
    assert model(**b)["skipped"] == ("cluster",)


def test_mcl_is_itc():
    a = parse_objectives({"mcl": {"weight": 0.5, "embed_dim": 32}})
    assert list(a) == ["itc"] and a["itc"].embed_dim == 32 and a["itc"].weight == 0.5
    with pytest.raises(ConfigError, match="'mcl' is another name for 'itc'"):
        parse_objectives({"mcl": 1.0, "itc": 1.0})
    with pytest.raises(ConfigError, match="mcl.embed_dims"):
        parse_objectives({"mcl": {"embed_dims": 3}})


@pytest.mark.parametrize("options, key", [({"k": 1}, "k must be >= 2"),
                                          ({"recluster_every": 0}, "recluster_every"),
                                          ({"normalise": "l2"}, "cluster.normalise"),
                                          ({"normalize": "pca"}, "normalize")])
def test_cluster_config_errors_name_the_key(options, key):
    with pytest.raises(ConfigError, match=key):
        parse_objectives({"cluster": options}, "stage s: objectives")


def test_run_config_errors_name_the_key(tmp_path):
    from imagebert_ds.train.config import load_run_config

    base = ["stages.0.sources.0.path=" + str(tmp_path), "stages.0.sources.1.path=" + str(tmp_path)]
    with pytest.raises(ConfigError, match="probe.test"):
        load_run_config("configs/runs/itr_toy.yaml", base + ["probe.test=null"], check_data=False)
    with pytest.raises(ConfigError, match="probe.train .* does not exist"):
        load_run_config("configs/runs/itr_toy.yaml",
                        base + [f"probe.train={tmp_path / 'nope'}", f"probe.test={tmp_path}"])
    with pytest.raises(ConfigError, match="cluster: sample_size"):
        load_run_config("configs/runs/itr_toy.yaml",
                        base + ["stages.0.objectives.cluster.sample_size=2"], check_data=False)
