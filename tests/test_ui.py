"""`strop ui` over HTTP, against a real uvicorn on loopback: the token, the runs table's statuses,
the curve tail, the start form's validation (the CLI's own message), a run started, stopped with a
checkpoint and resumed from the dashboard, chat streamed through the run's `strop serve` app, predict
on a classification run, and the compare view. The browser's view of the same is test_ui_browser.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from conftest import ALPACA_ROWS, assert_user_error, run_cli, tiny_config, write_jsonl
from strop.serve.run import bind

TOKEN = "test-token-0123456789"
OLD = time.time() - 3600  # an hour ago: files of a run nobody is writing


def request(url: str, body: dict | None = None, token: str | None = TOKEN, raw: bool = False):
    """(status, JSON body or text) of a GET, or a POST of `body`; `token` in the dashboard's header."""
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if token:
        headers["X-Strop-Token"] = token
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers=headers, method="POST" if data else "GET")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            text = r.read().decode()
            status = r.status
    except urllib.error.HTTPError as e:
        text, status = e.read().decode(), e.code
    if raw:
        return status, text
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


@contextmanager
def dashboard(root: Path):
    """The dashboard over `root` on a free loopback port, in a thread; jobs it started are stopped."""
    import uvicorn

    from strop.ui.app import build_app

    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    app, jobs, playground = build_app(root, TOKEN, f"strop_ui_{port}", device="cpu")
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "the dashboard did not start"
        time.sleep(0.02)
    try:
        yield SimpleNamespace(url=f"http://127.0.0.1:{port}", jobs=jobs, root=root)
    finally:
        jobs.stop_all()
        for job in jobs.jobs.values():
            if job.process is not None:
                job.process.wait(60)
        playground.close()
        server.should_exit = True
        thread.join(30)


def tiny_yaml(folder: Path, model: Path, **sections) -> Path:
    """A tiny SFT config file (its data beside it), as a user would start from."""
    data = write_jsonl(folder / "train.jsonl", ALPACA_ROWS)
    cfg = tiny_config(model, data, folder / "unused-out", **sections)
    del cfg["data"]["cache_dir"]
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def train_tiny(root: Path, model: Path, name: str = "tuned") -> Path:
    """A really trained tiny run in `root/name`, evaluated (samples) and reported."""
    from strop.recipes.run import train

    data = write_jsonl(root.parent / f"{name}-train.jsonl", ALPACA_ROWS)
    cfg = tiny_config(
        model,
        data,
        root,
        name=name,
        train={"batch_size": 4, "max_steps": 4, "seed": 0, "eval_every": 2, "save_every": 2},
        eval={"enabled": True, "max_examples": 4, "max_new_tokens": 8, "bootstrap": 100, "forgetting": False},
    )
    del cfg["data"]["cache_dir"]
    train(cfg, show_progress=False)
    return root / name


def plant(
    root: Path, name: str, records: list[dict], checkpoint: int | None = None, old: bool = True
) -> Path:
    """A run folder as an unfinished `strop train` leaves it: config, metrics and maybe a checkpoint."""
    run = root / name
    run.mkdir(parents=True)
    cfg = {"name": name, "task": "sft", "model": {"name": "tiny"}, "method": {"name": "lora"}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if checkpoint is not None:
        ckpt = run / "checkpoints" / f"step-{checkpoint:06d}"
        ckpt.mkdir(parents=True)
        (ckpt / "state.json").write_text(json.dumps({"step": checkpoint, "best_val_loss": 2.5}))
    if old:
        for p in [run, *run.rglob("*")]:
            os.utime(p, (OLD, OLD))
    return run


CURVE = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.8}, {"step": 2, "val_loss": 2.9}]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama) -> Path:
    return train_tiny(tmp_path_factory.mktemp("ui-runs") / "runs", tiny_llama)


