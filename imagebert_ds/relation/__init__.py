"""Image-text relations (Sun et al.; PAPERS.md): deep multimodal clustering's labels, the linear
probe and Grad-CAM activation maps.

* ``kmeans.py`` -- distributed k-means, the re-clustering state and ``ClusterHook``
* ``probe.py`` -- the frozen-encoder linear probe; ``explain.py`` -- ITM Grad-CAM maps
* ``cli.py`` -- ``imagebert-ds probe`` and ``imagebert-ds explain``

The head itself is an objective (``model/objectives/cluster.py``). This package imports
``model/`` and ``data/``, and from ``eval/`` only the checkpoint helpers; never ``train/``.
"""
