"""Benchmarks, importable so that ``kmjax bench`` works from an install as from a clone.

- ``kmeans.py``    one Lloyd iteration: kmjax against scikit-learn, faiss and a plain PyTorch loop
- ``features.py``  dense feature extraction: images per second and the fraction of the matmul peak

Each module has ``main(argv)``; ``experiments/bench_*.py`` call them.
"""
