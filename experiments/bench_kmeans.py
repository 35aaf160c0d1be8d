"""Run ``kmjax.benchmarks.kmeans`` (see its docstring; the same as ``kmjax bench kmeans ...``)."""

from kmjax.benchmarks.kmeans import main

if __name__ == "__main__":
    main()
