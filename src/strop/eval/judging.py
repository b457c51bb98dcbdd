"""A judge at work on strop's own evaluations (eval/judge.py does the judging itself).

`judge_endpoint` gives a judge config whose endpoint is a URL: a URL as given, or a strop run folder or
catalogue model served by `strop serve` on a free loopback port for as long as the judging lasts (its
output goes to a log file beside the judgments; a server that dies says its last line). `judge_samples`
judges an end-of-run evaluation (eval/samples.jsonl): the tuned replies against the base model's (both
orders), graded on the rubric, or both, and the judge's agreement with known preferences first when
`judge.agreement` names held-out pairs, so its verdicts come with what they are worth.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from strop.core.errors import ConfigError, StropError
from strop.core.io import atomic_write_json, unreadable_file
from strop.core.judge_config import JudgeConfig
from strop.eval.judge import Judge, compare, grade

log = logging.getLogger("strop.eval")
SERVING = re.compile(r"serving .* at (http://\S+/v1)")
START_TIMEOUT = 900.0  # a catalogue model converted from GGUF on a first run takes minutes on a CPU


def is_url(spec: str) -> bool:
    return spec.startswith(("http://", "https://"))


@contextlib.contextmanager
def judge_endpoint(cfg: JudgeConfig, log_dir: Path) -> Iterator[JudgeConfig]:
    """`cfg` with a URL for its endpoint while the block runs (see the module docstring)."""
    if is_url(cfg.endpoint):
        yield cfg
        return
    log_dir.mkdir(parents=True, exist_ok=True)
    server_log = log_dir / "judge-server.log"
    cmd = [sys.executable, "-m", "strop", "serve", cfg.endpoint, "--host", "127.0.0.1", "--port", "0"]
    log.info("judge: serving %s on loopback (log: %s)", cfg.endpoint, server_log)
    with open(server_log, "w", encoding="utf-8") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        url = _wait_until_serving(proc, server_log, cfg.endpoint)
        yield cfg.model_copy(update={"endpoint": url})
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_until_serving(proc: subprocess.Popen, server_log: Path, spec: str) -> str:
    start = time.monotonic()
    url = None
    while time.monotonic() - start < START_TIMEOUT:
        said = server_log.read_text(encoding="utf-8", errors="replace")
        if proc.poll() is not None:
            last = [line for line in said.splitlines() if line.strip()][-1:] or ["(no output)"]
            raise StropError(f"judge {spec}: strop serve stopped before serving: {last[0]}")
        found = SERVING.search(said)
        url = url or (found.group(1) if found else None)
        if url and _answers(url):
            return url
        time.sleep(0.5)
    raise StropError(f"judge {spec}: strop serve did not answer within {START_TIMEOUT:.0f} s ({server_log})")


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/models", timeout=5) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def check_judge(cfg: JudgeConfig) -> None:
    """What can be checked before a run trains: the endpoint names a URL, a run folder or a catalogue
    model; the agreement pairs and templates are readable; the key's variable is set."""
    import os

    from strop.eval.judge import template_text

    if not is_url(cfg.endpoint):
        from strop.models.catalogue import CATALOGUE

        spec = cfg.endpoint
        hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", spec) and not Path(spec).exists()
        if not (Path(spec).is_dir() or spec in CATALOGUE or hub_id):
            raise ConfigError(
                f"judge.endpoint: {spec!r} is not a URL (http://…/v1), a strop run folder, a model folder, "
                "a catalogue model (strop models list) or a hub id"
            )
    if cfg.agreement and (why := unreadable_file(Path(cfg.agreement))):
        raise ConfigError(f"judge.agreement: {cfg.agreement}: {why}")
    template_text(cfg.pairwise_template, "judge_pairwise.txt")
    template_text(cfg.rubric_template, "judge_rubric.txt")
    if cfg.api_key_env and not os.environ.get(cfg.api_key_env):
        raise ConfigError(f"judge.api_key_env: the environment variable {cfg.api_key_env} is not set")


