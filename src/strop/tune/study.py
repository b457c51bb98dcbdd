"""The Optuna study behind `strop tune`: its storage, sampler and pruner, and the trials a dead worker
left running.

The storage is an SQLite file in the run folder unless `search.storage` names another: any SQLAlchemy
URL (several machines share one PostgreSQL or MySQL study) or `journal:PATH`, a file several processes
append to under a lock. A trial whose worker died (a killed search) is marked failed and queued again
with the same parameters: at once when the worker was on this machine, after the heartbeat's grace
period (RDB storages) when it was elsewhere.
"""

from __future__ import annotations

import os
import random
import socket
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import optuna
from optuna.trial import TrialState

from strop.core.errors import ConfigError
from strop.core.search_config import SearchConfig

HEARTBEAT_S = 20  # RDB storages: a running trial's worker writes a heartbeat this often...
GRACE_S = 90  # ...and a trial whose heartbeat is older than this is taken as dead
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
OPEN_ATTEMPTS = 5

optuna.logging.set_verbosity(optuna.logging.WARNING)
# the heartbeat and stale-trial retry strop relies on are marked experimental, and Optuna expects
# heartbeats only from Study.optimize: strop records them itself (tune/search.py's _heartbeat)
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")


def storage_url(search: SearchConfig, run_dir: Path) -> str:
    return search.storage or f"sqlite:///{run_dir / 'study.db'}"


def open_storage(url: str) -> optuna.storages.BaseStorage:
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        path = Path(url[len("journal:") :]).expanduser()
        if not path.parent.is_dir():
            raise ConfigError(f"search.storage: {path.parent} is not a folder")
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    if "://" not in url:
        raise ConfigError(
            f"search.storage: expected an SQLAlchemy URL (sqlite:///PATH, postgresql://...) or journal:PATH, "
            f"got {url!r}"
        )
    # several workers write one SQLite file: wait for its lock instead of failing at once
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    for attempt in range(OPEN_ATTEMPTS):
        try:
            return optuna.storages.RDBStorage(
                url,
                engine_kwargs=kwargs,
                heartbeat_interval=HEARTBEAT_S,
                grace_period=GRACE_S,
                failed_trial_callback=optuna.storages.RetryFailedTrialCallback(max_retry=2),
            )
        except ImportError as e:  # a driver the URL needs (psycopg2, pymysql) is not installed
            raise ConfigError(f"search.storage: {url.split('://')[0]} needs a driver: {e}") from None
        except Exception as e:  # noqa: BLE001 - SQLAlchemy's own errors: a bad URL, an unreachable server
            # workers starting together race to create the same tables: the loser tries again
            if attempt + 1 == OPEN_ATTEMPTS or "://" not in url or isinstance(e, (ValueError, TypeError)):
                first = str(e).splitlines()[0] if str(e) else ""
                raise ConfigError(f"search.storage: cannot open {url}: {type(e).__name__}: {first}") from None
            time.sleep(0.5 + random.random())
    raise AssertionError("unreachable")


def sampler_for(search: SearchConfig) -> optuna.samplers.BaseSampler:
    if search.sampler == "tpe":
        # Optuna's default of 10 random trials first leaves a 12-trial search almost random
        startup = max(4, min(10, search.trials // 3))
        return optuna.samplers.TPESampler(seed=search.seed, n_startup_trials=startup, constant_liar=True)
    return optuna.samplers.RandomSampler(seed=search.seed)  # random; grid points are queued (tune/search.py)


def pruner_for(search: SearchConfig, eval_every: int | None) -> optuna.pruners.BasePruner:
    if search.pruner == "none":
        return optuna.pruners.NopPruner()
    if not eval_every:
        raise ConfigError(
            f"search.pruner: {search.pruner} prunes on the validation loss logged every train.eval_every "
            "steps; set train.eval_every (or search.pruner: none)"
        )
    if search.pruner == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=search.startup_trials, n_warmup_steps=search.warmup_steps
        )
    return optuna.pruners.HyperbandPruner(min_resource=eval_every, reduction_factor=3)


def open_study(
    search: SearchConfig,
    run_dir: Path,
    name: str,
    direction: Literal["minimize", "maximize"],
    eval_every: int | None,
    finished_value: Callable[[str], float | None],
) -> optuna.Study:
    """The study (created, or loaded to resume it), its dead workers' trials queued again. A study
    resumed with another direction is refused: its finished trials would rank backwards."""
    storage = open_storage(storage_url(search, run_dir))
    study = optuna.create_study(
        storage=storage,
        study_name=name,
        direction=direction,
        sampler=sampler_for(search),
        pruner=pruner_for(search, eval_every),
        load_if_exists=True,
    )
    if study.direction.name.lower() != direction:
        raise ConfigError(
            f"search.direction: the study {name!r} in {storage_url(search, run_dir)} was started to "
            f"{study.direction.name.lower()}, not {direction}; use another run name or storage"
        )
    retry_dead_local_trials(study, finished_value)
    if isinstance(storage, optuna.storages.RDBStorage):
        optuna.storages.fail_stale_trials(study)  # other machines' dead workers, past the grace period
    return study


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def retry_dead_local_trials(study: optuna.Study, finished_value: Callable[[str], float | None]) -> list[int]:
    """Trials left running by a worker of this machine that is no longer alive. One whose run had
    finished (killed between the run's end and the study hearing of it) is recorded with the value
    `finished_value(folder)` reads from it; the others are failed and queued again with the same
    parameters. Returns the numbers queued again."""
    host = socket.gethostname()
    retried = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = str(t.user_attrs.get("worker", ""))
        where, _, pid = worker.rpartition(":")
        if where != host or not pid.isdigit() or _alive(int(pid)):
            continue
        folder = t.user_attrs.get("folder")
        value = finished_value(folder) if folder else None
        try:
            if value is not None:
                study.tell(t.number, value)
                continue
            # the mark first: a finished trial can no longer be changed
            study._storage.set_trial_user_attr(t._trial_id, "interrupted", True)
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        except Exception:  # noqa: BLE001 - another worker took it first
            continue
        queue_again(study, t)
        retried.append(t.number)
    return retried


def queue_again(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    cmdline = Path(f"/proc/{pid}/cmdline")
    return not cmdline.exists() or b"strop" in cmdline.read_bytes()


def finished_count(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def counts(study: optuna.Study) -> dict[str, int]:
    """Trials by state: {"complete": 9, "pruned": 3, ...}."""
    out: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        out[t.state.name.lower()] = out.get(t.state.name.lower(), 0) + 1
    return out