def test_every_request_needs_the_token(tmp_path):
    (tmp_path / "runs").mkdir()
    with dashboard(tmp_path / "runs") as ui:
        for path in ("/", "/api/runs", "/start", "/static/ui.js", "/serve/x/v1/models", "/compare"):
            assert request(ui.url + path, token=None)[0] == 401, path
            assert request(ui.url + path, token="wrong")[0] == 401, path
        assert request(ui.url + "/api/runs")[0] == 200
        # the printed address: ?token= answers with a cookie and a redirect that drops the token
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())
        with opener.open(f"{ui.url}/start?base=quickstart&token={TOKEN}", timeout=30) as r:
            assert r.status == 200 and r.url == f"{ui.url}/start?base=quickstart"
        with opener.open(ui.url + "/api/runs", timeout=30) as r:  # the cookie alone now
            assert r.status == 200 and json.loads(r.read()) == []
        assert request(ui.url + "/api/start", {"base": "quickstart"}, token=None)[0] == 401


def test_runs_table_tells_each_status_from_the_files(tmp_path, trained):
    import shutil

    root = tmp_path / "runs"
    shutil.copytree(trained, root / "tuned")
    plant(root, "stopped", CURVE, checkpoint=2)
    plant(root, "failed", CURVE[:1])
    plant(root, "live", CURVE, old=False)
    plant(root / "study" / "trials", "003", CURVE, checkpoint=2)  # runs nest (stages, tune trials)
    (root / "not-a-run").mkdir()
    with dashboard(root) as ui:
        status, rows = request(ui.url + "/api/runs")
    assert status == 200
    by_id = {r["id"]: r for r in rows}
    assert set(by_id) == {"tuned", "stopped", "failed", "live", "study/trials/003"}
    assert {k: r["status"] for k, r in by_id.items()} == {
        "tuned": "finished",
        "stopped": "stopped",
        "failed": "failed",
        "live": "running",
        "study/trials/003": "stopped",
    }
    result = json.loads((trained / "result.json").read_text())["metrics"]
    tuned = by_id["tuned"]
    assert tuned["best_val_loss"] == pytest.approx(result["best_val_loss"])
    assert (tuned["task"], tuned["method"], tuned["steps"]) == ("sft", "lora", 4)
    summary = json.loads((trained / "eval" / "summary.json").read_text())
    first = next(iter(summary["metrics"]))
    assert tuned["metric"] == first and tuned["metric_value"] == summary["metrics"][first]["tuned"]
    assert by_id["stopped"]["best_val_loss"] == 2.9 and by_id["failed"]["best_val_loss"] is None


