"""Typed run configuration: YAML + `--set a.b=c` overrides -> validated objects.

Every error names the dotted key and what is allowed, e.g.
`optim.lr: expected a number, got '3e-4x'`.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from strop.core.config_file import apply_overrides, read_config_file
from strop.core.data_config import (  # noqa: F401 - re-exported: the data section of a run config
    AugmentConfig,
    CurriculumConfig,
    DataConfig,
    DatasetSource,
    MixtureConfig,
)
from strop.core.errors import ConfigError
from strop.core.judge_config import JudgeConfig
from strop.core.rl_config import RLConfig
from strop.core.search_config import SearchConfig
from strop.core.section import Section
from strop.core.task_settings import unhonoured
from strop.core.training_config import (  # noqa: F401 - re-exported: the method, optim and train sections
    EarlyStopping,
    FreezeConfig,
    LoraConfig,
    MethodConfig,
    OptimConfig,
    TrainConfig,
)


class ModelConfig(Section):
    name: str = Field(
        "smollm2-135m-instruct", description="catalogue name, local HF dir, hub id, or .gguf file"
    )
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    trust_remote_code: bool = Field(
        False,
        description="run the Python code that comes with the model folder or hub repo (its auto_map); "
        "executes that code with your permissions: only for a model whose author you trust",
    )
    adapter: Literal["merge", "continue"] = Field(
        "merge",
        description="when model.name is a strop LoRA run: merge its adapter into the weights and apply "
        "this run's method (merge), or keep training that adapter (continue; needs method.name: lora)",
    )
    keep_layers: int | None = Field(
        None,
        ge=1,
        description="keep only N of the model's blocks, evenly spaced with the first and last: a smaller "
        "student initialised from a bigger model's layers (distillation)",
    )


class EvalConfig(Section):
    """Base vs tuned at the end of training, on data.test (else the validation split)."""

    enabled: bool = Field(True, description="evaluate when the run has a test or validation set")
    max_examples: int | None = Field(64, ge=1, description="first N evaluation examples; null for all")
    metrics: list[str] = Field(
        default_factory=list,
        description="exact_match, contains, rouge_l, bleu, accuracy, macro_f1, tool_call, tool_function or module:function "
        "(imported, so its code runs); default: exact_match with an extractor, else rouge_l and bleu",
    )
    extract: str | None = Field(None, description="answer extractor: gsm8k, last_number or regex:PATTERN")
    max_new_tokens: int = Field(256, ge=1)
    temperature: float = Field(0.0, ge=0.0, description="0 is greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: list[str] = Field(default_factory=list, description="strings that end a generation")
    batch_size: int = Field(8, ge=1)
    base: bool = Field(True, description="also evaluate the base model on the same examples")
    kshot: int = Field(
        0, ge=0, description="also evaluate the base model with k training examples in its prompt"
    )
    forgetting: bool = Field(True, description="perplexity of base and tuned on general reference text")
    reference_text: str | None = Field(None, description="a .txt file; default: strop's general text")
    forgetting_threshold: float = Field(0.1, gt=0.0, description="warn above this relative perplexity rise")
    bootstrap: int = Field(1000, ge=100, description="paired bootstrap resamples for confidence intervals")
    samples: int = Field(8, ge=0, description="paired sample generations in the report")


STAGE_SECTIONS = ("data", "method", "optim", "train", "eval")
# a run or stage name is one folder name: never empty, never `..`, no separators, so every file a run
# writes stays inside output_dir/name
FOLDER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def folder_name(value: str) -> str:
    if not FOLDER_NAME.fullmatch(value) or ".." in value:
        raise ValueError(
            "names the run's folder, so it must be one folder name: letters, digits, '.', '_' and '-', "
            f"starting with a letter or digit, at most 128 characters, no '..', '/' or absolute path; "
            f"got {value!r}"
        )
    return value


def name_as_text(value: Any) -> Any:
    """`name: 2024` in YAML (or --set name=2024) is a number there, and meant as a folder name."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class StageConfig(Section):
    """One step of sequential fine-tuning: the top-level config with these sections overridden
    (mappings merge key by key; lists such as data.train are replaced)."""

    name: str = Field(description="names the stage's run folder (letters, digits, '.', '_', '-')")
    _name_text = field_validator("name", mode="before")(name_as_text)
    _name = field_validator("name")(folder_name)
    start: Literal["merged", "adapter"] = Field(
        "merged",
        description="from the previous stage's weights with its adapter merged in (then this stage's "
        "method applies afresh), or by training the previous stage's LoRA adapter further",
    )
    replay: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="share of this stage's training examples drawn from earlier stages' training data",
    )
    data: dict[str, Any] = Field(default_factory=dict)
    method: dict[str, Any] = Field(default_factory=dict)
    optim: dict[str, Any] = Field(default_factory=dict)
    train: dict[str, Any] = Field(default_factory=dict)
    eval: dict[str, Any] = Field(default_factory=dict)


