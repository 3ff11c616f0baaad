"""Image-text relations (Sun et al.; PAPERS.md): deep multimodal clustering's labels, the linear
probe and Grad-CAM activation maps.

* ``kmeans.py`` -- k-means over rows spread across ranks (pure torch, a ``Collective`` for the
  sums), NMI and the Hungarian matching of two clusterings
* ``pseudo_labels.py`` -- ``Reclusterer`` (re-clustering state, stable classes, class weights)
  and ``ClusterHook``, the ``cluster`` objective's stage hook (``train/hooks.py``)
* ``probe.py`` -- the frozen-encoder linear probe; ``explain.py`` -- ITM Grad-CAM maps
* ``cli.py`` -- ``imagebert-ds probe`` and ``imagebert-ds explain``

The head itself is an objective (``model/objectives/cluster.py``). This package imports
``model/``, ``data/``, ``run/`` and ``eval/data.py``; never ``train/``.
Docs: docs/training.md ("Image-text relation objectives"), docs/evaluation.md.
"""
