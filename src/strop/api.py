"""The public Python API: `strop.load(RUN_OR_MODEL)` gives an object whose methods are what that model
can do, and the CLI's inference commands are thin wrappers over it.

    import strop
    lm = strop.load("runs/my-run")                 # a finished run, a model folder, a catalogue name
    lm.generate(["Write a haiku about the sea."])  # -> ["..."]
    lm.chat([{"role": "user", "content": "Hi"}])   # -> "..."
    lm.evaluate("test.jsonl", metrics=["rouge_l"]) # base-free scores of this model on a file (`strop eval`)
    lm.merge("merged/")                            # adapter runs: a plain transformers folder

    clf = strop.load("runs/sentiment")             # classification runs
    clf.predict(["great product"])                 # -> [{"label": "positive", "probabilities": {...}}]
    clf.explain("great product")                   # token attributions

    rm = strop.load("runs/reward")                 # reward runs
    rm.score([[{"role": "user", ...}, {"role": "assistant", ...}]])   # -> [float]
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from strop.core.errors import StropError

Conversation = list[dict[str, str]]


def load(target: str | Path, device: str = "auto") -> LanguageModel | Classifier | RewardModel:
    """A finished strop run (its task decides the kind), a transformers folder, a GGUF file, a catalogue
    name or a hub id (language models)."""
    from strop.models.load import read_run_model

    path = Path(target)
    run = read_run_model(path) if path.is_dir() else None
    task = (run or {}).get("task", "sft")
    if task == "classification":
        return Classifier(path, device)
    if task == "reward":
        return RewardModel(path, device)
    return LanguageModel(str(target), device)


def evaluate(
    target: str | Path,
    data: str | Path,
    out_dir: str | Path | None = None,
    device: str = "auto",
    quantize: str | None = None,
    **options: Any,
) -> dict:
    """`load(target, device).evaluate(data, ...)` (options as `LanguageModel.evaluate`), in the order
    that wastes no loading time: the run's task, the --rag index, the metrics and the data are checked
    before the model loads. What `strop eval` runs."""
    from strop.models.load import read_run_model

    path = Path(target)
    run = read_run_model(path) if path.is_dir() else None
    if (run or {}).get("task", "sft") in ("classification", "reward"):
        raise StropError(f"{target}: evaluate scores generated replies; use predict or score for this run")
    plan = _eval_plan(str(target), data, out_dir, **options)
    return LanguageModel(str(target), device, quantize)._evaluate(plan)


def check_data(config: Any, overrides: list[str] | None = None) -> dict:
    """What `strop data check CONFIG` reports, as a dict: errors (malformed rows, leakage...), findings
    (duplicates, truncation, lengths), counts and a run-time estimate."""
    from strop.core.config import RunConfig, load_config
    from strop.recipes.data_check import run_check

    cfg = config if isinstance(config, RunConfig) else load_config(config, overrides)
    return run_check(cfg).report


class LanguageModel:
    """A causal LM with the chat template its run trained with (or the model's own)."""

    def __init__(self, target: str, device: str = "auto", quantize: str | None = None):
        """`quantize="int8"`: int8 linear layers on CPU (faster; see the README for the cost)."""
        from strop.models.inference import load_for_inference

        self.target = target
        self.loaded = load_for_inference(target, device=device, quantize=quantize)
        self.model, self.template = self.loaded.model, self.loaded.template

    def generate(
        self,
        prompts: list[str] | list[Conversation],
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        batch_size: int = 8,
        stop: list[str] | None = None,
    ) -> list[str]:
        """One reply per prompt (a string is one user turn; a list of {role, content} is a conversation);
        greedy when temperature is 0."""
        from strop.models.generate import generate

        conversations = [[{"role": "user", "content": p}] if isinstance(p, str) else p for p in prompts]
        return generate(
            self.model, self.template, conversations, max_new_tokens, temperature, top_p, batch_size, stop
        )

    def chat(self, messages: Conversation, **options: Any) -> str:
        """The reply to one conversation (options as `generate`)."""
        return self.generate([messages], **options)[0]

    def stream(
        self, messages: Conversation, max_new_tokens: int = 256, temperature: float = 0.7, top_p: float = 0.9
    ) -> Iterator[str]:
        """The reply to one conversation, piece by piece as it is generated (what `strop chat` prints;
        its sampling defaults are chat's)."""
        from strop.models.generate import stream

        return stream(self.model, self.template, messages, max_new_tokens, temperature, top_p)

    @property
    def description(self) -> str:
        """What was loaded, in words (the model, its adapter, its template)."""
        return self.loaded.description

    def evaluate(self, data: str | Path, out_dir: str | Path | None = None, **options: Any) -> dict:
        """Scores on a file of conversations ending in a reference reply: loss and perplexity of the
        references, and generation metrics. Writes summary.json and predictions.jsonl to `out_dir`
        (default: eval-FILE beside the run), which must be new or empty unless `force=True`.

        Options, with `strop eval`'s defaults: `data_format` ("auto"), `max_length` (1024 tokens per
        example for the loss), `progress` (False), `force` (False); `rag=INDEX` answers each prompt with
        passages from INDEX (`top_k` 4, `rag_mode` "hybrid", `rag_approximate` False; sources.jsonl
        lists them); any eval config key (`metrics=[...]`, `extract=...`, `max_new_tokens`, `stop`,
        ...), every example unless `max_examples`; `judge=` a URL, run folder or catalogue model (or a
        dict of `judge:` settings) grades each reply on a rubric (judge.json, summary["judge"])."""
        return self._evaluate(_eval_plan(self.target, data, out_dir, **options))

    def _evaluate(self, plan: _EvalPlan) -> dict:
        from strop.recipes.evaluation import evaluate_on_file

        summary = evaluate_on_file(
            self.model, self.template, plan.file, plan.out, plan.max_length, plan.progress
        )
        if plan.judge is not None:
            from strop.eval.judging import grade_predictions

            summary["judge"] = grade_predictions(plan.judge, plan.out)
        return summary

    def merge(self, out_dir: str | Path, force: bool = False) -> Path:
        """An adapter run as one plain transformers folder (what vLLM, TGI or `transformers` load). A
        folder that is not empty is refused unless `force` (then its files are replaced)."""
        from strop.export.merge import merge

        return merge(self.target, out_dir, force=force, option="out_dir")


class Classifier:
    """A strop classification run: labels and probabilities per text (or text pair)."""

    def __init__(self, run_dir: str | Path, device: str = "auto"):
        import torch

        from strop.core.device import resolve_device
        from strop.models.classifier import load_classifier
        from strop.models.load import load_tokenizer, read_run_model

        run = read_run_model(Path(run_dir))
        if run is None or run.get("task") != "classification":
            raise StropError(
                f"{run_dir}: not a finished strop classification run (no model/strop_model.json with task "
                "classification)"
            )
        dev = resolve_device(device)
        self.model = load_classifier(Path(run["dir"]), run["base_model"], dev, torch.float32)
        self.tokenizer = load_tokenizer(run["dir"])
        self.labels: list[str] = list(self.model.labels)

    def predict(self, texts: list[str] | list[tuple[str, str | None]], batch_size: int = 32) -> list[dict]:
        """{label, probabilities} per text; a (text, text_pair) tuple for pair tasks."""
        from strop.recipes.classify import predict_texts

        pairs = [(t, None) if isinstance(t, str) else (t[0], t[1]) for t in texts]
        probs = predict_texts(self.model, self.tokenizer, pairs, batch_size).tolist()
        return [
            {
                "label": self.labels[max(range(len(q)), key=q.__getitem__)],
                "probabilities": {name: round(p, 6) for name, p in zip(self.labels, q, strict=True)},
            }
            for q in probs
        ]

    def explain(self, text: str, pair: str | None = None, steps: int = 32) -> dict:
        """The predicted label and each token's integrated-gradients attribution towards it."""
        from strop.recipes.classify import explain

        return explain(self.model, self.tokenizer, text, pair, steps=steps)


class RewardModel:
    """A strop reward run: a scalar score per conversation (the reply as its last turn)."""

    def __init__(self, run_dir: str | Path, device: str = "auto"):
        from strop.core.device import resolve_device
        from strop.methods.reward import RewardScorer

        self.scorer = RewardScorer(Path(run_dir), resolve_device(device))

    def score(self, conversations: list[Conversation], batch_size: int = 8) -> list[float]:
        return self.scorer(conversations, batch_size)

    def score_file(self, path: str | Path, batch_size: int = 8) -> list[dict]:
        """Rows `{prompt, response}` or `{messages}` (ending in the reply), each with its `reward` added."""
        from strop.data.read import read_rows

        rows, conversations = read_rows(str(path)), []
        for row in rows:
            d = row.data
            if isinstance(d.get("messages"), list):
                conversations.append(d["messages"])
            elif isinstance(d.get("prompt"), str) and isinstance(d.get("response"), str):
                conversations.append(
                    [
                        {"role": "user", "content": d["prompt"]},
                        {"role": "assistant", "content": d["response"]},
                    ]
                )
            else:
                raise StropError(f"{row.where}: expected 'messages' or 'prompt' and 'response'")
        out = self.score(conversations, batch_size)
        return [{**row.data, "reward": round(r, 6)} for row, r in zip(rows, out, strict=True)]


@dataclass
class _EvalPlan:
    file: Any  # recipes.evaluation.FileExamples
    out: Path
    max_length: int
    progress: bool
    judge: Any = None  # core.judge_config.JudgeConfig: grades the replies on its rubric


def _eval_plan(
    target: str,
    data: str | Path,
    out_dir: str | Path | None = None,
    *,
    data_format: str = "auto",
    max_length: int = 1024,
    progress: bool = False,
    force: bool = False,
    rag: str | Path | None = None,
    top_k: int = 4,
    rag_mode: str = "hybrid",
    rag_approximate: bool = False,
    judge: Any = None,
    **eval_options: Any,
) -> _EvalPlan:
    """`evaluate`'s options checked and its file read, all before a model is needed: the output folder
    (new or empty unless `force`, never one holding `data`), the index, the eval settings, the rows."""
    from strop.core.config import EvalConfig
    from strop.core.errors import ConfigError
    from strop.core.io import check_fresh_output
    from strop.recipes.evaluation import file_examples

    out = Path(out_dir) if out_dir else default_eval_dir(target, data)
    check_fresh_output(out, "out_dir", True, force, [data])
    if top_k < 1:
        raise ConfigError(f"top_k: must be at least 1, got {top_k}")
    retriever = None
    if rag is not None:
        from strop.rag.search import Retriever

        retriever = Retriever(str(rag), approximate=rag_approximate)
    try:
        ev = EvalConfig(**{"max_examples": None, **eval_options})
    except ValueError as e:
        raise ConfigError(f"evaluate: {e}") from None
    judge_cfg = _judge_config(judge)
    return _EvalPlan(
        file_examples(data, ev, data_format, retriever, top_k, rag_mode), out, max_length, progress, judge_cfg
    )


def _judge_config(judge: Any):
    """`judge=`: a URL, run folder or catalogue model, a dict of judge settings or a JudgeConfig; checked
    before any model loads (eval/judging.py::check_judge)."""
    if judge is None:
        return None
    from strop.core.errors import ConfigError
    from strop.core.judge_config import JudgeConfig
    from strop.eval.judging import check_judge

    try:
        cfg = (
            judge
            if isinstance(judge, JudgeConfig)
            else JudgeConfig(**({"endpoint": str(judge)} if isinstance(judge, (str, Path)) else judge))
        )
    except (TypeError, ValueError) as e:
        raise ConfigError(f"judge: {e}") from None
    check_judge(cfg)
    return cfg


def default_eval_dir(target: str, data: str | Path) -> Path:
    """eval-FILE inside a run folder, else in the current folder."""
    name = f"eval-{Path(data).stem}"
    return Path(target) / name if (Path(target) / "config.yaml").is_file() else Path(name)
