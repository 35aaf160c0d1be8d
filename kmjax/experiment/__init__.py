"""The experiment runner, the impure shell around the core: a config in, one run folder out.

Where each concern lives:

- ``runner.py``  ``run``: the stages in order (data, dictionary, features, classifier, evaluation)
- ``store.py``   run folders (names, the lock, resume checks) and the finished stages saved in them
- ``sweep.py``   ``sweep``: a grid of runs sharing one stage cache; its table and plot
- ``report.py``  progress lines, stage timers, provenance, the closing summary
- ``compile_cache.py``  JAX's persistent compilation cache for runs
"""

from kmjax.experiment.report import summary
from kmjax.experiment.runner import dictionary_options, export_features, feature_spec, load_data, run
from kmjax.experiment.store import RunError, new_run_dir, stage_keys
from kmjax.experiment.sweep import parse_grid, sweep

__all__ = ["run", "sweep", "export_features", "parse_grid", "summary", "RunError", "new_run_dir", "stage_keys", "feature_spec",
           "dictionary_options", "load_data"]
