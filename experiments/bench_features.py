"""Run ``kmjax.benchmarks.features`` (see its docstring; the same as ``kmjax bench features ...``)."""

from kmjax.benchmarks.features import main

if __name__ == "__main__":
    main()
