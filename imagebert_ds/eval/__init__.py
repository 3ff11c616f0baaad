"""Evaluation: image-text retrieval (R@K in both directions, Karpathy-split conventions)."""
from imagebert_ds.eval.retrieval import evaluate_itm_retrieval, itm_score_matrix, recall_at_k

__all__ = ["evaluate_itm_retrieval", "itm_score_matrix", "recall_at_k"]
