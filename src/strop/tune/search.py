"""`strop tune`: a hyperparameter search whose trials are ordinary strop runs.

    RUN_DIR/                      output_dir/name of the config searched
      study.db                    the Optuna study (unless search.storage names another)
      trials/NNN/                 trial NNN: a strop run (config.yaml, metrics.jsonl, model/, report)
      best.yaml                   the config with the best trial's parameters, ready for strop train
      study.json, report.html/md  every trial, the history, importances (report/study.py)
      refit/best, refit/default   with --refit: both configs retrained and compared on data.test

Trials never see data.test: they are scored on the validation set, and only the refit touches the test
set, once per config. Running the same command again resumes the study: finished trials are kept, and
trials a killed search left unfinished run again from the start.
"""

from __future__ import annotations

import logging
import shutil
import signal
import threading
from contextlib import contextmanager

import optuna
from optuna.trial import TrialState

from strop.core.config import RunConfig, load_config, to_yaml
from strop.core.device import usable_cores
from strop.core.errors import ConfigError, Interrupted, StropError
from strop.core.io import atomic_write_text
from strop.core.progress import tqdm
from strop.core.search_config import SearchConfig, default_direction
from strop.eval.suite import metric_names
from strop.tune import study as studies
from strop.tune.outcome import TuneResult, write_outcome
from strop.tune.space import (
    Param,
    apply_params,
    blamed_key,
    check_point,
    grid_points,
    parse_space,
    problems,
    space_error,
)
from strop.tune.trial import Objective, TrialFailed, TrialInterrupted, TrialRunner, read_value

log = logging.getLogger("strop.tune")

MAX_FAILURES_IN_A_ROW = 3
CLASSIFIER_METRICS = ("accuracy", "macro_f1")


def prepare(cfg: RunConfig, search: SearchConfig) -> tuple[list[Param], Objective, dict]:
    """Everything checked before the study opens: the space, the objective, the folder. Returns the
    parameters, the objective and the base config (as a dict, without its search section)."""
    if cfg.stages:
        raise ConfigError("search: a config with stages cannot be searched yet; search one stage's config")
    base = cfg.model_dump(mode="json", exclude={"search"})
    params = parse_space(search.space, base)
    if search.sampler == "grid":  # every point checked before any folder exists
        for point in grid_points(params):
            check_point(base, point)
    direction = search.direction or default_direction(search.objective)
    objective = Objective.of(search.objective, direction)
    _check_objective(cfg, search.objective)
    if not cfg.data.validation and cfg.data.val_fraction == 0:
        raise ConfigError(
            "data.val_fraction: a search scores its trials on held-out data, so give data.validation or "
            "a data.val_fraction above 0"
        )
    run_dir = cfg.run_dir
    if (run_dir / "result.json").exists() or (run_dir / "checkpoints").exists():
        raise ConfigError(
            f"name: {run_dir} holds a training run, not a search; choose another name (--set name=...)"
        )
    return params, objective, base


def tune(
    cfg: RunConfig,
    search: SearchConfig,
    refit: bool = False,
    show_progress: bool = True,
) -> TuneResult:
    params, objective, base = prepare(cfg, search)
    if refit and not cfg.data.test:
        raise ConfigError("--refit: the refit is evaluated on data.test, and this config has no data.test")
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)

    def finished_value(folder: str) -> float | None:
        """The value of a trial run that finished though its worker died before telling the study."""
        trial_dir = run_dir / folder
        if not (
            (trial_dir / "result.json").is_file() and (trial_dir / "model" / "strop_model.json").is_file()
        ):
            return None
        try:
            return read_value(trial_dir, objective.name)
        except TrialFailed:
            return None

    study = studies.open_study(
        search, run_dir, cfg.name, objective.direction, cfg.train.eval_every, finished_value
    )
    planned = search.trials
    if search.sampler == "grid":
        points = grid_points(params)
        for point in points:
            study.enqueue_trial(point, skip_if_exists=True)
        if planned > len(points):
            planned = len(points)
    _remember(study, search, objective, params)
    search_run = Search(study, params, objective, base, run_dir, search, planned)
    search_run.run(show_progress)

    result = write_outcome(study, cfg, search, objective, base, planned)
    if search_run.crash is not None:  # a fault of strop's own in a worker: its traceback, exit 1
        raise search_run.crash
    if search_run.failure:
        raise StropError(search_run.failure)
    if refit and result.best:
        from strop.tune.refit import refit_and_compare

        result.refit = refit_and_compare(cfg, result, show_progress)
    return result


