"""`strop ui` runs no script it did not write, and a user's mistake is a 4xx, never a 500.

Headers as a browser reads them (a strict Content-Security-Policy on every response, run-folder files
sandboxed, nosniff); the browser's own verdict on a planted report is test_ui_browser.py's
`test_a_planted_reports_script_does_not_run`. Empty run ids, folders that are not runs and request
bodies that are not the JSON a route expects: a 4xx with `{"error": "error: ..."}`, no traceback."""

from __future__ import annotations

import http.client
import json
import logging
import re
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from test_ui import CURVE, TOKEN, dashboard, plant, train_tiny

PLANTED = """<!doctype html><html><head><title>planted</title></head><body><h1>planted report</h1>
<script>document.title = "ran"; fetch("/api/stop/tuned", {method: "POST"});</script></body></html>"""


def call(url: str, token: str | None = TOKEN, body: bytes | None = None) -> tuple[int, dict[str, str], str]:
    """(status, headers with lower-case names, text) of one GET, or a POST of raw `body`; no redirects
    followed."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    headers = {"X-Strop-Token": token} if token else {}
    if body is not None:
        headers["Content-Type"] = "application/json"
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    conn.request("GET" if body is None else "POST", target, body=body, headers=headers)
    r = conn.getresponse()
    try:
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read().decode(errors="replace")
    finally:
        conn.close()


def policy(headers: dict[str, str]) -> dict[str, list[str]]:
    """The Content-Security-Policy as {directive: sources}."""
    out = {}
    for part in headers["content-security-policy"].split(";"):
        name, *sources = part.split()
        out[name] = sources
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama) -> Path:
    return train_tiny(tmp_path_factory.mktemp("ui-security") / "runs", tiny_llama)


@pytest.fixture
def root(tmp_path, trained) -> Path:
    """A runs folder with a real finished run, a run whose report.html carries a script, a folder that is
    not a run."""
    root = tmp_path / "runs"
    shutil.copytree(trained, root / "tuned")
    (plant(root, "planted", CURVE) / "report.html").write_text(PLANTED)
    (root / "not-a-run").mkdir()
    return root


def test_every_response_carries_a_strict_policy_and_run_files_are_sandboxed(root):
    with dashboard(root) as ui:
        pages = ["/", "/run/tuned", "/start", "/compare?run=tuned", "/try/tuned", "/run/nope"]
        other = ["/api/runs", "/api/run/tuned", "/static/ui.js", "/static/ui.css"]
        answers = {path: call(ui.url + path) for path in pages + other}
        answers["401"] = call(ui.url + "/", token=None)
        answers["redirect"] = call(f"{ui.url}/?token={TOKEN}", token=None)
        elsewhere = call(f"{ui.url}//example.com/x?token={TOKEN}", token=None)[1]["location"]
        (root / "linked").mkdir()
        (root / "linked" / "config.yaml").write_text("name: linked\n")
        (root / "linked" / "report.html").symlink_to(root / "planted" / "config.yaml")
        linked = call(ui.url + "/report/linked")
        files = {path: call(ui.url + path) for path in ("/report/tuned", "/report/planted")}
        files["/compare/view"] = call(ui.url + "/compare/view?run=tuned&run=planted")
    assert elsewhere == "/example.com/x"  # the token's redirect stays on the dashboard
    assert linked[0] == 404 and "a link" in linked[2]  # a report.html linking elsewhere is not shown
    assert answers["401"][0] == 401 and answers["redirect"][0] == 303 and answers["/run/nope"][0] == 404
    for what, (_, headers, _) in answers.items():
        assert headers["x-content-type-options"] == "nosniff", what
        assert headers["referrer-policy"] == "no-referrer", what
        csp = policy(headers)
        assert csp["default-src"] == ["'self'"] and "script-src" not in csp, what  # no inline script
        assert csp["object-src"] == csp["base-uri"] == csp["frame-ancestors"] == ["'none'"], what
        assert csp["form-action"] == ["'self'"], what
    for path in pages[:-1]:
        text = answers[path][2]
        # the policy forbids inline script: every script of a page is a file or a data block
        for tag in re.findall(r"<script\b[^>]*>", text):
            assert 'src="/static/' in tag or 'type="application/json"' in tag, (path, tag)
    frames = re.findall(r"<iframe\b[^>]*>", answers["/run/tuned"][2] + answers["/compare?run=tuned"][2])
    assert len(frames) == 2 and all(re.search(r"\ssandbox\s", f) for f in frames), frames  # no allow-*
    for what, (status, headers, _) in files.items():
        assert status == 200 and headers["content-type"].startswith("text/html"), what
        assert headers["x-content-type-options"] == "nosniff", what
        csp = policy(headers)
        assert csp["sandbox"] == [] and csp["default-src"] == ["'none'"], what  # scripts off, opaque origin
        assert csp["img-src"] == ["data:"] and csp["frame-ancestors"] == ["'self'"], what
    assert "<script>" in files["/report/planted"][2]  # served as it is, to run nothing
    assert "data:image/png;base64," in files["/report/tuned"][2]  # strop's report embeds its plots


class Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def test_empty_ids_other_folders_and_bodies_that_are_not_json_get_a_4xx_with_an_error(root):
    log = Records()
    with dashboard(root) as ui:
        logging.getLogger("uvicorn.error").addHandler(log)  # where uvicorn writes an ASGI traceback
        try:
            gets = {
                path: call(ui.url + path)
                for base in ("/run/", "/api/run/", "/api/metrics/", "/report/", "/try/")
                for path in (base, base + "not-a-run", base + "/")
            }
            gets["/compare?run=not-a-run"] = call(ui.url + "/compare?run=not-a-run")
            gets["/compare?run=/"] = call(ui.url + "/compare?run=/")
            gets["/serve//v1/models"] = call(ui.url + "/serve//v1/models")
            gets["offset=x"] = call(ui.url + "/api/metrics/planted?offset=x")
            posts = {
                (path, body): call(ui.url + path, body=body)
                for path in ("/api/predict/tuned", "/api/score/tuned", "/api/check", "/api/start")
                for body in (b"not json", b"\xff\xfe", b"[]", b'"text"', b"")
            }
            for body in ({"text": 5}, {"text": "a", "pair": {"b": 1}}):
                posts[("/api/predict/tuned", json.dumps(body).encode())] = call(
                    ui.url + "/api/predict/tuned", body=json.dumps(body).encode()
                )
            posts[("/api/score/tuned", b"obj")] = call(
                ui.url + "/api/score/tuned", body=json.dumps({"prompt": ["a"], "response": "b"}).encode()
            )
            good = json.dumps({"text": "a", "prompt": "a", "response": "b"}).encode()
            for path in ("/api/stop/", "/api/resume/", "/api/predict/", "/api/score/"):
                posts[(path, good)] = call(ui.url + path, body=good)
        finally:
            logging.getLogger("uvicorn.error").removeHandler(log)
        assert not ui.jobs.jobs
    for what, (status, headers, text) in {**gets, **posts}.items():
        assert 400 <= status < 500, (what, status, text)
        if str(what).startswith(("/run/", "/try/", "/report/", "/compare")):
            assert headers["content-type"].startswith("text/html") and "error: " in text, what  # a page
            continue
        error = json.loads(text)["error"]
        message = error["message"] if what == "/serve//v1/models" else error  # OpenAI's shape there
        assert isinstance(message, str) and message, (what, text)
    assert gets["offset=x"][0] == 400 and json.loads(gets["offset=x"][2])["error"].startswith(
        "error: offset:"
    )
    bad = json.loads(posts[("/api/predict/tuned", b"not json")][2])["error"]
    assert bad == 'error: expected a JSON body {"text": TEXT, "pair": TEXT or null}'
    assert (
        json.loads(posts[("/api/score/tuned", b"obj")][2])["error"]
        == "error: prompt: expected a text, got list"
    )
    assert "no run id given" in json.loads(gets["/api/run/"][2])["error"]
    assert "no run id given" in gets["/run/"][2] and gets["/run/"][1]["content-type"].startswith("text/html")
    assert not [r for r in log.records if r.levelno >= logging.ERROR], [r.getMessage() for r in log.records]
