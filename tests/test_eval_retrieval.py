"""R@K on hand-made score matrices (Karpathy conventions: any own caption counts for i2t)."""
import torch

from imagebert_ds.eval.retrieval import recall_at_k


def test_perfect_and_reversed():
    t2i = torch.tensor([0, 0, 1, 1, 2, 2])
    perfect = (t2i[None, :] == torch.arange(3)[:, None]).float()
    r = recall_at_k(perfect, t2i, ks=(1, 2))
    assert r["image_to_text"] == {"R@1": 100.0, "R@2": 100.0}
    assert r["text_to_image"] == {"R@1": 100.0, "R@2": 100.0}
    assert r["rsum"] == 400.0
    r = recall_at_k(-perfect, t2i, ks=(1,))
    assert r["image_to_text"]["R@1"] == 0.0 and r["text_to_image"]["R@1"] == 0.0


def test_hand_computed_ranks():
    # 2 images, 3 captions; caption 0,1 -> image 0, caption 2 -> image 1
    t2i = torch.tensor([0, 0, 1])
    s = torch.tensor([[0.1, 0.9, 0.5],    # image 0: best caption 1 (own) -> i2t hit@1
                      [0.8, 0.2, 0.3]])   # image 1: order 0,2,1 -> own caption at rank 1 -> hit@2
    r = recall_at_k(s, t2i, ks=(1, 2))
    assert r["image_to_text"] == {"R@1": 50.0, "R@2": 100.0}
    # t2i: caption 0 column [0.1, 0.8] -> image 1 first (miss@1); caption 1 [0.9,0.2] hit;
    # caption 2 [0.5, 0.3] -> image 0 first (miss@1)
    assert abs(r["text_to_image"]["R@1"] - 100 / 3) < 1e-4
    assert r["text_to_image"]["R@2"] == 100.0
