"""Which task honours which setting. A setting given a value other than its default, for a task whose
code path would not read it, is refused by name: a user who sets a curriculum on a DPO run has asked for
something the run would not do. `tests/test_task_settings.py` walks every pair of this table.

A key missing here is honoured by every task that accepts its section (the validators in core/config.py
refuse the sections that belong to one task, such as `rl`).
"""

from __future__ import annotations

from typing import Any

from strop.core.rl_config import GRPO_ONLY

TASKS = ("sft", "classification", "reward", "reward-ratings", "dpo", "kto", "ppo", "grpo")
ALL = frozenset(TASKS)
GENERATIVE = frozenset({"sft", "dpo", "kto", "ppo", "grpo"})
FIT = ALL - {"ppo", "grpo"}  # the tasks trained by training/loop.py::fit (RL has its rollout loop)
CHAT = ALL - {"classification"}  # text through a chat template (classification reads raw text)

HONOURED: dict[str, frozenset[str]] = {
    # the SFT data builder's (data/build.py) own features
    "data.mixture": frozenset({"sft"}),
    "data.curriculum": frozenset({"sft"}),
    "data.augment": frozenset({"sft"}),
    "data.cache_dir": frozenset({"sft"}),
    "data.train_on_prompt": frozenset({"sft"}),
    "data.template": CHAT,
    "data.system_prompt": CHAT,
    "data.skip_bad_rows": FIT,
    # the rollout loop steps once per rollout, logs every step and has no early stopping
    "train.grad_accum": FIT,
    "train.memory_limit": FIT,  # the rollout loop's batches are its prompts and groups
    "train.log_every": FIT,
    "train.early_stopping": FIT,
    # a classifier's backbone is loaded afresh: there is no adapter of an earlier run to continue
    "model.adapter": GENERATIVE,
    "method.freeze.train_lm_head": GENERATIVE,
    # generation-based evaluation (eval/suite.py) is SFT's; the others score their own objective
    "eval.batch_size": FIT,
    **{
        f"eval.{key}": frozenset({"sft"})
        for key in (
            "metrics",
            "extract",
            "max_new_tokens",
            "temperature",
            "top_p",
            "stop",
            "base",
            "kshot",
            "forgetting",
            "reference_text",
            "forgetting_threshold",
            "bootstrap",
            "samples",
        )
    },
    "distill": frozenset({"sft", "classification"}),
    "judge": frozenset({"sft"}),  # it reads the generation-based evaluation's replies
    **{f"dpo.{key}": frozenset({"dpo"}) for key in ("loss", "beta", "label_smoothing", "simpo_gamma")},
    **{f"kto.{key}": frozenset({"kto"}) for key in ("beta", "desirable_weight", "undesirable_weight")},
    **{f"rl.{key}": frozenset({"ppo"}) for key in ("value_clip", "vf_coef", "gamma", "lam")},
    **{f"rl.{key}": frozenset({"grpo"}) for key in GRPO_ONLY},
    "classify.labels": frozenset({"classification"}),
    "classify.class_weights": frozenset({"classification"}),
    "classify.explain": frozenset({"classification"}),
    "classify.pooling": frozenset({"classification", "reward", "reward-ratings"}),
    "classify.head_layers": frozenset({"classification", "reward", "reward-ratings"}),
    "classify.head_dropout": frozenset({"classification", "reward", "reward-ratings"}),
    "reward_model.rating_field": frozenset({"reward-ratings"}),
}
# per data source (data.train.N.KEY, data.validation.N.KEY, data.test.N.KEY)
SOURCE_HONOURED: dict[str, dict[str, frozenset[str]]] = {
    "template": {"train": frozenset({"sft"}), "validation": frozenset({"sft"}), "test": frozenset()},
    "format": {split: ALL - {"reward-ratings", "ppo", "grpo"} for split in ("train", "validation", "test")},
}


def task_kind(cfg: Any) -> str:
    """The row of the table a config is: its task, with reward models on ratings apart."""
    if cfg.task == "reward" and cfg.reward_model.target == "ratings":
        return "reward-ratings"
    return cfg.task


def unhonoured(cfg: Any) -> list[str]:
    """One message per setting given to a task that would ignore it."""
    kind, out = task_kind(cfg), []
    for key, tasks in HONOURED.items():
        if kind not in tasks and _differs(cfg, key.split(".")):
            out.append(f"{key}: task {kind} does not use it ({_who(tasks)}); remove it")
    for split in ("train", "validation", "test"):
        for i, src in enumerate(getattr(cfg.data, split)):
            for key, by_split in SOURCE_HONOURED.items():
                if kind not in by_split[split] and _differs(src, [key]):
                    where = (
                        "test sources are scored with the run's template"
                        if key == "template"
                        else _who(by_split[split])
                    )
                    out.append(f"data.{split}.{i}.{key}: task {kind} does not use it ({where}); remove it")
            if src.ratio is not None and (split != "train" or cfg.data.mixture is None):
                out.append(
                    f"data.{split}.{i}.ratio: a ratio weighs training sources in a data.mixture; "
                    + ("add a mixture section" if split == "train" else "remove it from a held-out source")
                )
    return out


def _differs(section: Any, path: list[str]) -> bool:
    """The setting at `path` under `section` holds something other than its default."""
    for name in path[:-1]:
        section = getattr(section, name)
        if section is None:
            return False
    name = path[-1]
    field = type(section).model_fields[name]
    return getattr(section, name) != field.get_default(call_default_factory=True)


def _who(tasks: frozenset[str]) -> str:
    names = [t for t in TASKS if t in tasks]
    if not names:
        return "no task does"
    return f"only {', '.join(names)} {'uses' if len(names) == 1 else 'use'} it"
