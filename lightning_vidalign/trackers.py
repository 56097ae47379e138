"""Experiment trackers besides TensorBoard (issue 36): what Lightning's loggers need to follow a resumed run."""
from __future__ import annotations

import logging
from argparse import Namespace
from typing import Any

from lightning.pytorch.loggers import MLFlowLogger as _LightningMLFlowLogger
from lightning.pytorch.utilities import rank_zero_only

log = logging.getLogger(__name__)


class MLFlowLogger(_LightningMLFlowLogger):
    """Lightning's ``MLFlowLogger`` that can log the hyperparameters of a resumed run into the same MLflow run.

    MLflow refuses to change a logged parameter ("Changing param values is not allowed"): a run resumed with any
    changed setting (a longer schedule to extend a finished run, a moved checkpoint path) crashed at
    ``log_hyperparams``. Here the parameters the run already holds with the same value are not sent again, a changed
    one is logged as ``<key>:resume<n>`` (the value of the ``n``-th resume that changed it; the first value stays under
    its key) and named in the log, new ones are logged as usual. Our choice. Arguments: Lightning's ``MLFlowLogger``'s.
    """

    def __init__(self, *args, **kwargs):
        import os

        # (Lightning's default is the variable at its import; a config's explicit null, or a variable set later, reads it now)
        uri = kwargs["tracking_uri"] = kwargs.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri and not os.environ.get("MLFLOW_ALLOW_FILE_STORE"):  # (MLflow 3 would refuse the folder store deep in a traceback)
            raise ValueError("MLFlowLogger: no tracking server or database: set MLFLOW_TRACKING_URI (a server, e.g. http://127.0.0.1:5000, "
                             "or a local database, e.g. sqlite:///runs/mlflow.db) or --trainer.logger.init_args.tracking_uri; MLflow 3 "
                             "refuses its plain-folder store unless MLFLOW_ALLOW_FILE_STORE=true")
        super().__init__(*args, **kwargs)

    @rank_zero_only
    def log_hyperparams(self, params: dict[str, Any] | Namespace) -> None:
        from lightning.fabric.utilities.logger import _convert_params, _flatten_dict
        from mlflow.entities import Param

        params = {k: str(v)[:250] for k, v in _flatten_dict(_convert_params(params)).items()}
        held = dict(self.experiment.get_run(self.run_id).data.params)
        latest = {k: held[max((h for h in held if h == k or h.startswith(f"{k}:resume")), key=lambda h: (len(h), h))] for k in params if k in held}
        changed = {k for k, v in params.items() if k in latest and latest[k] != v}
        if changed:
            log.warning("MLflow run %s: resumed with changed parameters %s: logged as <key>:resume<n>", self.run_id, sorted(changed))

        def key(k: str) -> str:
            if k not in changed:
                return k
            return f"{k}:resume{1 + sum(h.startswith(f'{k}:resume') for h in held)}"

        todo = [Param(key=key(k), value=v) for k, v in params.items() if k not in held or k in changed]
        for i in range(0, len(todo), 100):  # (MLflow's batch limit)
            self.experiment.log_batch(run_id=self.run_id, params=todo[i : i + 100], **self._log_batch_kwargs)
