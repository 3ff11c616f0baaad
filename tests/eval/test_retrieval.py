"""R@K on hand-made score matrices (Karpathy conventions: any own caption counts for i2t; ties
count against the model), protocol folds, and the results table."""
import pytest
import torch

from imagebert_ds.eval.protocols import PROTOCOLS, keep_captions, protocol_folds
from imagebert_ds.eval.retrieval import mean_recalls, recall_at_k


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
    assert r["text_to_image"]["R@1"] == pytest.approx(100 / 3)
    assert r["text_to_image"]["R@2"] == 100.0


def test_constant_scores_get_zero():
    """Every pair the same score: each wrong candidate ties the ground truth and ranks ahead."""
    t2i = torch.arange(4).repeat_interleave(5)                        # 4 images x 5 captions
    r = recall_at_k(torch.zeros(4, 20), t2i, ks=(1, 5, 10, 16, 17))
    # i2t: 15 wrong captions tie -> rank 15: a hit only for K > 15
    assert r["image_to_text"] == {"R@1": 0.0, "R@5": 0.0, "R@10": 0.0, "R@16": 100.0, "R@17": 100.0}
    # t2i: 3 wrong images tie -> rank 3
    assert r["text_to_image"] == {"R@1": 0.0, "R@5": 100.0, "R@10": 100.0, "R@16": 100.0,
                                  "R@17": 100.0}


def test_ties_against_the_model_not_the_sort_order():
    t2i = torch.tensor([0, 1])
    s = torch.tensor([[1.0, 1.0],     # image 0: own caption 0 ties caption 1 -> rank 1 (miss@1)
                      [0.0, 2.0]])    # image 1: own caption strictly first
    r = recall_at_k(s, t2i, ks=(1, 2))
    assert r["image_to_text"] == {"R@1": 50.0, "R@2": 100.0}
    # caption 0: images score [1, 0] -> hit; caption 1: [1, 2] -> hit
    assert r["text_to_image"]["R@1"] == 100.0
    # a tie among wrong candidates below the ground truth does not matter
    s = torch.tensor([[3.0, 1.0, 1.0], [0.0, 5.0, 0.0], [0.0, 0.0, 0.0]])  # image 2: all tie
    r = recall_at_k(s, torch.tensor([0, 1, 2]), ks=(1,))
    assert r["image_to_text"]["R@1"] == pytest.approx(200 / 3)


def test_five_captions_any_own_counts():
    """Image→text: the best of an image's 5 captions decides; text→image is per caption."""
    t2i = torch.tensor([0] * 5 + [1] * 5)
    s = torch.zeros(2, 10)
    s[0] = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5])  # own #4 first
    s[1] = torch.tensor([0.99, 0.98, 0.97, 0.0, 0.0, 0.1, 0.2, 0.3, 0.4, 0.5])  # own best at rank 3
    r = recall_at_k(s, t2i, ks=(1, 3, 4))
    assert r["image_to_text"] == {"R@1": 50.0, "R@3": 50.0, "R@4": 100.0}
    # columns: caption t hits@1 when its own image scores strictly higher than the other
    hits = [s[0, t] > s[1, t] for t in range(5)] + [s[1, t] > s[0, t] for t in range(5, 10)]
    assert r["text_to_image"]["R@1"] == pytest.approx(100.0 * sum(hits) / 10)


def test_k_larger_than_candidates():
    t2i = torch.tensor([0, 1, 2])
    s = -torch.eye(3)                      # every ground truth ranked last
    r = recall_at_k(s, t2i, ks=(1, 3, 10))
    assert r["image_to_text"] == {"R@1": 0.0, "R@3": 100.0, "R@10": 100.0}
    assert r["text_to_image"] == {"R@1": 0.0, "R@3": 100.0, "R@10": 100.0}


