"""The experiment runner, the impure shell around the core: a config in, one run folder out.

Where each concern lives:

- ``runner.py``  ``run``: the stages in order (data, dictionary, features, classifier, evaluation)
- ``plan.py``    what a config asks of the library (feature spec, dictionary options, devices, data)
- ``processes.py``  a run on several processes (hosts): who writes, who decides, what is shared
- ``export.py``  ``export_features``: a finished run's features in one file
- ``store.py``   run folders (names, the lock, resume checks) and the finished stages saved in them
- ``sweep.py``   ``sweep``: a grid of runs sharing one stage cache; its table and plot
- ``report.py``  progress lines, stage timers, provenance, the closing summary
- ``compile_cache.py``  JAX's persistent compilation cache for runs, and the compile counter (results.json's ``compiles``)
"""

from kmjax.experiment.report import summary
from kmjax.experiment.export import export_features
from kmjax.experiment.plan import dictionary_options, feature_spec, load_data
from kmjax.experiment.runner import run
from kmjax.experiment.store import RunError, new_run_dir, stage_keys
from kmjax.experiment.sweep import parse_grid, sweep

__all__ = ["run", "sweep", "export_features", "parse_grid", "summary", "RunError", "new_run_dir", "stage_keys", "feature_spec",
           "dictionary_options", "load_data"]
