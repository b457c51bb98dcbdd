"""The dashboard's routes: pages rendered on the server and the JSON the pages poll.

Pages: `/` runs, `/run/RUN` a run, `/compare?run=A&run=B`, `/start`, `/try/RUN`. JSON: `/api/...`.
Everything sits behind guard.py's token check, which also routes `/serve/RUN/v1/...` to the run's own
`strop serve` app (playground.py), the endpoint the chat page streams from, and adds headers.py's
security headers to every response. A file from a run folder is served under `RUN_FILE_POLICY`
(sandboxed: no script of its own runs). A user's mistake (an empty or unknown run id, a body that is not
the JSON object a route expects, a bad query parameter) is a 4xx with `{"error": "error: ..."}`.
"""

from __future__ import annotations

import asyncio
import hashlib
from importlib import resources
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

import jinja2
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp

from strop.core.errors import StropError
from strop.report.collect import dig, read_run
from strop.report.compare import write_comparison
from strop.ui import form, runs
from strop.ui.guard import Guard
from strop.ui.headers import RUN_FILE
from strop.ui.jobs import STATE, Jobs
from strop.ui.playground import Playground, kind

HERE = resources.files("strop.ui")
STATIC = {"ui.js": "text/javascript", "ui.css": "text/css"}


def build_app(root: Path, token: str, cookie: str, device: str = "auto") -> tuple[ASGIApp, Jobs, Playground]:
    """The dashboard over the runs folder `root`, behind `token`; returns (app, jobs, playground) so the
    server can stop jobs and unload the playground when it ends."""
    root = root.resolve()
    jobs, playground = Jobs(root), Playground(device)
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(HERE / "templates")), autoescape=True)
    app = FastAPI(title="strop ui", docs_url=None, redoc_url=None, openapi_url=None)

    def html(name: str, **context) -> HTMLResponse:
        return HTMLResponse(env.get_template(name).render(root=str(root), **context))

    def run_dir(rid: str) -> Path:
        try:
            return runs.resolve(root, rid)
        except StropError as e:
            raise StarletteHTTPException(404, str(e)) from None

    def all_rows() -> list[dict]:
        found = runs.find_runs(root)
        rows = [runs.row(root, d, jobs.get(runs.run_id(root, d))) for d in found]
        have = {r["id"] for r in rows}
        # jobs whose folder is not there: still loading, or failed before it was made
        rows += [
            runs.starting_row(j)
            for rid, j in jobs.jobs.items()
            if rid not in have and (j.alive or j.error()) and not (root / rid).is_dir()
        ]
        return sorted(rows, key=lambda r: -r["started"])

    @app.exception_handler(StropError)
    async def user_error(request: Request, e: StropError):
        return JSONResponse({"error": f"error: {e}"}, status_code=400)

    @app.exception_handler(RequestValidationError)
    async def bad_parameter(request: Request, e: RequestValidationError):
        where = [".".join(map(str, err["loc"][1:])) or str(err["loc"][0]) for err in e.errors()]
        message = "; ".join(f"{w}: {err['msg']}" for w, err in zip(where, e.errors(), strict=True))
        return JSONResponse({"error": f"error: {message}"}, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def not_found(request: Request, e: StarletteHTTPException):
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": f"error: {e.detail}"}, status_code=e.status_code)
        page = env.get_template("error.html").render(root=str(root), message=e.detail, title="error")
        return HTMLResponse(page, status_code=e.status_code)

    @app.get("/static/{name}")
    async def static(name: str):
        if name not in STATIC:
            raise StarletteHTTPException(404, f"no file {name}")
        return Response((HERE / "static" / name).read_bytes(), media_type=STATIC[name])

    @app.get("/", response_class=HTMLResponse)
    async def runs_page():
        return html("runs.html", title="runs", rows=await asyncio.to_thread(all_rows))

    @app.get("/api/runs")
    async def runs_json():
        return await asyncio.to_thread(all_rows)

    def folder_or_job(rid: str) -> Path | None:
        """The run's folder, or None for a job of ours whose folder is not there (yet, or ever)."""
        job = jobs.get(rid)
        if job is not None and not (root / rid / "config.yaml").is_file():
            return None
        return run_dir(rid)

    @app.get("/run/{rid:path}", response_class=HTMLResponse)
    async def run_page(rid: str):
        d, job = folder_or_job(rid), jobs.get(rid)
        if d is None:
            assert job is not None
            info: dict[str, Any] = {"row": runs.starting_row(job), "dir": str(root / rid), "config": ""}
            info |= {"data": {}, "samples": [], "checkpoints": [], "report": False, "notes": []}
        else:
            info = await asyncio.to_thread(runs.page, root, d, job)
        return html(
            "run.html",
            title=info["row"]["id"],
            rid=rid,
            info=info,
            job=job,
            job_error=job.error() if job else None,
            try_kind=kind(d) if d else None,
        )

    @app.get("/api/run/{rid:path}")
    async def run_json(rid: str):
        d, job = folder_or_job(rid), jobs.get(rid)
        if d is None:
            assert job is not None
            row = runs.starting_row(job)
        else:
            row = await asyncio.to_thread(runs.row, root, d, job)
        return {**row, "error": job.error() if job else None, "log": _log_tail(job.log) if job else None}

    @app.get("/api/metrics/{rid:path}")
    async def metrics(rid: str, offset: int = 0):
        d = folder_or_job(rid)
        return runs.tail(d, max(0, offset)) if d else {"records": [], "offset": 0, "reset": False}

    @app.get("/report/{rid:path}")
    async def report(rid: str):
        path = run_dir(rid) / "report.html"
        if not path.is_file():
            raise StarletteHTTPException(404, f"{rid}: no report yet (it is written when the run ends)")
        if path.is_symlink():  # strop writes a file; a link could show any file this user can read
            raise StarletteHTTPException(404, f"{rid}: report.html is a link, not a report strop wrote")
        return FileResponse(path, media_type="text/html", headers=RUN_FILE)

    @app.post("/api/stop/{rid:path}")
    async def stop(rid: str):
        jobs.stop(rid)
        return {"stopping": rid}

    @app.post("/api/resume/{rid:path}")
    async def resume(rid: str):
        d = run_dir(rid)
        job = jobs.get(rid)
        state = runs.status(d, job)
        if state != "stopped":
            raise StropError(f"{rid}: the run is {state}; only a stopped run resumes")
        cfg = read_run(d).config
        jobs.start(rid, ["train", "--resume", str(d), "--no-progress"], *_labels(cfg))
        return {"run": rid}

    @app.get("/start", response_class=HTMLResponse)
    async def start_page(base: str = "quickstart"):
        try:
            sections, problem = form.form_fields(base), None
        except StropError as e:
            sections, problem = [], f"error: {e}"
        return html(
            "start.html",
            title="start a run",
            base=base,
            shipped=form.shipped_configs(),
            sections=sections,
            problem=problem,
        )

    async def submission(request: Request) -> tuple[str, dict[str, str]]:
        shape = '{"base": CONFIG, "values": {KEY: TEXT}}'
        body = await _json_object(request, shape)
        base, values = body.get("base"), body.get("values") or {}
        if not isinstance(base, str) or not isinstance(values, dict):
            raise StropError(f"expected a JSON body {shape}")
        return base, {str(k): str(v) for k, v in values.items()}

    @app.post("/api/check")
    async def check(request: Request):
        base, values = await submission(request)
        cfg, argv = form.validate(root, base, values)
        findings = await asyncio.to_thread(form.data_findings, cfg)
        return {"command": form.command_line(argv), "findings": findings, "name": cfg.name}

    @app.post("/api/start")
    async def start(request: Request):
        base, values = await submission(request)
        cfg, argv = form.validate(root, base, values)
        rid = runs.run_id(root, cfg.run_dir.resolve())
        jobs.start(rid, argv, *_labels(cfg.model_dump(mode="json")))
        return {"run": rid, "command": form.command_line(argv)}

    @app.get("/compare", response_class=HTMLResponse)
    async def compare_page(run: Annotated[list[str] | None, Query()] = None):
        chosen = [r for r in run or [] if r]
        for r in chosen:
            run_dir(r)
        rows = await asyncio.to_thread(all_rows)
        view = "/compare/view?" + urlencode([("run", r) for r in chosen]) if chosen else None
        return html("compare.html", title="compare", rows=rows, chosen=chosen, view=view)

    @app.get("/compare/view")
    async def compare_view(run: Annotated[list[str] | None, Query()] = None):
        chosen = [r for r in run or [] if r]
        dirs = [run_dir(r) for r in chosen]
        digest = hashlib.sha256("\n".join(chosen).encode()).hexdigest()[:16]
        paths = await asyncio.to_thread(write_comparison, dirs, root / STATE / "compare" / digest)
        return FileResponse(paths["html"], media_type="text/html", headers=RUN_FILE)

    @app.get("/try/{rid:path}", response_class=HTMLResponse)
    async def try_page(rid: str):
        d = run_dir(rid)
        how = kind(d)
        if how is None:
            raise StarletteHTTPException(404, f"{rid}: no exported model to try (the run has not finished)")
        return html("try.html", title=f"try {rid}", rid=rid, how=how, served=d.name)

    @app.post("/api/predict/{rid:path}")
    async def predict(rid: str, request: Request):
        body = await _json_object(request, '{"text": TEXT, "pair": TEXT or null}')
        text, pair = _text_field(body, "text"), body.get("pair") or None
        if not text.strip():
            raise StropError("text: give a text to label")
        if pair is not None and not isinstance(pair, str):
            raise StropError(f"pair: expected a text or null, got {type(pair).__name__}")
        how, clf = await asyncio.to_thread(playground.load, run_dir(rid))
        if how != "predict":
            raise StropError(f"{rid}: not a classification run")
        return (await asyncio.to_thread(clf.predict, [(text, pair)]))[0]

    @app.post("/api/score/{rid:path}")
    async def score(rid: str, request: Request):
        body = await _json_object(request, '{"prompt": TEXT, "response": TEXT}')
        prompt, reply = _text_field(body, "prompt"), _text_field(body, "response")
        if not prompt.strip() or not reply.strip():
            raise StropError("prompt, response: give both a prompt and a reply to score")
        how, rm = await asyncio.to_thread(playground.load, run_dir(rid))
        if how != "score":
            raise StropError(f"{rid}: not a reward run")
        turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]
        return {"reward": (await asyncio.to_thread(rm.score, [turns]))[0]}

    guarded = Guard(app, token, cookie, root, playground)
    return guarded, jobs, playground


async def _json_object(request: Request, shape: str) -> dict:
    """The request's body as a JSON object; a StropError (400) showing `shape` for anything else."""
    try:
        body = await request.json()
    except ValueError:  # not JSON, or not UTF-8
        body = None
    if not isinstance(body, dict):
        raise StropError(f"expected a JSON body {shape}")
    return body


def _text_field(body: dict, key: str) -> str:
    value = body.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise StropError(f"{key}: expected a text, got {type(value).__name__}")
    return value


def _labels(cfg: dict) -> tuple[str, str, str]:
    """(task, model, method) of a config, for the table row of a job whose folder is not there yet."""
    model, method = dig(cfg, "model", "name"), dig(cfg, "method", "name")
    return str(cfg.get("task") or "sft"), str(model or ""), str(method or "")


def _log_tail(path: Path, lines: int = 12) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
