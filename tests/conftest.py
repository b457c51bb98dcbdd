"""Shared fixtures: a network guard, a tiny tokenizer, and tiny random Llama- and GPT-2-style models
saved as local Hugging Face folders (the same loading path users take)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _pin_xdist_worker() -> None:
    """Under `pytest -n K` (pytest-xdist) each worker gets its own share of the CPUs, so K workers run
    side by side instead of fighting over every core: strop sizes its torch threads by this affinity,
    and the strop processes a test starts inherit it."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not worker.startswith("gw") or count < 2 or not hasattr(os, "sched_setaffinity"):
        return
    cpus = sorted(os.sched_getaffinity(0))
    share = cpus[int(worker[2:]) % count :: count]
    if share and len(cpus) >= count:
        os.sched_setaffinity(0, share)


_pin_xdist_worker()


@pytest.fixture(autouse=True)
def _progress_not_silenced():
    """A `-q` command run in-process silences strop's progress for that process; the next test starts
    without it, as the next `strop` command would."""
    yield
    from strop.core import progress

    progress.silence(False)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    """Tests on the one trained quickstart run share a worker (`--dist loadgroup`), so it trains once.
    tryfirst: xdist's own hook, registered after this file and so called before it otherwise, reads the
    groups; without it (and with pytest 9.2, pytest-xdist#1386) the quickstart trained once per worker."""
    for item in items:
        if "quickstart_out" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("quickstart"))
        elif _uses_a_module_fixture(item):  # built once per worker that runs the module: one worker
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))


def _uses_a_module_fixture(item) -> bool:
    """A module-scoped fixture (a trained run, a live server, an exported model) is built again on each
    worker that runs one of its tests; its tests share one worker instead (the Gemma run trained twice)."""
    info = getattr(item, "_fixtureinfo", None)  # pytest's own record of the test's fixtures
    defs = info.name2fixturedefs.values() if info is not None else ()
    return any(d and d[-1].scope == "module" for d in defs)


CORPUS = [
    "What is the capital of France? The capital of France is Paris.",
    "Arr! Seven times eight be 56, matey. Yo ho ho!",
    "Write a short poem about the sea. The sea is wide and blue and deep.",
    "Summarize the text. Translate to French. Explain why the sky is blue.",
    "instruction input output response assistant user system question answer",
    "0 1 2 3 4 5 6 7 8 9 + - * / = ( ) . , ! ? : ; ' \" # @",
]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]


class NetworkBlocked(OSError):
    pass


LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a network connection beyond loopback fails the attempt (and is reported);
    loopback stays open for the servers tests start themselves."""
    connect, create_connection, getaddrinfo = (
        socket.socket.connect,
        socket.create_connection,
        socket.getaddrinfo,
    )

    def refuse(what):
        raise NetworkBlocked(f"network access is disabled in tests ({what})")

    def guarded_connect(self, address):
        if isinstance(address, tuple) and address[0] in LOOPBACK:
            return connect(self, address)
        if self.family == socket.AF_UNIX:  # a socket file on this machine (W&B's local service)
            return connect(self, address)
        refuse(address)

    def guarded_create_connection(address, *args, **kwargs):
        if address[0] in LOOPBACK:
            return create_connection(address, *args, **kwargs)
        refuse(address)

    def guarded_getaddrinfo(host, *args, **kwargs):
        if host in LOOPBACK:
            return getaddrinfo(host, *args, **kwargs)
        refuse(host)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket, "create_connection", guarded_create_connection)
    monkeypatch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)


@pytest.fixture(autouse=True)
def strop_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("STROP_CACHE", str(tmp_path_factory.getbasetemp() / "strop-cache"))


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from strop.data.template import CHATML

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tk.train_from_iterator(CORPUS, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        eos_token="<|im_end|>",
        pad_token="<pad>",
        bos_token="<|im_start|>",
        unk_token="<|endoftext|>",
    )
    tok.chat_template = CHATML
    return tok


def build_model(arch: str, vocab_size: int):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if arch == "llama":
        cfg = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=True,
        )
        return LlamaForCausalLM(cfg)
    cfg = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=256)
    return GPT2LMHeadModel(cfg)


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


def _model_dir(root: Path, arch: str) -> Path:
    out = root / f"tiny-{arch}"
    if not (out / "config.json").exists():
        tok = build_tokenizer()
        model = build_model(arch, len(tok))
        model.save_pretrained(out)
        tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return _model_dir(tmp_path_factory.getbasetemp(), "llama")


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    return _model_dir(tmp_path_factory.getbasetemp(), "gpt2")


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A tiny random BERT-style encoder (no LM head), with the tiny tokenizer."""
    import torch
    from transformers import BertConfig, BertModel

    out = tmp_path_factory.getbasetemp() / "tiny-bert"
    if not (out / "config.json").exists():
        tok = build_tokenizer()
        torch.manual_seed(0)
        cfg = BertConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=256,
            pad_token_id=tok.pad_token_id,
        )
        BertModel(cfg).save_pretrained(out)
        tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def quickstart_out(tmp_path_factory) -> dict:
    """`strop quickstart` as users run it (slow tests only: the real SmolLM2), trained once a session."""
    from strop.recipes.quickstart import run_quickstart

    here = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("quickstart"))
    try:
        return run_quickstart(show_progress=False)
    finally:
        os.chdir(here)


@pytest.fixture(params=["llama", "gpt2"])
def tiny_model(request, tmp_path_factory) -> Path:
    return _model_dir(tmp_path_factory.getbasetemp(), request.param)


ALPACA_ROWS = [
    {"instruction": f"What is {a} times {b}?", "output": f"Arr! {a} times {b} be {a * b}, matey. Yo ho ho!"}
    for a in range(2, 7)
    for b in range(2, 6)
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def alpaca_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", ALPACA_ROWS)


def tiny_config(model_dir: Path, data: Path, out: Path, **sections) -> dict:
    """A run config dict for a tiny model: quick, deterministic, no dropout surprises."""
    cfg = {
        "name": "run",
        "output_dir": str(out),
        "model": {"name": str(model_dir)},
        "data": {
            "train": [str(data)],
            "val_fraction": 0.2,
            "max_length": 64,
            "cache_dir": str(out / "cache"),
        },
        "method": {"name": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
        "optim": {"lr": 1e-2, "schedule": "constant"},
        "train": {"batch_size": 4, "max_steps": 4, "seed": 0},
        "eval": {"enabled": False},  # generation-based evaluation is tested in test_eval.py
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    if cfg.get("task", "sft") != "sft":
        del cfg["data"]["cache_dir"]  # only SFT caches tokenized data; other tasks refuse the key
    return cfg


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """`strop ARGV` in this process: (exit status, stdout, stderr). An exception that escapes is a test
    failure, which is the point: a user never sees one."""
    from strop.cli.main import main

    try:
        rc = main(argv)
    except SystemExit as e:  # argparse: --help, usage errors
        rc = e.code
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def assert_user_error(rc: int, err: str, *needles: str) -> None:
    assert rc == 2, err
    assert "error:" in err and "Traceback" not in err, err
    for n in needles:
        assert n in err, f"{n!r} not in stderr:\n{err}"