class ClassifyConfig(Section):
    """Sequence classification (task: classification): a backbone, pooling, optional dense layers and a
    linear layer over the labels."""

    labels: list[str] | None = Field(None, description="label order; default: the training labels, sorted")
    pooling: Literal["auto", "mean", "cls", "last"] = Field(
        "auto", description="auto: mean for encoders, the last non-pad token for decoders"
    )
    head_layers: list[int] = Field(
        default_factory=list, description="widths of dense layers before the output"
    )
    head_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    class_weights: Literal["none", "balanced"] | dict[str, float] = Field(
        "none", description="balanced: n / (classes x count) per label, for imbalanced data; or by label"
    )
    explain: int = Field(4, ge=0, description="evaluation examples whose token attributions the report shows")


class DistillConfig(Section):
    """Knowledge distillation (Hinton et al. 2015): loss = alpha * T^2 * KL(teacher_T || student_T)
    + (1 - alpha) * the ordinary loss, on response tokens (SFT) or on the labels (classification)."""

    teacher: str = Field(description="a strop run or any model source sharing the student's tokenizer")
    temperature: float = Field(2.0, gt=0)
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="weight of the distillation term")
    cache_top_k: int | None = Field(
        None,
        ge=1,
        description="run the teacher once before training and keep its top-k logits per response token "
        "(the teacher then leaves memory; later epochs cost no teacher passes); default: on the fly",
    )


class DPOConfig(Section):
    """Preference tuning on pairs (task: dpo): DPO or IPO against the frozen starting model, or SimPO or
    ORPO, which need no reference."""

    beta: float = Field(
        0.1,
        gt=0,
        description="sigmoid/ipo: strength of the pull towards the reference; simpo: the reward scale "
        "(default 2.0 there, as Meng et al. use 2-2.5); orpo: the weight of the odds-ratio term (lambda)",
    )
    loss: Literal["sigmoid", "ipo", "simpo", "orpo"] = Field(
        "sigmoid",
        description="sigmoid: DPO; ipo: Azar et al. 2023; simpo: Meng et al. 2024, reference-free, on mean "
        "log-probs per reply token; orpo: Hong et al. 2024, reference-free, SFT plus an odds-ratio term",
    )
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="cDPO: assumed share of flipped labels")
    simpo_gamma: float = Field(
        0.5, ge=0.0, description="simpo: the reward margin the chosen reply must win by"
    )

    @model_validator(mode="after")
    def _check(self):
        if self.loss == "simpo" and "beta" not in self.model_fields_set:
            object.__setattr__(self, "beta", 2.0)  # 0.1 suits DPO's log-ratios, not SimPO's mean log-probs
        if self.loss in ("ipo", "orpo") and self.label_smoothing:
            raise ValueError(f"label_smoothing: applies to the sigmoid and simpo losses, not {self.loss}")
        if self.loss != "simpo" and self.simpo_gamma != type(self).model_fields["simpo_gamma"].default:
            raise ValueError(f"simpo_gamma: applies to loss: simpo, got loss: {self.loss}")
        return self


class KTOConfig(Section):
    """Kahneman-Tversky optimisation (task: kto) on unpaired feedback rows {prompt, completion, label},
    against the frozen starting model (Ethayarajh et al. 2024)."""

    beta: float = Field(0.1, gt=0, description="strength of the pull towards the reference")
    desirable_weight: float = Field(
        1.0, gt=0, description="weight of the loss on good completions (label true)"
    )
    undesirable_weight: float = Field(
        1.0,
        gt=0,
        description="weight of the loss on bad completions (label false); the paper advises weights so "
        "that desirable_weight x good rows / (undesirable_weight x bad rows) lies in [1, 4/3]",
    )