def test_asymmetric_scores_t2i():
    """A re-ranker's text→image matrix is used for text→image only."""
    t2i = torch.tensor([0, 1])
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])            # perfect for both directions
    s_t2i = torch.tensor([[0.0, 1.0], [0.0, 1.0]])        # caption 0 prefers image 1: a miss
    r = recall_at_k(s, t2i, ks=(1,), scores_t2i=s_t2i)
    assert r["image_to_text"]["R@1"] == 100.0
    assert r["text_to_image"]["R@1"] == 50.0
    assert recall_at_k(s, t2i, ks=(1,))["text_to_image"]["R@1"] == 100.0
    with pytest.raises(ValueError, match="scores_t2i must have shape"):
        recall_at_k(s, t2i, scores_t2i=s_t2i[:1])


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="text_to_image must have shape"):
        recall_at_k(torch.zeros(2, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="outside"):
        recall_at_k(torch.zeros(2, 2), torch.tensor([0, 2]))


def test_image_without_caption_is_left_out_of_i2t():
    t2i = torch.tensor([0, 0])
    s = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    assert recall_at_k(s, t2i, ks=(1,))["image_to_text"]["R@1"] == 100.0


def test_mean_recalls():
    a = {"image_to_text": {"R@1": 10.0}, "text_to_image": {"R@1": 20.0}, "rsum": 30.0}
    b = {"image_to_text": {"R@1": 30.0}, "text_to_image": {"R@1": 40.0}, "rsum": 70.0}
    m = mean_recalls([a, b])
    assert m == {"image_to_text": {"R@1": 20.0}, "text_to_image": {"R@1": 30.0}, "rsum": 50.0}


def _fake_split(n_img: int, caps: list[int]):
    from imagebert_ds.data.retrieval_split import RetrievalSplit

    t2i = torch.tensor([i for i in range(n_img) for _ in range(caps[i])])
    n = len(t2i)
    return RetrievalSplit(image_ids=torch.arange(n_img) + 100, input_ids=torch.arange(n)[:, None],
                          attention_mask=torch.ones(n, 1, dtype=torch.long), text_to_image=t2i,
                          captions=[f"c{t}" for t in range(n)],
                          region_feats=torch.arange(n_img).float()[:, None, None],
                          region_boxes=torch.zeros(n_img, 1, 5),
                          region_mask=torch.ones(n_img, 1, dtype=torch.long))


def test_protocol_sizes_and_folds():
    split = _fake_split(5000, [5] * 4999 + [7])
    with pytest.raises(ValueError, match="flickr30k-1k needs 1000 test images, the split has 5000"):
        protocol_folds(split, PROTOCOLS["flickr30k-1k"])
    (five_k,) = protocol_folds(split, PROTOCOLS["coco-5k"])
    assert five_k.num_texts == 25000 and five_k.num_images == 5000  # first 5 captions kept
    folds = protocol_folds(split, PROTOCOLS["coco-1k"])
    assert [f.num_images for f in folds] == [1000] * 5 and [f.num_texts for f in folds] == [5000] * 5
    f2 = folds[2]  # consecutive images 2000..2999, rows renumbered, captions follow
    assert f2.image_ids[0] == 2100 and f2.text_to_image.min() == 0 and f2.text_to_image.max() == 999
    assert f2.captions[0] == f"c{2000 * 5}" and float(f2.region_feats[0, 0, 0]) == 2000.0
    short = _fake_split(1000, [5] * 999 + [4])
    with pytest.raises(ValueError, match="needs 5 captions per image.*image_id 1099 has 4"):
        protocol_folds(short, PROTOCOLS["flickr30k-1k"])
    assert protocol_folds(short, PROTOCOLS["none"])[0] is short


def test_keep_captions_keeps_order():
    split = _fake_split(2, [3, 2])
    kept = keep_captions(split, 2)
    assert kept.captions == ["c0", "c1", "c3", "c4"] and kept.text_to_image.tolist() == [0, 0, 1, 1]


def test_markdown_table_layout():
    from imagebert_ds.eval.evaluate import markdown_table

    r = {"image_to_text": {"R@1": 1.0, "R@5": 2.0, "R@10": 3.0},
         "text_to_image": {"R@1": 4.0, "R@5": 5.0, "R@10": 6.25}, "rsum": 21.25}
    lines = markdown_table([("full", r)]).splitlines()
    assert lines[0].startswith("| | Image→Text R@1 | R@5 | R@10 | Text→Image R@1 |")
    assert lines[0].endswith("RSUM |")
    assert lines[2] == "| full | 1.0 | 2.0 | 3.0 | 4.0 | 5.0 | 6.2 | 21.2 |"


def test_cli_protocol_names_match():
    from imagebert_ds.eval.cli import PROTOCOL_NAMES

    assert PROTOCOL_NAMES == tuple(PROTOCOLS)