def test_the_curve_tail_waits_for_whole_lines_and_restarts_when_the_file_is_rewritten(tmp_path):
    root = tmp_path / "runs"
    run = plant(root, "r", CURVE)
    with dashboard(root) as ui:
        _, first = request(ui.url + "/api/metrics/r?offset=0")
        assert first["records"] == CURVE and not first["reset"]
        with open(run / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": 3, "loss": 2.5}) + "\n" + '{"step": 4, "lo')  # the last one torn
        _, more = request(f"{ui.url}/api/metrics/r?offset={first['offset']}")
        assert more["records"] == [{"step": 3, "loss": 2.5}]
        with open(run / "metrics.jsonl", "a") as f:
            f.write('ss": 2.4}\n')
        _, rest = request(f"{ui.url}/api/metrics/r?offset={more['offset']}")
        assert rest["records"] == [{"step": 4, "loss": 2.4}]
        (run / "metrics.jsonl").write_text(json.dumps(CURVE[0]) + "\n")  # a resume rewrites it shorter
        _, again = request(f"{ui.url}/api/metrics/r?offset={rest['offset']}")
        assert again["reset"] and again["records"] == [CURVE[0]]
        assert request(ui.url + "/api/metrics/../../etc?offset=0")[0] == 404
        assert request(ui.url + "/run/nope")[0] == 404


def test_the_form_rejects_a_bad_value_with_the_clis_own_message(tmp_path, tiny_llama, capsys):
    config = tiny_yaml(tmp_path, tiny_llama)
    (tmp_path / "runs").mkdir()
    rc, _, err = run_cli(["train", str(config), "--set", "optim.lr=fast"], capsys)
    assert_user_error(rc, err, "optim.lr")
    with dashboard(tmp_path / "runs") as ui:
        status, body = request(ui.url + "/api/check", {"base": str(config), "values": {"optim.lr": "fast"}})
        assert status == 400
        assert body["error"] == err.strip()  # `error: invalid config (...):\n  optim.lr: ...`, word for word
        status, body = request(ui.url + "/api/start", {"base": str(config), "values": {"output_dir": "/tmp"}})
        assert status == 400 and body["error"].startswith("error: output_dir:")
        assert not ui.jobs.jobs  # nothing was started
        status, page = request(ui.url + f"/start?base={config}", raw=True)
        assert status == 200
        assert 'name="optim.lr"' in page and "steps between validations" in page  # the field's description


def test_check_shows_data_findings_and_the_command(tmp_path, tiny_llama):
    config = tiny_yaml(tmp_path, tiny_llama)
    rows = [*ALPACA_ROWS, ALPACA_ROWS[0]]  # a duplicate row: the data check names it
    write_jsonl(tmp_path / "train.jsonl", rows)
    (tmp_path / "runs").mkdir()
    with dashboard(tmp_path / "runs") as ui:
        status, body = request(
            ui.url + "/api/check", {"base": str(config), "values": {"train.max_steps": "2"}}
        )
    assert status == 200, body
    assert body["findings"]["text"].startswith("strop data check")
    assert "duplicate" in body["findings"]["text"]
    assert "--set train.max_steps=2" in body["command"] and body["command"].startswith("strop train ")


def _wait(ui, rid: str, done, seconds: float = 120) -> dict:
    deadline = time.time() + seconds
    while True:
        status, row = request(f"{ui.url}/api/run/{rid}")
        if status == 200 and done(row):
            return row
        assert time.time() < deadline, row
        time.sleep(0.3)


def test_a_run_started_stopped_and_resumed_from_the_dashboard(tmp_path, tiny_llama):
    config = tiny_yaml(tmp_path, tiny_llama)
    root = tmp_path / "runs"
    root.mkdir()
    values = {"name": "web", "train.max_steps": "400", "train.save_every": "50", "train.log_every": "1"}
    with dashboard(root) as ui:
        status, body = request(ui.url + "/api/start", {"base": str(config), "values": values})
        assert status == 200 and body["run"] == "web", body
        _wait(ui, "web", lambda r: r["status"] == "running" and (r["steps"] or 0) >= 2)
        status, _ = request(ui.url + "/api/start", {"base": str(config), "values": values})
        assert status == 400  # the name is taken now
        assert request(ui.url + "/api/stop/web", {})[0] == 200
        stopped = _wait(ui, "web", lambda r: r["status"] != "running")
        assert stopped["status"] == "stopped" and stopped["error"] is None, stopped
        assert "SIGTERM" in stopped["log"] and "checkpoint" in stopped["log"]
        from strop.training.checkpoint import list_checkpoints, read_state

        step = read_state(list_checkpoints(root / "web")[-1])["step"]
        assert 0 < step < 400
        assert request(ui.url + "/api/resume/web", {})[0] == 200
        finished = _wait(ui, "web", lambda r: r["status"] == "finished")
        assert finished["steps"] == 400 and finished["error"] is None, finished
        resumed = ui.jobs.get("web")  # the run's job now: the resume, run to its end
        assert resumed.command[1:3] == ["train", "--resume"] and resumed.returncode == 0, resumed
        assert read_state(list_checkpoints(root / "web")[-1])["step"] == 400
        records = [json.loads(line) for line in (root / "web" / "metrics.jsonl").read_text().splitlines()]
        steps = [r["step"] for r in records if "loss" in r]
        assert steps == list(range(1, 401))  # resumed where it stopped: no step twice, none missing


def test_a_failing_start_shows_the_childs_error_line(tmp_path, tiny_llama):
    config = tiny_yaml(tmp_path, tiny_llama)
    root = tmp_path / "runs"
    root.mkdir()
    with dashboard(root) as ui:
        values = {"name": "broken", "model.name": str(tmp_path / "no-such-model")}
        status, body = request(ui.url + "/api/start", {"base": str(config), "values": values})
        assert status == 200, body
        deadline = time.time() + 60
        while ui.jobs.get("broken").alive:
            assert time.time() < deadline
            time.sleep(0.2)
        _, rows = request(ui.url + "/api/runs")
        status, page = request(ui.url + "/run/broken", raw=True)  # a page though it has no folder
        assert status == 200 and "no-such-model" in page
        assert request(ui.url + "/api/run/broken")[1]["status"] == "failed"
    job = ui.jobs.get("broken")
    assert job.returncode == 2 and job.error().startswith("error:") and "no-such-model" in job.error()
    assert [(r["id"], r["status"]) for r in rows] == [("broken", "failed")]


def _sse(url: str, body: dict) -> list[str]:
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json", "X-Strop-Token": TOKEN}
    )
    pieces = []
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r:
            line = line.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                for c in json.loads(line[6:])["choices"]:
                    if c["delta"].get("content"):
                        pieces.append(c["delta"]["content"])
    return pieces


