"""Linear-probe evaluation of image-text relations (the relation framework's protocol, Sun et al.).

The encoder is frozen: every labelled pair of a train and a test split is embedded once with
``ImageBERTForPretraining.relation_features`` (the fused [CLS] of the joint pass; optionally also
the text-only and image-only [CLS]), then scikit-learn's ``LogisticRegression`` (C = 0.25, on
standardised features) is fitted on the train pairs for each of the three relation labels —
``flag_t``, ``flag_v`` and the 4-way ``flag_tv = 2·flag_t + flag_v`` — and scored on the test
pairs: accuracy of ``flag_tv`` and the weighted F1 of each, in percent.

Labels come from each sample's ``.json``: ``label`` (= flag_tv, 0..3), and ``flag_t`` / ``flag_v``
when present (else derived from ``label``); ``make-toy-data --relation-train N --relation-test M``
writes such splits.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from imagebert_ds.data.shards import iter_samples, list_shards, parse_meta, split_captions

#: the relation framework's inverse regularisation strength
PROBE_C = 0.25


def relation_labels(path: str | Path) -> np.ndarray:
    """(N_txt, 3) int64 ``(flag_t, flag_v, flag_tv)`` per caption of a split, in the caption
    order of ``load_retrieval_split``; an unlabelled or inconsistent sample names its key."""
    rows = []
    for shard in list_shards(path):
        for key, comps in iter_samples(shard):
            where = f"{shard}:{key}"
            meta = parse_meta(comps.get("json", b"{}"), where)
            tv = meta.get("label")
            if not isinstance(tv, int) or isinstance(tv, bool) or not 0 <= tv < 4:
                raise ValueError(f"{where}: .json needs a relation 'label' in 0..3 (flag_tv = "
                                 f"2 * flag_t + flag_v), got {tv!r}")
            t, v = int(meta.get("flag_t", tv >> 1)), int(meta.get("flag_v", tv & 1))
            if 2 * t + v != tv:
                raise ValueError(f"{where}: label {tv} != 2 * flag_t ({t}) + flag_v ({v})")
            rows += [(t, v, tv)] * len(split_captions(comps["txt"], where))
    if not rows:
        raise ValueError(f"{path}: no samples")
    return np.asarray(rows, np.int64)


@torch.no_grad()
def extract_features(model, split, batch_size: int = 256, device="cpu",
                     modalities: bool = False) -> np.ndarray:
    """(N_txt, F) float32 relation features of every (caption, its image) pair of ``split``."""
    model.eval()
    out = []
    for lo in range(0, split.num_texts, batch_size):
        t = torch.arange(lo, min(lo + batch_size, split.num_texts))
        b = {k: v.to(device) for k, v in split.pair_batch(split.text_to_image[t], t).items()}
        out.append(model.relation_features(**b, modalities=modalities).float().cpu())
    return torch.cat(out).numpy()


def fit_and_score(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
                  y_test: np.ndarray, C: float = PROBE_C, seed: int = 0) -> dict:
    """Logistic-regression probes for flag_t, flag_v, flag_tv (columns of ``y``) -> ``{accuracy,
    f1_t, f1_v, f1_tv, macro_f1_t, macro_f1_v, macro_f1_tv}`` in percent (accuracy of flag_tv;
    weighted F1 as the relation framework's code reports, and macro F1)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    res = {}
    for col, name in enumerate(("t", "v", "tv")):
        clf = make_pipeline(StandardScaler(),
                            LogisticRegression(C=C, max_iter=2000, random_state=seed))
        clf.fit(x_train, y_train[:, col])
        pred = clf.predict(x_test)
        res[f"f1_{name}"] = 100.0 * float(f1_score(y_test[:, col], pred, average="weighted"))
        res[f"macro_f1_{name}"] = 100.0 * float(f1_score(y_test[:, col], pred, average="macro"))
        if name == "tv":
            res["accuracy"] = 100.0 * float(accuracy_score(y_test[:, col], pred))
    return {k: res[k] for k in ("accuracy", "f1_t", "f1_v", "f1_tv", "macro_f1_t", "macro_f1_v",
                                "macro_f1_tv")}


def linear_probe(model, train_dir: str | Path, test_dir: str | Path, data_cfg,
                 C: float = PROBE_C, batch_size: int = 256, device="cpu",
                 modalities: bool = False) -> dict:
    """The probe of ``model`` (frozen) on two labelled split directories read with
    ``data_cfg`` (tokenizer, text length, regions) -> the scores plus the sizes and time."""
    from imagebert_ds.data import load_retrieval_split

    t0 = time.perf_counter()
    feats, labels = [], []
    for path in (train_dir, test_dir):
        split = load_retrieval_split(path, data_cfg)
        y = relation_labels(path)
        if len(y) != split.num_texts:
            raise ValueError(f"{path}: {len(y)} labels for {split.num_texts} captions")
        feats.append(extract_features(model, split, batch_size, device, modalities))
        labels.append(y)
    res = fit_and_score(feats[0], labels[0], feats[1], labels[1], C)
    res.update(num_train=len(labels[0]), num_test=len(labels[1]), C=C,
               features="joint+modalities" if modalities else "joint",
               chance_accuracy=100.0 * float(np.bincount(labels[1][:, 2]).max() / len(labels[1])),
               seconds=time.perf_counter() - t0)
    return res


def untrained_model(ck):
    """The architecture of a ``RunCheckpoint`` at its random initialisation: inside a run, the
    first stage's model built after ``torch.manual_seed(run.seed)`` exactly as the trainer
    builds it (without ``init_from_bert`` / ``init_from``); a bare model folder with seed 0."""
    from imagebert_ds.model import ImageBERTForPretraining, PretrainingConfig

    if ck.run_cfg is not None:
        cfg = ck.run_cfg
        torch.manual_seed(cfg.run.seed)
        return ImageBERTForPretraining(cfg.model_config(cfg.stages[0]))
    torch.manual_seed(0)
    return ImageBERTForPretraining(PretrainingConfig.from_yaml(Path(ck.model_dir) / "config.yaml"))
