"""k-means over rows spread across ranks (``relation/kmeans.py``): recovery, re-seeding, NMI.

The 2-rank test uses real processes (gloo); the rest runs in this process in well under a second
each."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from imagebert_ds.relation.kmeans import Collective, contingency, kmeans, nmi_from_contingency
from relation_helpers import CENTRES, blobs, same_partition


def test_kmeans_recovers_separable_blobs():
    x, y = blobs()
    res = kmeans(x, 4, 50, torch.Generator().manual_seed(3))
    assert same_partition(res.labels, y)
    assert sorted(res.counts.tolist()) == [40] * 4 and res.reseeded == 0
    # each centroid is the mean of its blob
    for c in range(4):
        assert torch.allclose(res.centroids[c], x[res.labels == c].mean(0), atol=1e-5)


def test_empty_cluster_is_reseeded():
    x, y = blobs()
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


# ---- 2 ranks (gloo) = 1 rank -----------------------------------------------------------------
WORLD = 2


def _worker(rank, init_file, out_dir):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        x, _ = blobs(n_per=30, seed=4)
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
    x, _ = blobs(n_per=30, seed=4)
    x = x + 2.0 * torch.randn(x.shape, generator=torch.Generator().manual_seed(8))
    one = kmeans(x, 4, 30, torch.Generator().manual_seed(11))
    assert torch.equal(torch.cat([p["labels"] for p in parts]), one.labels)
    for p in parts:  # every rank holds the same centroids, equal to one rank's up to rounding
        assert torch.equal(p["centroids"], parts[0]["centroids"])
        assert torch.equal(p["counts"], one.counts)
        assert p["inertia"] == pytest.approx(one.inertia, rel=1e-9)
    assert torch.allclose(parts[0]["centroids"], one.centroids, atol=1e-6)
