"""Experiment trackers: a run's metrics written to TensorBoard, MLflow and W&B with their own libraries.

A job asks for trackers by name (`report_to`, defaulting to FT_REPORT_TO) and for W&B also through
OpenAI's `integrations`. The job's sink opens them when training starts, hands them every metric and
closes them however the run ends. A tracker that fails is dropped with a warning event: it never
fails the job. The libraries are imported only when a tracker opens (each costs seconds to import).
"""

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from django.conf import settings

from finetune_site.errors import InvalidInput

log = logging.getLogger(__name__)

LABELS = {"tensorboard": "TensorBoard", "mlflow": "MLflow", "wandb": "Weights & Biases"}
"""The trackers a job may report to (FT_REPORT_TO and the form accept these names), in display order."""
PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow-skinny", "wandb": "wandb"}
INTEGRATION_TYPES = ("wandb",)
"""OpenAI's `integrations` types we serve."""
_WANDB_KEYS = {"project": str, "name": str, "entity": str, "tags": list}
_WANDB_TAG_LENGTH = 64  # W&B refuses longer tags
MLFLOW_EXPERIMENT = "finetune-console"
"""The MLflow experiment runs go to unless MLFLOW_EXPERIMENT_NAME names another."""
WANDB_PROJECT = "finetune-console"
"""The W&B project of a job that reports to W&B without an integration naming one (or WANDB_PROJECT)."""
OUTCOMES = ("succeeded", "failed", "cancelled", "paused", "lost")
"""How a run ended, as close() hears it; "lost": the job was handed to another worker."""


# --- Asking for trackers (job creation) ------------------------------------------


def check_report_to(names: object) -> list[str]:
    """The tracker names asked for, each once; InvalidInput naming the field otherwise."""
    if isinstance(names, str):
        names = [part.strip() for part in names.split(",") if part.strip()]
    if not isinstance(names, list | tuple) or not all(isinstance(name, str) for name in names):
        raise InvalidInput("report_to must be a list of tracker names.", param="report_to")
    unknown = [name for name in names if name not in LABELS]
    if unknown:
        raise InvalidInput(
            f"report_to: unknown tracker {unknown[0]!r}; choose from {', '.join(LABELS)}.", param="report_to"
        )
    return [name for name in LABELS if name in names]


def check_integrations(integrations: object) -> list[dict]:
    """OpenAI's `integrations`, checked and kept as sent; InvalidInput naming the bad field otherwise."""
    if integrations is None:
        return []
    if not isinstance(integrations, list):
        raise InvalidInput(
            'integrations must be a list like [{"type": "wandb", "wandb": {...}}].', param="integrations"
        )
    checked = [_check_integration(item, f"integrations[{index}]") for index, item in enumerate(integrations)]
    if len(checked) > 1:
        raise InvalidInput("A job sends its run to one W&B project: give one wandb integration.", param="integrations")
    return checked


def _check_integration(item: object, where: str) -> dict:
    if not isinstance(item, dict):
        raise InvalidInput(f'{where} must be an object like {{"type": "wandb", "wandb": {{...}}}}.', param=where)
    kind = item.get("type")
    if kind not in INTEGRATION_TYPES:
        raise InvalidInput(
            f"{where}.type {kind!r} is not supported; use {', '.join(map(repr, INTEGRATION_TYPES))}.",
            param=f"{where}.type",
        )
    extra = sorted(set(item) - {"type", "wandb"})
    if extra:
        raise InvalidInput(f"{where} has an unknown field {extra[0]!r}.", param=f"{where}.{extra[0]}")
    return {"type": "wandb", "wandb": _check_wandb(item.get("wandb"), f"{where}.wandb")}


