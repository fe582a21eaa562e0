"""The tracking backends of ``logger=`` (``runner/loggers.py``): TensorBoard and MLflow, each an optional extra.

- ``TensorBoardLogger`` (``pip install "sparse_elbo[tensorboard]"``): ``torch.utils.tensorboard`` event files
  in ``tensorboard/`` beside ``results.h5`` — every scalar of the epoch's record, a λ histogram, the dictionary
  ordered by λ at the first epoch, then at the first epoch after every ``image_every_s`` seconds, and at the end
  (a cadence in seconds: a run of short epochs is not slowed by an image per epoch), the resolved config as
  text. A sweep's jobs are
  the subfolders of its folder: ``tensorboard --logdir <sweep folder>`` shows them side by side. A resumed run
  writes from its first epoch on with ``purge_step``, which hides what the interrupted process had logged
  from there. The writer flushes every two seconds (and at the end).
- ``MLflowLogger`` (``pip install "sparse_elbo[mlflow]"``): one MLflow run per job — the same metrics (step =
  epoch), the resolved config as params, the dictionary images, and ``results.h5`` as an artifact at the end —
  in the tracking store ``tracking_uri`` (default: ``sqlite:///mlruns/mlflow.db`` under the working directory,
  artifacts in ``mlruns/artifacts``), in the experiment ``experiment`` (default: the sweep's folder for a
  sweep's jobs, else ``sparse_elbo``). The run is tagged with its results file, so a resumed run finds it and
  logs from its first epoch on, skipping epochs the store already holds. Metrics are sent in batches, at most
  every ``flush_every_s`` seconds (and at the end), so that short epochs do not pay a store write each. A
  server that cannot be reached is found out by a connection attempt of ``connect_timeout_s`` seconds.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path
from urllib.parse import urlparse

from omegaconf import OmegaConf

from sparse_elbo.runner.loggers import EpochRecord, LogContext, require_extra
from sparse_elbo.validation import require_at_least, require_positive

RESULTS_TAG = "sparse_elbo.results"


class ImageCadence:
    """Whether an epoch's dictionary image is due: the first epoch, then the first after every ``every_s``
    seconds (0: every epoch); ``last_epoch`` is the last epoch drawn."""

    def __init__(self, every_s: float):
        self.every_s, self.last_time, self.last_epoch = every_s, None, None

    def due(self, epoch: int) -> bool:
        now = time.monotonic()
        if self.last_time is not None and now - self.last_time < self.every_s:
            return False
        self.last_time, self.last_epoch = now, epoch
        return True


class TensorBoardLogger:
    """``logger=tensorboard`` (module docstring)."""

    option, active = "tensorboard", True

    def __init__(self, image_every_s: float = 10.0):
        require_extra("tensorboard", "tensorboard", "tensorboard")
        require_at_least(0, image_every_s=image_every_s)
        self.images = ImageCadence(float(image_every_s))

    def open(self, context: LogContext) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.image_shape = context.image_shape
        log_dir = context.results_path.parent / "tensorboard"
        self.writer = SummaryWriter(str(log_dir), purge_step=context.first_epoch or None, flush_secs=2)
        if context.first_epoch == 0:
            self.writer.add_text("config", f"```\n{OmegaConf.to_yaml(context.config)}\n```", 0)
            self.writer.add_text("overrides", context.name, 0)

    def epoch(self, record: EpochRecord) -> None:
        for key, value in record.metrics.items():
            self.writer.add_scalar(key, value, record.epoch)
        self.writer.add_histogram("lambda", record.lam, record.epoch)
        if self.images.due(record.epoch):
            self.writer.add_image("dictionary", record.image(self.image_shape)[None], record.epoch, dataformats="CHW")

    def close(self, status: str, last: EpochRecord | None) -> None:
        if last is not None and self.images.last_epoch != last.epoch:
            self.writer.add_image("dictionary", last.image(self.image_shape)[None], last.epoch, dataformats="CHW")
        self.writer.add_text("status", status, last.epoch if last is not None else 0)
        self.writer.close()


def _reachable(uri: str, timeout_s: float) -> None:
    """An http(s) tracking server must accept a connection within ``timeout_s`` seconds."""
    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https"):
        return
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    with socket.create_connection((parsed.hostname, port), timeout=timeout_s):
        pass


class MLflowLogger:
    """``logger=mlflow`` (module docstring)."""

    option, active = "mlflow", True

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment: str | None = None,
        image_every_s: float = 10.0,
        flush_every_s: float = 2.0,
        connect_timeout_s: float = 5.0,
    ):
        require_extra("mlflow", "mlflow", "mlflow")
        require_at_least(0, image_every_s=image_every_s, flush_every_s=flush_every_s)
        require_positive(connect_timeout_s=connect_timeout_s)
        self.tracking_uri, self.experiment, self.images = tracking_uri, experiment, ImageCadence(float(image_every_s))
        self.flush_every_s, self.connect_timeout_s = float(flush_every_s), float(connect_timeout_s)
        self.pending, self.flushed = [], 0.0

    def open(self, context: LogContext) -> None:
        from mlflow import MlflowClient

        store = Path.cwd() / "mlruns"
        uri = self.tracking_uri or f"sqlite:///{store / 'mlflow.db'}"
        _reachable(uri, self.connect_timeout_s)
        if self.tracking_uri is None:
            store.mkdir(exist_ok=True)
        self.client, self.image_shape, self.results = MlflowClient(uri), context.image_shape, context.results_path
        experiment = self._experiment(context, None if self.tracking_uri else store / "artifacts")
        results = str(context.results_path.resolve())
        found = self.client.search_runs([experiment], filter_string=f"tags.`{RESULTS_TAG}` = '{results}'")
        if found:  # a resumed run: the same MLflow run, from the epoch after the last it holds
            self.run_id = found[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            self.logged = max((m.step for m in self.client.get_metric_history(self.run_id, "elbo")), default=-1)
            return
        self.run_id = self.client.create_run(experiment, run_name=context.name, tags={RESULTS_TAG: results}).info.run_id
        self.logged = -1
        self._log_params(context.config)

    def _experiment(self, context: LogContext, artifacts: Path | None) -> str:
        name = self.experiment or (f"sparse_elbo {context.group}" if context.group else "sparse_elbo")
        existing = self.client.get_experiment_by_name(name)
        if existing is not None:
            return existing.experiment_id
        location = None if artifacts is None else (artifacts / name.replace("/", "_").replace(" ", "_")).as_uri()
        return self.client.create_experiment(name, artifact_location=location)

    def _log_params(self, config: dict) -> None:
        from mlflow.entities import Param

        flat = OmegaConf.to_container(OmegaConf.create(config), resolve=True)
        items = sorted(_flatten(flat).items())
        params = [Param(key[:250], str(value)[:6000]) for key, value in items]
        for start in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[start : start + 100])

    def epoch(self, record: EpochRecord) -> None:
        from mlflow.entities import Metric

        if record.epoch <= self.logged:  # logged before the interruption
            return
        now = int(time.time() * 1000)
        self.pending += [Metric(key, value, now, record.epoch) for key, value in record.metrics.items()]
        if time.monotonic() - self.flushed >= self.flush_every_s:
            self._flush()
        if self.images.due(record.epoch):
            self.client.log_image(self.run_id, record.image(self.image_shape), key="dictionary", step=record.epoch)

    def _flush(self) -> None:
        for start in range(0, len(self.pending), 1000):  # the store's limit per batch
            self.client.log_batch(self.run_id, metrics=self.pending[start : start + 1000])
        self.pending, self.flushed = [], time.monotonic()

    def close(self, status: str, last: EpochRecord | None) -> None:
        self._flush()
        if last is not None:
            self.client.log_image(self.run_id, last.image(self.image_shape), artifact_file="dictionary_final.png")
        if status == "finished":
            self.client.log_artifact(self.run_id, str(self.results))
        self.client.set_terminated(self.run_id, {"finished": "FINISHED", "interrupted": "KILLED"}.get(status, "FAILED"))


def _flatten(config: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out