class Search:
    """The workers' loop: ask the study for a trial, run it as a child process, tell the outcome,
    until the study holds `planned` finished trials (complete or pruned).

    A trial fails in one of two ways. The space's: its values make the config invalid, or its run's
    error line begins with a searched key (`method.lora.target_modules: ... not found`); the search
    stops at once with an error naming `search.space.KEY`. Any other (a diverged run, a data error):
    the trial is recorded as failed and the search goes on, unless no trial has finished yet or
    `MAX_FAILURES_IN_A_ROW` failed in a row. Either way the trial is told to the study as failed, and
    `failure` holds the error the search ends with; `crash` holds an exception a worker did not expect.
    """

    def __init__(self, study, params, objective, base, run_dir, search: SearchConfig, planned: int):
        self.study, self.params, self.objective, self.base = study, params, objective, base
        self.run_dir, self.search, self.planned = run_dir, search, planned
        self.distributions = {p.key: p.distribution for p in params}
        self.runner = TrialRunner(objective)
        self.lock = threading.Lock()
        self.failures_in_a_row = 0
        self.failure: str | None = None
        self.crash: BaseException | None = None
        self.bar: tqdm | None = None
        self.threads_per_trial = max(1, usable_cores() // search.workers)

    def run(self, show_progress: bool) -> None:
        done = studies.finished_count(self.study)
        if done >= self.planned:
            log.info(
                "tune: the study already holds %d finished trials (search.trials %d)", done, self.planned
            )
            return
        if done:
            log.info("tune: resuming the study with %d of %d trials finished", done, self.planned)
        self.bar = tqdm(
            total=self.planned, initial=done, desc="trials", unit="trial", disable=not show_progress
        )
        workers = [threading.Thread(target=self._work, daemon=True) for _ in range(self.search.workers)]
        with self._signals(), _heartbeat(self.study, self.runner):
            for w in workers:
                w.start()
            while any(w.is_alive() for w in workers):
                for w in workers:
                    w.join(timeout=1.0)
                self._show()
        self.bar.close()
        if self.runner.stopping:
            counts = studies.counts(self.study)
            raise Interrupted(
                self._signum or signal.SIGINT,
                f"the study keeps {counts.get('complete', 0) + counts.get('pruned', 0)} finished trials; "
                "run the same strop tune command to resume it",
            )

    _signum: int | None = None

    @contextmanager
    def _signals(self):
        """A first SIGINT/SIGTERM stops every running trial at its next safe point; a second stops them
        at once."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handle(signum, frame):
            first = self._signum is None
            self._signum = signum
            self.runner.stop(signal.SIGTERM if first else signal.SIGINT)
            if first and self.bar is not None:
                self.bar.write("stopping: the running trials stop at their next step (signal again to force)")

        previous = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def _work(self) -> None:
        try:
            self._loop()
        except Exception as e:  # noqa: BLE001 - said by the main thread, not lost with this one
            with self.lock:
                self.crash = self.crash or e
                self.failure = self.failure or f"a worker stopped: {type(e).__name__}: {e}"

    def _loop(self) -> None:
        while not self.runner.stopping and self.failure is None and self.crash is None:
            with self.lock:
                active = len(self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
                if studies.finished_count(self.study) + active >= self.planned:
                    return
                trial = self.study.ask(self.distributions)
                trial.set_user_attr("worker", studies.worker_id())
                if isinstance(self.study._storage, optuna.storages.RDBStorage):
                    self.study._storage.record_heartbeat(trial._trial_id)
            self._one(trial)

    def _one(self, trial: optuna.Trial) -> None:
        number = trial.number
        trial_dir = self.run_dir / "trials" / f"{number:03d}"
        try:
            config = self._trial_config(trial.params, number)
        except ConfigError as e:  # values each end of the space passed, together refused
            self._space_failed(trial, space_error(trial.params, problems(e)))
            return
        trial_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(trial_dir / "config.yaml", to_yaml(config))
        trial.set_user_attr("folder", str(trial_dir.relative_to(self.run_dir)))
        try:
            outcome = self.runner.run(trial, trial_dir / "config.yaml", trial_dir)
        except TrialInterrupted:
            trial.set_user_attr("interrupted", True)
            self.study.tell(trial, state=TrialState.FAIL)
            studies.queue_again(self.study, self.study._storage.get_trial(trial._trial_id))
            return
        except TrialFailed as e:
            if blamed_key(str(e), trial.params) is not None:
                what = f"failed trial {number:03d} (log: {trial_dir / 'log.txt'})"
                self._space_failed(trial, space_error(trial.params, str(e), what))
            else:
                self._failed(trial, str(e))
            return
        finally:
            if not self.search.keep_checkpoints:
                shutil.rmtree(trial_dir / "checkpoints", ignore_errors=True)
        trial.set_user_attr("steps", outcome.steps)
        trial.set_user_attr("total_steps", outcome.total_steps)
        trial.set_user_attr("seconds", outcome.seconds)
        trial.set_user_attr("train_seconds", outcome.train_seconds)
        with self.lock:
            self.failures_in_a_row = 0
            if outcome.state == "pruned":
                self.study.tell(trial, state=TrialState.PRUNED)
                self._say(
                    f"trial {number:03d} pruned at step {outcome.steps} of {outcome.total_steps or '?'}"
                )
            else:
                self.study.tell(trial, outcome.value)
                self._say(
                    f"trial {number:03d} {self.objective.name} {outcome.value:.4f} ({_params(trial.params)})"
                )
            if self.bar is not None:
                self.bar.update(1)

    def _failed(self, trial: optuna.Trial, message: str) -> None:
        with self.lock:
            trial.set_user_attr("error", message)
            self.study.tell(trial, state=TrialState.FAIL)
            self.failures_in_a_row += 1
            self._say(f"trial {trial.number:03d} failed: {message}")
            never_worked = not self.study.get_trials(deepcopy=False, states=studies.FINISHED)
            objective_missing = message.startswith("search.objective")
            if never_worked or objective_missing or self.failures_in_a_row >= MAX_FAILURES_IN_A_ROW:
                self.failure = f"trial {trial.number:03d} failed: {message}"
                if never_worked and not objective_missing:
                    self.failure += f" (log: {self.run_dir / 'trials' / f'{trial.number:03d}' / 'log.txt'})"

    def _space_failed(self, trial: optuna.Trial, message: str) -> None:
        """A trial the space's values failed: the search ends with `message`, naming the key."""
        with self.lock:
            trial.set_user_attr("error", message)
            self.study.tell(trial, state=TrialState.FAIL)
            self._say(f"trial {trial.number:03d} failed: {message}")
            self.failure = self.failure or message

    def _trial_config(self, values: dict, number: int) -> RunConfig:
        raw = apply_params(self.base, values)
        raw.update(name=f"{number:03d}", output_dir=str(self.run_dir / "trials"))
        raw["data"]["test"] = []  # trials are chosen on the validation set; the test set is the refit's
        if raw["train"].get("threads") is None:
            raw["train"]["threads"] = self.threads_per_trial
        ev = raw["eval"]
        if self.objective.name.startswith("val_"):
            ev["enabled"] = False  # the objective is logged by the loop's own validation
        else:
            ev["enabled"] = True
            if raw.get("task", "sft") == "sft":  # only the tuned model's score is needed
                ev.update(base=False, kshot=0, forgetting=False)
        return load_config(raw)

    def _say(self, line: str) -> None:
        if self.bar is not None and not self.bar.disable:
            self.bar.write(line)
        else:
            log.info("%s", line)

    def _show(self) -> None:
        if self.bar is None:
            return
        try:
            best = self.study.best_trial
            best_text = f"{best.value:.4f} (#{best.number:03d})"
        except ValueError:
            best_text = "—"
        counts = studies.counts(self.study)
        running = [f"#{n:03d} {p.step}/{p.total or '?'}" for n, p in sorted(self.runner.progress.items())]
        self.bar.set_postfix_str(
            f"best {best_text}, pruned {counts.get('pruned', 0)}"
            + (f", running {' '.join(running)}" if running else ""),
            refresh=True,
        )


def _check_objective(cfg: RunConfig, name: str) -> None:
    """An end-of-run metric must be one the run's evaluation computes; val_* are checked by the first
    trial (what a validation logs depends on the task)."""
    if name.startswith("val_"):
        return
    known = list(CLASSIFIER_METRICS) if cfg.task == "classification" else None
    if cfg.task == "sft":
        known = metric_names(cfg.eval)
    if known is None:
        raise ConfigError(
            f"search.objective: a {cfg.task} run is searched on its validation metrics (val_loss, or "
            f"another val_* it logs), got {name!r}"
        )
    if name not in known:
        raise ConfigError(
            f"search.objective: {name} is not among this run's evaluation metrics ({', '.join(known)}); "
            "add it to eval.metrics or use val_loss"
        )


def _remember(study: optuna.Study, search: SearchConfig, objective: Objective, params: list[Param]) -> None:
    study.set_user_attr(
        "strop",
        {
            "objective": objective.name,
            "direction": objective.direction,
            "intermediate": objective.intermediate,
            "sign": objective.sign,
            "sampler": search.sampler,
            "pruner": search.pruner,
            "space": {p.key: repr(p.distribution) for p in params},
        },
    )


def _params(values: dict) -> str:
    return ", ".join(f"{k}={_short(v)}" for k, v in values.items())


def _short(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


@contextmanager
def _heartbeat(study: optuna.Study, runner: TrialRunner):
    """RDB storages: a heartbeat for each trial this process runs, so other workers can tell a dead
    one's trials from live ones."""
    storage = study._storage
    if not isinstance(storage, optuna.storages.RDBStorage):
        yield
        return
    stop = threading.Event()

    def beat():
        while not stop.wait(studies.HEARTBEAT_S / 2):
            ids = {
                t.number: t._trial_id for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            }
            for number in list(runner.running):
                if number in ids:
                    storage.record_heartbeat(ids[number])

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