def _check_wandb(options: object, where: str) -> dict:
    if not isinstance(options, dict):
        raise InvalidInput(f'{where} must be an object like {{"project": "my-project"}}.', param=where)
    for key, value in options.items():
        kind = _WANDB_KEYS.get(key)
        if kind is None:
            raise InvalidInput(
                f"{where} has an unknown field {key!r}; use {', '.join(_WANDB_KEYS)}.", param=f"{where}.{key}"
            )
        if value is not None and not isinstance(value, kind):
            raise InvalidInput(f"{where}.{key} must be a {kind.__name__}.", param=f"{where}.{key}")
    project = options.get("project")
    if not isinstance(project, str) or not project.strip():
        raise InvalidInput(f"{where}.project is required: the W&B project the run goes to.", param=f"{where}.project")
    tags = options.get("tags") or []
    for index, tag in enumerate(tags):
        if not isinstance(tag, str) or not tag or len(tag) > _WANDB_TAG_LENGTH:
            raise InvalidInput(
                f"{where}.tags[{index}] must be a text of 1-{_WANDB_TAG_LENGTH} characters.",
                param=f"{where}.tags",
            )
    # As sent, less a null list of tags (OpenAI's job object has none or a list).
    return {key: value for key, value in options.items() if not (key == "tags" and value is None)}


def names_of(report_to: list[str], integrations: list[dict]) -> list[str]:
    """The trackers a job reports to: those asked for by name, and W&B when an integration asks for it."""
    asked = set(report_to) | {item["type"] for item in integrations}
    return [name for name in LABELS if name in asked]


# --- The trackers (the training worker) ------------------------------------------


@dataclass(frozen=True)
class RunInfo:
    """What a tracker needs to know about the run it records."""

    job_id: str
    name: str
    folder: Path
    """Where local trackers write: inside the job's folder, next to its checkpoints (and counted in the owner's storage)."""
    params: dict[str, Any]
    """Hyperparameters and the job's settings: MLflow params, W&B config, TensorBoard text."""
    tags: list[str] = field(default_factory=list)
    """Tags W&B adds to the integration's own (as OpenAI adds openai/finetune and the like)."""
    resume_step: int | None = None
    """The step of the checkpoint this run continues from; steps after it are trained again."""
    previous: dict[str, Any] = field(default_factory=dict)
    """Where this tracker wrote for an earlier run of the job (empty on the first): the run continues there."""
    wandb: dict[str, Any] = field(default_factory=dict)
    """The job's wandb integration options (project, name, entity, tags)."""


class Tracker(Protocol):
    name: str
    where: dict[str, Any]
    """Where it writes (a folder, a tracking URI and run id): stored on the job, shown on its page."""

    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def summarize(self, summary: dict[str, Any]) -> None: ...

    def close(self, outcome: str) -> None: ...


class TensorBoardTracker:
    """Event files under <job>/trackers/tensorboard, one folder for every run of the job."""

    name = "tensorboard"

    def __init__(self, run: RunInfo) -> None:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        logdir = run.folder / "tensorboard"
        # Steps after the checkpoint are trained again: purge_step makes TensorBoard drop
        # what an earlier run wrote from there on, so every step shows once.
        purge_step = (run.resume_step or 0) + 1 if run.previous else None
        # Flushed every few seconds (not the default two minutes), so `tensorboard --logdir` follows the run live.
        self.writer = SummaryWriter(str(logdir), purge_step=purge_step, flush_secs=5)
        self.where = {"logdir": str(logdir)}
        if not run.previous:
            self.writer.add_text("hyperparameters", _markdown_table(run.params))

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def summarize(self, summary: dict[str, Any]) -> None:
        self.writer.add_text("summary", _markdown_table(summary))

    def close(self, outcome: str) -> None:
        self.writer.close()