class RewardModelConfig(Section):
    """What a reward model (task: reward) learns from."""

    target: Literal["pairs", "ratings"] = Field(
        "pairs",
        description="pairs: rank chosen over rejected (Bradley-Terry); ratings: regress a score per reply "
        "(rows {prompt, response, rating} or {messages, rating})",
    )
    rating_field: str = Field("rating", description="the rows' field holding the score (ratings)")


class RunConfig(Section):
    name: str = Field(
        "run", description="names the run's folder under output_dir (letters, digits, '.', '_', '-')"
    )
    output_dir: str = Field("runs", description="run directories are created under this folder")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    task: Literal["sft", "classification", "reward", "dpo", "kto", "ppo", "grpo"] = Field(
        "sft",
        description="sft: generate responses (causal LM); classification: predict a label per text; "
        "reward: score replies from preference pairs; dpo: prefer the chosen replies (dpo.loss: DPO, "
        "IPO, SimPO or ORPO); kto: learn from completions marked good or bad; ppo, grpo: "
        "climb a reward (rl section) on sampled replies",
    )
    dpo: DPOConfig = Field(default_factory=DPOConfig)
    kto: KTOConfig = Field(default_factory=KTOConfig)
    rl: RLConfig | None = Field(None, description="task ppo or grpo: the reward and the rollouts")
    reward_model: RewardModelConfig = Field(default_factory=RewardModelConfig)
    classify: ClassifyConfig = Field(default_factory=ClassifyConfig)
    distill: DistillConfig | None = Field(None, description="learn from a teacher model's distributions")
    judge: JudgeConfig | None = Field(
        None, description="a judge model scores the end-of-run evaluation's replies (eval/judge.json)"
    )
    stages: list[StageConfig] = Field(
        default_factory=list,
        description="sequential fine-tuning: each stage starts from the previous stage's result",
    )
    search: SearchConfig | None = Field(
        None, description="strop tune: the hyperparameters to search (strop train trains the config as given)"
    )

    _name_text = field_validator("name", mode="before")(name_as_text)
    _name = field_validator("name")(folder_name)

    @model_validator(mode="after")
    def _needs_training_data(self) -> RunConfig:
        if not self.stages and not self.data.train:
            raise ValueError("data.train: at least one training source is required")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stages: every stage needs its own name, got {names}")
        if self.stages and self.stages[0].start == "adapter":
            raise ValueError(f"stages.0.start: the first stage ({names[0]}) has no previous stage's adapter")
        if self.method.name == "head" and self.task not in ("classification", "reward"):
            raise ValueError(
                f"method.name: head trains only a head on a frozen backbone; it needs task: classification "
                f"or reward, got task: {self.task}"
            )
        if self.task not in ("sft", "dpo") and self.train.batch_tokens is not None:
            raise ValueError(
                f"train.batch_tokens: packing is for sft and dpo; {self.task} batches by batch_size"
            )
        if self.task != "sft" and self.stages:
            raise ValueError("stages: sequential stages are for sft runs")
        if self.task in ("ppo", "grpo"):
            if self.rl is None:
                raise ValueError(f"rl: task {self.task} needs an rl section with at least rl.reward")
            if self.task == "grpo" and self.rl.group_size < 2:
                raise ValueError(
                    f"rl.group_size: grpo compares replies to the same prompt, so it needs at least 2, "
                    f"got {self.rl.group_size}"
                )
        if self.rl is not None and self.task not in ("ppo", "grpo"):
            raise ValueError(f"rl: the rl section is for task ppo or grpo, got task: {self.task}")
        if self.reward_model.target == "ratings" and self.task != "reward":
            raise ValueError(
                f"reward_model.target: ratings train a reward model (task: reward), got task: {self.task}"
            )
        if self.distill and self.distill.cache_top_k and (self.task != "sft" or self.train.batch_tokens):
            raise ValueError("distill.cache_top_k: for sft runs with padded batches (no train.batch_tokens)")
        if self.model.adapter == "continue" and self.method.name != "lora":
            raise ValueError(
                f"model.adapter: continue trains an existing LoRA adapter, so method.name must be lora, "
                f"got {self.method.name!r}"
            )
        lora = self.method.lora
        made = [k for k, v in (("use_dora", lora.use_dora), ("use_rslora", lora.use_rslora)) if v]
        made += ["init"] if lora.init != "default" else []
        if self.model.adapter == "continue" and made:
            raise ValueError(
                f"method.lora.{made[0]}: model.adapter: continue trains the earlier run's adapter as it was "
                "made; its DoRA, rsLoRA and start are that run's (remove the key)"
            )
        if self.judge is not None and self.task == "sft":
            if not self.eval.enabled:
                raise ValueError(
                    "judge: the judge scores the end-of-run evaluation, and eval.enabled is false"
                )
            if self.judge.mode != "rubric" and not self.eval.base:
                raise ValueError(
                    f"judge.mode: {self.judge.mode} compares tuned with base replies, and eval.base is false "
                    "(set judge.mode: rubric to grade the tuned replies alone)"
                )
        return self

    @model_validator(mode="after")
    def _every_setting_is_honoured(self) -> RunConfig:
        if not self.stages:  # stages are sft; each stage's config is checked on its own
            problems = unhonoured(self)
            if problems:
                raise ValueError("\n  ".join(problems))
        return self

    @model_validator(mode="after")
    def _budget_fits_an_example(self) -> RunConfig:
        if self.train.batch_tokens is not None and self.train.batch_tokens < self.data.max_length:
            raise ValueError(
                f"train.batch_tokens ({self.train.batch_tokens}) must be at least data.max_length "
                f"({self.data.max_length}): every example must fit in one packed row"
            )
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