def test_chat_streams_from_the_runs_own_serve_app(trained):
    from strop.models.generate import generate
    from strop.models.inference import load_for_inference

    messages = [{"role": "user", "content": "What is 3 times 4?"}]
    with dashboard(trained.parent) as ui:
        status, page = request(f"{ui.url}/try/tuned", raw=True)
        assert status == 200 and 'data-how="chat"' in page
        body = {"model": "tuned", "messages": messages, "stream": True, "max_tokens": 12, "temperature": 0}
        pieces = _sse(f"{ui.url}/serve/tuned/v1/chat/completions", body)
        status, models = request(f"{ui.url}/serve/tuned/v1/models")
        assert status == 200 and [m["id"] for m in models["data"]] == ["tuned"]
        assert request(f"{ui.url}/serve/nope/v1/models")[0] == 404
    loaded = load_for_inference(str(trained), device="cpu")
    expected = generate(loaded.model, loaded.template, [messages], 12, 0.0, 1.0)[0]
    assert len(pieces) > 1 and "".join(pieces).strip() == expected.strip()  # streamed, with its template


def test_predict_on_a_classification_run(tmp_path, tiny_bert):
    from strop.api import Classifier
    from strop.recipes.run import train
    from test_classify import config

    cfg = config(tiny_bert, tmp_path)
    cfg["eval"] = {"enabled": False}
    train(cfg, show_progress=False)
    run = Path(cfg["output_dir"]) / cfg["name"]
    with dashboard(run.parent) as ui:
        status, page = request(f"{ui.url}/try/{run.name}", raw=True)
        assert status == 200 and 'data-how="predict"' in page
        status, got = request(f"{ui.url}/api/predict/{run.name}", {"text": "the sea is wide"})
        assert status == 200
        assert request(f"{ui.url}/api/predict/{run.name}", {"text": " "})[0] == 400
        assert request(f"{ui.url}/serve/{run.name}/v1/models")[0] == 404  # a classifier does not chat
    assert got == Classifier(run).predict(["the sea is wide"])[0]


def test_score_on_a_reward_run(tmp_path, tiny_llama):
    from strop.api import RewardModel
    from strop.recipes.run import train
    from test_preference import dpo_config

    cfg = dpo_config(tiny_llama, tmp_path, task="reward")
    cfg["method"] = {"name": "lora", "lora": {"r": 4, "alpha": 8}}
    cfg["eval"] = {"enabled": False}
    run = train(cfg, show_progress=False).run_dir
    prompt, reply = "Write a short poem 99.", "The sea is wide and blue and deep."
    with dashboard(run.parent) as ui:
        status, page = request(f"{ui.url}/try/{run.name}", raw=True)
        assert status == 200 and 'data-how="score"' in page
        status, got = request(f"{ui.url}/api/score/{run.name}", {"prompt": prompt, "response": reply})
        assert status == 200
        status, bad = request(f"{ui.url}/api/score/{run.name}", {"prompt": prompt, "response": ""})
        assert status == 400 and bad["error"].startswith("error: prompt, response:")
        assert request(f"{ui.url}/api/predict/{run.name}", {"text": "x"})[0] == 400  # not a classifier
    turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]
    assert got["reward"] == pytest.approx(RewardModel(run).score([turns])[0], abs=1e-5)