def mlflow_tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else a SQLite store in FT_HOME (MLflow's file store is in maintenance mode)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(settings.FT_HOME) / 'mlflow.db'}"


class MlflowTracker:
    """One MLflow run per job: a resumed job reopens the run it started."""

    name = "mlflow"
    _STATUS = {"succeeded": "FINISHED", "failed": "FAILED", "cancelled": "KILLED", "paused": "KILLED"}

    def __init__(self, run: RunInfo) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = run.previous.get("tracking_uri") or mlflow_tracking_uri()
        self.client = MlflowClient(uri)
        run_id = run.previous.get("run_id")
        if run_id:
            self.client.update_run(run_id, status="RUNNING")
            experiment_id = run.previous.get("experiment_id")
        else:
            experiment_id = self._experiment_id(os.environ.get("MLFLOW_EXPERIMENT_NAME") or MLFLOW_EXPERIMENT)
            created = self.client.create_run(
                experiment_id, run_name=run.name, tags={"finetune_console.job_id": run.job_id}
            )
            run_id = created.info.run_id
            params = [Param(key, str(value)[:6000]) for key, value in run.params.items()]
            for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(run_id, params=params[start : start + 100])
        self.run_id = run_id
        self.where = {"tracking_uri": uri, "run_id": run_id, "experiment_id": experiment_id}

    def _experiment_id(self, name: str) -> str:
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return self.client.create_experiment(name)
        except Exception:  # another worker created it meanwhile
            experiment = self.client.get_experiment_by_name(name)
            if experiment is None:
                raise
            return experiment.experiment_id

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def summarize(self, summary: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        now, step = int(time.time() * 1000), int(summary.get("steps") or 0)
        numbers = [Metric(f"summary/{k}", v, now, step) for k, v in _numbers(summary).items()]
        if numbers:
            self.client.log_batch(self.run_id, metrics=numbers)

    def close(self, outcome: str) -> None:
        if outcome in self._STATUS:  # a lost run leaves the run to the worker that took the job over
            self.client.set_terminated(self.run_id, self._STATUS[outcome])


def wandb_mode() -> str | None:
    """Offline unless the environment says otherwise: WANDB_MODE, or WANDB_API_KEY for online runs."""
    if os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY"):
        return None  # W&B reads them itself
    return "offline"


class WandbTracker:
    """A W&B run whose id is the job's: a resumed job continues it (offline: a new folder of the same run)."""

    name = "wandb"

    def __init__(self, run: RunInfo) -> None:
        import wandb

        options = run.wandb
        folder = run.folder  # W&B adds its own wandb/ folder inside
        folder.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=options.get("project") or os.environ.get("WANDB_PROJECT") or WANDB_PROJECT,
            entity=options.get("entity") or None,
            name=options.get("name") or run.name,
            tags=[*(options.get("tags") or []), *run.tags],
            id=run.previous.get("run_id") or run.job_id,
            resume="allow",
            dir=str(folder),
            config=run.params,
            mode=wandb_mode(),
            reinit="create_new",  # a worker trains job after job; each run is its own
            settings=wandb.Settings(console="off", save_code=False, disable_git=True, silent=True),
        )
        mode = "offline" if self.run.settings.mode == "dryrun" else self.run.settings.mode  # dryrun: offline's old name
        self.where = {
            "run_id": self.run.id,
            "project": self.run.project,
            "mode": mode,
            "dir": str(folder / "wandb"),
            "url": self.run.url if mode == "online" else None,
        }

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def summarize(self, summary: dict[str, Any]) -> None:
        self.run.summary.update({f"summary/{k}": v for k, v in _numbers(summary).items()})

    def close(self, outcome: str) -> None:
        self.run.finish(exit_code=0 if outcome in ("succeeded", "paused") else 1)


BACKENDS: dict[str, Callable[[RunInfo], Tracker]] = {
    "tensorboard": TensorBoardTracker,
    "mlflow": MlflowTracker,
    "wandb": WandbTracker,
}


class Trackers:
    """The trackers of one run; each call reaches every tracker, and one that fails is dropped with a warning."""

    def __init__(self, warn: Callable[[str], None]) -> None:
        self.warn = warn
        self.open: list[Tracker] = []

    def start(self, names: list[str], run_for: Callable[[str], RunInfo]) -> dict[str, dict]:
        """Open each named tracker; return where each writes."""
        for name in names:
            try:
                self.open.append(BACKENDS[name](run_for(name)))
            except ImportError as exc:
                self.warn(
                    f"{LABELS[name]} is not recording this run: its package is not installed "
                    f"(pip install {PACKAGES[name]}; {exc}). Training goes on."
                )
            except Exception as exc:
                log.exception("the %s tracker could not open", name)
                self.warn(f"{LABELS[name]} is not recording this run: {type(exc).__name__}: {exc}. Training goes on.")
        return {tracker.name: tracker.where for tracker in self.open}

    def log(self, metrics: dict[str, float], step: int) -> None:
        if metrics:
            self._each("log", metrics, step)

    def summarize(self, summary: dict[str, Any]) -> None:
        self._each("summarize", summary)

    def close(self, outcome: str) -> None:
        """Flush and close every tracker; the run is over."""
        self._each("close", outcome)
        self.open = []

    def _each(self, method: str, *args: Any) -> None:
        for tracker in list(self.open):
            try:
                getattr(tracker, method)(*args)
            except Exception as exc:
                log.exception("the %s tracker failed", tracker.name)
                self.open.remove(tracker)
                self.warn(
                    f"{LABELS[tracker.name]} stopped recording this run: {type(exc).__name__}: {exc}. Training goes on."
                )
                if method != "close":
                    try:
                        tracker.close("failed")
                    except Exception:
                        log.warning("the %s tracker could not be closed either", tracker.name, exc_info=True)


def train_metrics(payload: dict[str, Any]) -> dict[str, float]:
    """Every number of an engine metric, under train/ (train/loss, train/lr, train/grad_norm, ...)."""
    return {f"train/{key}": value for key, value in _numbers(payload).items() if key not in ("step", "total_steps")}


def eval_metrics(payload: dict[str, Any]) -> dict[str, float]:
    """Every number of an engine evaluation, under eval/ (eval/loss, eval/token_accuracy, ...)."""
    return {f"eval/{key.removeprefix('eval_')}": value for key, value in _numbers(payload).items() if key != "step"}


def _numbers(values: dict[str, Any]) -> dict[str, float]:
    return {
        key: float(value)
        for key, value in values.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }


def _markdown_table(values: dict[str, Any]) -> str:
    rows = "\n".join(f"| {key} | {value} |" for key, value in values.items())
    return f"| name | value |\n| --- | --- |\n{rows}"


# --- The job page ----------------------------------------------------------------


def described(tracking: dict[str, dict], asked: list[str], *, started: bool) -> list[dict[str, Any]]:
    """For the job page: each tracker the job reports to, where its files are and how to view them."""
    shown = []
    for name in asked:
        where = tracking.get(name)
        item: dict[str, Any] = {"name": name, "label": LABELS[name], "facts": [], "commands": [], "link": None}
        shown.append(item)
        if not where:
            # Before the first run it has nothing yet; after one, it could not open (the events say why).
            item["note"] = "Not recorded: the job's events say why." if started else "Written once training starts."
            continue
        if name == "tensorboard":
            item["facts"] = [("Log folder", where["logdir"])]
            item["commands"] = [f"tensorboard --logdir {where['logdir']}"]
        elif name == "mlflow":
            uri = where["tracking_uri"]
            item["facts"] = [("Tracking URI", uri), ("Run id", where["run_id"])]
            run_path = f"#/experiments/{where.get('experiment_id')}/runs/{where['run_id']}"
            if uri.startswith(("http://", "https://")):
                item["link"] = f"{uri.rstrip('/')}/{run_path}"
            else:
                item["commands"] = [f"mlflow ui --backend-store-uri {uri}"]
                item["facts"].append(("Then open", f"http://127.0.0.1:5000/{run_path}"))
        elif name == "wandb":
            item["facts"] = [("Project", where.get("project")), ("Run id", where["run_id"]), ("Mode", where["mode"])]
            if where.get("url"):
                item["link"] = where["url"]
            if where["mode"] == "offline":
                item["facts"].append(("Offline runs", where["dir"]))
                # One folder per run of the job; synced in order, they make one W&B run.
                item["commands"] = [f"wandb sync {where['dir']}/offline-run-*-{where['run_id']}"]
    return shown