def stage_configs(cfg: RunConfig) -> list[RunConfig]:
    """Each stage as a complete RunConfig: run folder `<run_dir>/<stage>`, and, after the first, the
    previous stage's model folder as its model. Errors name the stage key (`stages.1.optim.lr: ...`)."""
    top = cfg.model_dump(mode="json", exclude={"stages"})
    out: list[RunConfig] = []
    for i, stage in enumerate(cfg.stages):
        raw = copy.deepcopy(top)
        for section in STAGE_SECTIONS:
            _merge_into(raw[section], getattr(stage, section))
        raw.update(name=stage.name, output_dir=str(cfg.run_dir))
        if i:
            if stage.start == "adapter" and (
                out[-1].method.name != "lora" or raw["method"]["name"] != "lora"
            ):
                raise ConfigError(
                    f"stages.{i}.start: adapter trains stage {out[-1].name}'s LoRA adapter further, so both "
                    f"stages need method.name: lora (got {out[-1].method.name} then {raw['method']['name']})"
                )
            raw["model"]["name"] = str(out[-1].run_dir / "model")
            raw["model"]["adapter"] = "continue" if stage.start == "adapter" else "merge"
        try:
            out.append(RunConfig.model_validate(raw))
        except ValidationError as e:
            text = _format_errors(e, f"stage {stage.name}")
            text = re.sub(r"^  (?=\S)", f"  stages.{i}.", text, flags=re.M)
            raise ConfigError(text) from None
    return out


def _merge_into(base: dict, changes: dict) -> None:
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge_into(base[key], value)
        else:
            base[key] = value


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        got = e.get("input")
        kind = e["type"]
        if kind == "extra_forbidden":
            msg = "unknown key"
        elif kind == "literal_error":
            msg = f"{e['msg'].replace('Input should be', 'expected')}, got {got!r}"
        elif kind == "missing":
            msg = "required key is missing"
        elif kind == "value_error":
            msg = str(e["ctx"]["error"]) if "ctx" in e else e["msg"]
            named = re.match(r"([\w.]+): ", msg)
            if named:  # a check across a section's keys names the key itself
                name = named.group(1)
                inside = key != "(top level)" and not name.startswith(f"{key}.")
                key = f"{key}.{name}" if inside else name
                msg = msg[named.end() :]
        else:
            msg = f"{e['msg'][0].lower()}{e['msg'][1:]}, got {got!r}"
        lines.append(f"  {key}: {msg}")
    return f"invalid config ({source}):\n" + "\n".join(lines)


def load_config(source: str | Path | dict, overrides: list[str] | None = None) -> RunConfig:
    """Load a RunConfig from a YAML file (or a dict), applying `key=value` overrides."""
    if isinstance(source, dict):
        raw, where = copy.deepcopy(source), "dict"  # overrides must not change the caller's dict
    else:
        raw, where = read_config_file(Path(source)), str(source)
    raw = apply_overrides(raw, overrides or [])
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, where)) from None
    stage_configs(cfg)  # a mistake in the last stage fails now, not after the first stage has trained
    return cfg


def to_yaml(cfg: RunConfig) -> str:
    """The config as YAML; a config with no search section is written without one."""
    return yaml.safe_dump(
        cfg.model_dump(mode="json", exclude=None if cfg.search else {"search"}), sort_keys=False
    )