def read_rows(path: Path, fields: tuple[str, ...], limit: int | None = None) -> list[dict]:
    """JSONL rows holding text in each of `fields`; a bad line is named by file and line."""
    why = unreadable_file(path)
    if why:
        raise StropError(f"{path}: {why}")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise StropError(f"{path}:{n}: not JSON ({e.msg})") from None
        for field in fields:
            if not isinstance(row, dict) or not isinstance(row.get(field), str):
                raise StropError(f"{path}:{n}: field {field!r}: expected text")
        rows.append(row)
        if limit and len(rows) >= limit:
            break
    if not rows:
        raise StropError(f"{path}: no rows")
    return rows


def agreement(judge: Judge, pairs: Path, limit: int | None = None) -> dict:
    """How often the judge prefers the known better reply of preference pairs (the chosen reply is "b",
    so the win rate is the agreement), with its interval."""
    rows = read_rows(pairs, ("prompt", "chosen", "rejected"), limit)
    out = compare(
        judge, [r["prompt"] for r in rows], [r["rejected"] for r in rows], [r["chosen"] for r in rows]
    )
    out["pairs"] = str(pairs)
    return out


def judge_samples(cfg: JudgeConfig, eval_dir: Path) -> dict:
    """Judge an end-of-run evaluation; writes eval/judge.json (every verdict) and returns its summary
    (what eval/summary.json, the report and `strop compare` show)."""
    rows = read_rows(eval_dir / "samples.jsonl", ("input", "tuned"))
    questions = [r["input"] for r in rows]
    refs = [r.get("reference") or None for r in rows] if cfg.reference else None
    has_base = all(isinstance(r.get("base"), str) for r in rows)
    t0 = time.time()
    full: dict = {}
    with judge_endpoint(cfg, eval_dir) as at:
        judge = Judge(at)
        if cfg.agreement:
            log.info("judge: agreement with the known preferences of %s", cfg.agreement)
            full["agreement"] = agreement(judge, Path(cfg.agreement), cfg.agreement_limit)
        if cfg.mode in ("pairwise", "both") and has_base:
            log.info("judge: tuned vs base on %d prompts, both orders", len(rows))
            full["pairwise"] = compare(
                judge, questions, [r["base"] for r in rows], [r["tuned"] for r in rows], refs
            )
        if cfg.mode in ("rubric", "both"):
            log.info("judge: grading %d replies per model on the rubric", len(rows))
            full["rubric"] = {"tuned": grade(judge, questions, [r["tuned"] for r in rows], refs)}
            if has_base:
                full["rubric"]["base"] = grade(judge, questions, [r["base"] for r in rows], refs)
        full["judge"] = {"endpoint": cfg.endpoint, "model": judge.model, "served_at": at.endpoint}
        full["usage"] = {**judge.usage.__dict__, "wall_seconds": time.time() - t0}
    atomic_write_json(eval_dir / "judge.json", full)
    summary = short(full)
    log.info("judge: %s", headline(summary))
    return summary


def short(full: dict) -> dict:
    """judge.json without the per-prompt verdicts and grades."""
    drop = {"per_prompt", "grades", "usage", "judge"}
    out: dict = {"judge": full.get("judge"), "usage": full.get("usage")}
    for key in ("agreement", "pairwise"):
        if key in full:
            out[key] = {k: v for k, v in full[key].items() if k not in drop}
    if "rubric" in full:
        out["rubric"] = {m: {k: v for k, v in g.items() if k not in drop} for m, g in full["rubric"].items()}
    return out