def test_a_restarted_dashboard_still_tells_a_failed_job_from_a_stopped_one(tmp_path):
    from strop.ui.jobs import STATE, Jobs
    from strop.ui.runs import status

    root = tmp_path / "runs"
    root.mkdir()
    jobs = Jobs(root)
    jobs.start("bad", ["no-such-command"]).process.wait(60)  # argparse refuses it: status 2
    deadline = time.time() + 10
    while jobs.get("bad").returncode is None:  # the waiting thread records it
        assert time.time() < deadline
        time.sleep(0.05)
    record = json.loads((root / STATE / "jobs" / "bad.json").read_text())
    assert record["returncode"] == 2 and record["command"] == ["strop", "no-such-command"]
    # a job SIGTERM stopped, as the record of one reads (test_a_run_started_... stops a real one)
    cut = {**record, "run_id": "cut", "returncode": 143}
    (root / STATE / "jobs" / "cut.json").write_text(json.dumps(cut))
    for name in ("bad", "cut"):
        plant(root, name, CURVE, checkpoint=2)  # both left a checkpoint behind
    again = Jobs(root)  # what a new `strop ui` over the same folder reads
    assert {k: (j.returncode, j.alive) for k, j in again.jobs.items()} == {
        "bad": (2, False),
        "cut": (143, False),
    }
    assert status(root / "bad", again.get("bad")) == "failed"
    (root / "bad" / "result.json").write_text("{}")  # trained and exported, then its evaluation failed
    assert status(root / "bad", again.get("bad")) == "failed"
    assert status(root / "cut", again.get("cut")) == "stopped"
    assert "invalid choice" in again.get("bad").error()


def test_compare_is_strop_compares_page(tmp_path, trained):
    import shutil

    root = tmp_path / "runs"
    shutil.copytree(trained, root / "a")
    shutil.copytree(trained, root / "b")
    cfg = yaml.safe_load((root / "b" / "config.yaml").read_text())
    cfg["optim"]["lr"] = 0.5
    (root / "b" / "config.yaml").write_text(yaml.safe_dump(cfg))
    with dashboard(root) as ui:
        status, page = request(f"{ui.url}/compare?run=a&run=b", raw=True)
        assert status == 200 and "/compare/view?run=a&amp;run=b" in page
        status, view = request(f"{ui.url}/compare/view?run=a&run=b", raw=True)
        assert request(f"{ui.url}/compare?run=missing", raw=True)[0] == 404
    assert status == 200 and "Comparison of 2 runs" in view and "Config differences" in view
    assert "optim.lr" in view  # the one setting that differs


def test_strop_ui_prints_a_token_url_and_refuses_requests_without_it(tmp_path):
    root = tmp_path / "runs"
    root.mkdir()
    child = subprocess.Popen(
        [sys.executable, "-m", "strop", "ui", "--runs", str(root), "--port", "0"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines = [child.stderr.readline(), child.stderr.readline()]
        url = lines[1].split()[-1]
        assert url.startswith("http://127.0.0.1:") and "/?token=" in url, lines
        base, token = url.split("/?token=")
        assert len(token) >= 24
        assert request(base + "/api/runs", token=None)[0] == 401
        assert request(base + "/api/runs", token=token) == (200, [])
    finally:
        child.terminate()
        child.wait(30)
    assert child.returncode == 0


def test_address_checks():
    from strop.core.errors import ConfigError
    from strop.ui.server import check_address

    check_address("127.0.0.1", 0, False)
    check_address("::1", 65535, False)
    check_address("0.0.0.0", 8080, True)
    with pytest.raises(ConfigError, match="--allow-remote"):
        check_address("0.0.0.0", 8080, False)
    with pytest.raises(ConfigError, match="--port 65536"):
        check_address("127.0.0.1", 65536, False)