def headline(j: dict) -> str:
    """One sentence: the win rate and the grades, each with its interval, and the judge's agreement."""
    parts = []
    p = j.get("pairwise")
    if p:
        parts.append(
            f"tuned win rate over base {p['win_rate']:.2f} (95% CI {p['ci'][0]:.2f} to {p['ci'][1]:.2f}, "
            f"{p['judged']} prompts, {p['unparsed']} unreadable verdicts, position bias {p['position_bias']:.2f})"
            if p.get("win_rate") is not None
            else f"no pairwise verdict could be read ({p['unparsed']} unreadable)"
        )
    for model, g in (j.get("rubric") or {}).items():
        parts.append(
            f"{model} graded {g['mean']:.1f}/10 (95% CI {g['ci'][0]:.1f} to {g['ci'][1]:.1f}, {g['unparsed']} unreadable)"
            if g.get("mean") is not None
            else f"{model}: no grade could be read ({g['unparsed']} unreadable)"
        )
    a = j.get("agreement")
    if a and a.get("win_rate") is not None:
        parts.append(
            f"the judge agrees with known preferences {a['win_rate']:.2f} "
            f"(95% CI {a['ci'][0]:.2f} to {a['ci'][1]:.2f}, {a['judged']} pairs; 0.5 is chance)"
        )
    elif a:
        parts.append("the judge's agreement with known preferences could not be read")
    else:
        parts.append("the judge itself was not checked (set judge.agreement to held-out preference pairs)")
    return "; ".join(parts)


def grade_predictions(cfg: JudgeConfig, out_dir: Path) -> dict:
    """`strop eval --judge`: one model's replies (predictions.jsonl) graded on the rubric, the reference
    shown when the row has one; writes judge.json and adds the summary to summary.json."""
    rows = read_rows(out_dir / "predictions.jsonl", ("input", "prediction"))
    refs = [r.get("reference") or None for r in rows] if cfg.reference else None
    t0 = time.time()
    full: dict = {}
    with judge_endpoint(cfg, out_dir) as at:
        judge = Judge(at)
        if cfg.agreement:
            full["agreement"] = agreement(judge, Path(cfg.agreement), cfg.agreement_limit)
        log.info("judge: grading %d replies on the rubric", len(rows))
        full["rubric"] = {
            "model": grade(judge, [r["input"] for r in rows], [r["prediction"] for r in rows], refs)
        }
        full["judge"] = {"endpoint": cfg.endpoint, "model": judge.model, "served_at": at.endpoint}
        full["usage"] = {**judge.usage.__dict__, "wall_seconds": time.time() - t0}
    atomic_write_json(out_dir / "judge.json", full)
    summary = short(full)
    on_disk = json.loads((out_dir / "summary.json").read_text())
    atomic_write_json(out_dir / "summary.json", {**on_disk, "judge": summary})
    return summary


def judge_arms(cfg: JudgeConfig, answers: list[dict], arm_names: list[str], log_dir: Path) -> dict:
    """`strop rag compare --judge`: each arm's answers against the base arm's (the first), pairwise in
    both orders with the reference shown; {arm: summary} plus the judge's agreement when configured."""
    questions = [a["question"] for a in answers]
    refs = [a.get("reference") or None for a in answers] if cfg.reference else None
    base = arm_names[0]
    t0 = time.time()
    out: dict = {"arms": {}}
    with judge_endpoint(cfg, log_dir) as at:
        judge = Judge(at)
        if cfg.agreement:
            checked = agreement(judge, Path(cfg.agreement), cfg.agreement_limit)
            out["agreement"] = {k: v for k, v in checked.items() if k != "per_prompt"}
        for arm in arm_names[1:]:
            log.info("judge: %s vs %s on %d questions, both orders", arm, base, len(answers))
            said = compare(judge, questions, [a[base] for a in answers], [a[arm] for a in answers], refs)
            out["arms"][arm] = {k: v for k, v in said.items() if k not in ("per_prompt", "usage", "judge")}
        out["judge"] = {"endpoint": cfg.endpoint, "model": judge.model}
        out["usage"] = {**judge.usage.__dict__, "wall_seconds": time.time() - t0}
    return out
