"""One decoding engine for everything that generates: `strop generate`, `strop eval`, chat, RL rollouts
and `strop serve`.

Continuous batching: a request joins the running batch as soon as a slot is free (its prompt is
prefilled, and its KV cache is left-padded into the batch's), every step decodes one token for every
running request, and a request leaves as soon as it ends, so short replies never wait for the longest
one in a fixed batch and a server's concurrent requests share each forward pass. Rows may use
different LoRA adapters of one PeftModel (peft's mixed-batch `adapter_names`), so several tuned runs
are served on one base without reloading it.

Greedy decoding is argmax of the same logits `model.generate` computes (positions from the attention
mask, left padding masked out), so the two agree token for token; sampling draws from
softmax(logits / temperature) after top-p, from the request's own generator when it has a seed.

Requests are isolated: a failure that belongs to one row (its sampling parameters, its seed, its
`on_text` callback) fails that request alone and the others decode on with exactly the tokens they get
alone; only a failure of the shared forward pass fails the whole batch.
"""

from __future__ import annotations

import inspect
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

BASE = "__base__"  # peft's name for "no adapter" in a mixed batch


@dataclass
class Request:
    prompt: list[int]
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # the reply ends just before the first of these
    adapter: str | None = None  # a LoRA adapter of the engine's PeftModel, BASE for none; None: as loaded
    stop_ids: frozenset[int] | None = None  # end-of-turn ids of this request's template (default: engine's)
    on_text: Callable[[str], None] | None = None  # called with each new piece of text (streaming)
    on_finish: Callable[[Request], None] | None = None  # called once when it ends, from the engine's thread
    # filled in by the engine
    tokens: list[int] = field(default_factory=list)  # generated ids, the end-of-turn id included
    text: str = ""
    finish_reason: str | None = None  # "stop" (end of turn or a stop string) or "length"
    error: BaseException | None = None
    cancelled: bool = False
    done: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Row:
    req: Request
    position: int  # position id of the next token fed
    sent: int = 0  # characters of text already handed to on_text
    generator: torch.Generator | None = None  # made at the first draw of a seeded request


class Engine:
    """Decode many requests at once on one model; `run` for batch work, `start` for a server."""

    def __init__(self, model, tokenizer, stop_ids, max_batch: int = 8, max_length: int | None = None):
        self.model = model
        self.tok = tokenizer
        self.stop_ids = set(stop_ids)
        self.max_batch = max_batch
        limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        self.max_length = max_length or limit or 1 << 30
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.device = next(model.parameters()).device
        self.mixed = hasattr(model, "peft_config")  # a PeftModel: rows may name their adapter
        # peft's LoRA on parameters (MoE experts: target_parameters, which all-linear includes) runs
        # one adapter at a time; it refuses the per-row `adapter_names` of a mixed batch
        self.expert_adapters = any(type(m).__name__ == "ParamWrapper" for m in model.modules())
        self.cache_arg = _cache_argument(model)
        self.waiting: deque[Request] = deque()
        self._admitting: list[Request] = []
        self.rows: list[_Row] = []
        self.cache: Any = None  # a DynamicCache of _GrowingLayers (typed loosely: its layers are a union)
        self.mask: torch.Tensor | None = None  # (B, T) 1 on real tokens of the cached sequence
        self.last: torch.Tensor | None = None  # (B,) the token each row feeds next
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._running = False

    # -- submitting ---------------------------------------------------------------------------------

    def submit(self, req: Request) -> Request:
        if not req.prompt:
            raise ValueError("a request needs at least one prompt token")
        with self._wake:
            self.waiting.append(req)
            self._wake.notify()
        return req

    @property
    def load(self) -> int:
        """Requests waiting or decoding."""
        return len(self.waiting) + len(self.rows)

    def run(self, requests: list[Request], on_done: Callable[[Request], None] | None = None) -> None:
        """Decode these requests to the end in this thread (the engine must not be started), with the
        model in eval mode meanwhile (no dropout: a policy mid-training samples as it scores)."""
        for r in requests:
            self.submit(r)
        was_training = self.model.training
        self.model.eval()
        try:
            while self.waiting or self.rows:
                for r in self.step():
                    if on_done:
                        on_done(r)
        finally:
            self.model.train(was_training)
        for r in requests:
            if r.error is not None:
                raise r.error

    def stream(self, req: Request) -> Iterator[str]:
        """Yield the reply's text piece by piece, decoding in this thread."""
        pieces: list[str] = []
        req.on_text = pieces.append
        self.submit(req)
        while not req.done.is_set():
            self.step()
            yield from pieces
            pieces.clear()
        yield from pieces
        if req.error is not None:
            raise req.error

    # -- serving ------------------------------------------------------------------------------------

    def start(self) -> None:
        """Decode in a background thread until `stop`; requests are submitted from any thread."""
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="strop-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Finish what is waiting and decoding, then end the background thread."""
        with self._wake:
            self._running = False
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()

    def _loop(self) -> None:
        while True:
            with self._wake:
                while self._running and not (self.waiting or self.rows):
                    self._wake.wait()
                if not (self.waiting or self.rows):
                    return
            self.step()

    # -- one step -----------------------------------------------------------------------------------

    def step(self) -> list[Request]:
        """Admit waiting requests into free slots, decode one token for every row; the finished ones."""
        finished: list[Request] = []
        try:
            with torch.inference_mode():
                self._admit()
                finished += self._retire()
                if self.rows:
                    self._decode()
                    finished += self._retire()
        except BaseException as e:  # noqa: BLE001 - handed to every request it affects, then re-raised
            for req in [row.req for row in self.rows] + self._admitting:
                if not req.done.is_set():
                    finished.append(self._fail(req, e))
            self.rows, self.cache, self.mask, self.last = [], None, None, None
            self._admitting = []
            if not isinstance(e, Exception):
                raise
        return finished

    def _forward(self, ids, mask, positions, cache, adapters):
        extra = {}
        if self.mixed and any(a is not None for a in adapters):  # else: the adapter(s) active as loaded
            active = self.model.active_adapter
            names = [active if a is None else a for a in adapters]
            if set(names) != {active}:  # every row on the active adapter needs no per-row routing
                if self.expert_adapters:
                    raise ValueError(
                        f"{self.model.config.model_type}: its LoRA adapters reach expert parameters (a "
                        "mixture of experts), which peft cannot mix in one batch; serve one adapter per "
                        "server (no --adapter beside a run)"
                    )
                extra = {"adapter_names": names}
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **{self.cache_arg: cache},
            **extra,
        )
        return out.logits[:, -1, :].float()

    def _admit(self) -> None:
        new: list[Request] = []
        with self._wake:
            while self.waiting and len(self.rows) + len(new) < self.max_batch:
                req = self.waiting.popleft()
                if req.cancelled:
                    self._finish(req, "stop")
                    continue
                new.append(req)
        if not new:
            return
        self._admitting = new  # failed with the batch if their prefill raises
        width = max(len(r.prompt) for r in new)
        ids = torch.full((len(new), width), self.pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(new):
            ids[i, width - len(r.prompt) :] = torch.tensor(r.prompt)
            mask[i, width - len(r.prompt) :] = 1
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        ids, mask, positions = ids.to(self.device), mask.to(self.device), positions.to(self.device)
        cache = _growing_cache()
        logits = self._forward(ids, mask, positions, cache, [r.adapter for r in new])
        rows = [_Row(r, len(r.prompt)) for r in new]
        first = self._sample(logits, rows)
        self._join(cache, mask, rows, first)
        self._admitting = []

    def _join(self, cache: Any, mask: torch.Tensor, rows: list[_Row], first: torch.Tensor) -> None:
        """Left-pad the shorter of the batch's cache and the newcomers' to one width, and stack them."""
        if self.cache is None or self.mask is None or self.last is None:
            self.cache, self.mask, self.last, self.rows = cache, mask, first, rows
        else:
            old, new = self.mask.shape[1], mask.shape[1]
            width = max(old, new)
            for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
                # both read before either is set: a _GrowingLayer's length changes with its keys
                mine.keys, mine.values = (
                    torch.cat([_left_pad(mine.keys, width), _left_pad(theirs.keys, width)]),
                    torch.cat([_left_pad(mine.values, width), _left_pad(theirs.values, width)]),
                )
            self.mask = torch.cat([_left_pad(self.mask, width), _left_pad(mask, width)])
            self.last = torch.cat([self.last, first])
            self.rows = self.rows + rows
        for row, token in zip(rows, first.tolist(), strict=True):
            self._append(row, token)

    def _decode(self) -> None:
        assert self.cache is not None and self.mask is not None and self.last is not None
        ones = torch.ones((len(self.rows), 1), dtype=self.mask.dtype, device=self.device)
        self.mask = torch.cat([self.mask, ones], dim=1)
        positions = torch.tensor([[r.position] for r in self.rows], device=self.device)
        adapters = [r.req.adapter for r in self.rows]
        logits = self._forward(self.last[:, None], self.mask, positions, self.cache, adapters)
        self.last = self._sample(logits, self.rows)
        for row, token in zip(self.rows, self.last.tolist(), strict=True):
            row.position += 1
            self._append(row, token)

    def _sample(self, logits: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
        """(B,) each row's next token: argmax for greedy rows, a draw for sampling ones. A row whose draw
        raises is failed alone (it keeps its argmax so the batch's tensors stay whole, and leaves at the
        next `_retire`)."""
        chosen = logits.argmax(dim=-1)
        for i, row in enumerate(rows):
            if row.req.temperature > 0 and row.req.error is None:
                try:
                    chosen[i] = self._draw(logits[i], row)
                except Exception as e:  # noqa: BLE001 - this request's failure, not the batch's
                    self._fail_row(row, e)
        return chosen

    def _draw(self, logits: torch.Tensor, row: _Row) -> torch.Tensor:
        """One row's sampled token from its (V,) logits."""
        if row.generator is None and row.req.seed is not None:
            row.generator = _generator(row.req.seed)
        return _draw(logits, row.req.temperature, row.req.top_p, row.generator)

    def _fail_row(self, row: _Row, error: Exception) -> None:
        """Mark one row failed; `_retire` takes it out of the batch and finishes it with its error."""
        row.req.error, row.req.finish_reason = error, "error"

    def _stops(self, req: Request) -> set[int] | frozenset[int]:
        return self.stop_ids if req.stop_ids is None else req.stop_ids

    def _append(self, row: _Row, token: int) -> None:
        req = row.req
        if req.error is not None:
            return
        req.tokens.append(token)
        if token in self._stops(req):
            req.finish_reason = "stop"
        elif len(req.tokens) >= req.max_new_tokens or row.position + 1 >= self.max_length:
            req.finish_reason = "length"
        if req.stop or req.on_text is not None or req.finish_reason:
            try:
                self._update_text(row)
            except Exception as e:  # noqa: BLE001 - e.g. its on_text raised: this request fails alone
                self._fail_row(row, e)

    def _update_text(self, row: _Row) -> None:
        req = row.req
        ids = req.tokens[:-1] if req.tokens[-1] in self._stops(req) else req.tokens
        text = self.tok.decode(ids, skip_special_tokens=True)
        cut = min((at for at in (text.find(s) for s in req.stop) if at >= 0), default=-1)
        if cut >= 0:
            text, req.finish_reason = text[:cut], "stop"
        safe = len(text)
        if req.finish_reason is None:  # hold back a partial character and what may begin a stop string
            safe = len(text.rstrip("\ufffd"))
            for s in req.stop:
                for k in range(min(len(s) - 1, safe), 0, -1):
                    if text[:safe].endswith(s[:k]):
                        safe -= k
                        break
        req.text = text
        if req.on_text is not None and safe > row.sent:
            req.on_text(text[row.sent : safe])
            row.sent = safe

    def _retire(self) -> list[Request]:
        """Drop finished and cancelled rows from the batch, and cache columns no row needs any more."""
        keep = [i for i, r in enumerate(self.rows) if r.req.finish_reason is None and not r.req.cancelled]
        if len(keep) == len(self.rows):
            return []
        gone = [r.req for i, r in enumerate(self.rows) if i not in set(keep)]
        for req in gone:
            self._finish(req, req.finish_reason or "stop")
        if not keep:
            self.rows, self.cache, self.mask, self.last = [], None, None, None
            return gone
        assert self.cache is not None and self.mask is not None and self.last is not None
        index = torch.tensor(keep, device=self.device)
        self.rows = [self.rows[i] for i in keep]
        self.mask, self.last = self.mask[index], self.last[index]
        first = int((self.mask.sum(0) > 0).nonzero()[0])  # leading columns that are padding in every row
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[index, :, first:], layer.values[index, :, first:]
        self.mask = self.mask[:, first:]
        return gone

    def _finish(self, req: Request, reason: str) -> Request:
        req.finish_reason = reason
        req.done.set()
        if req.on_finish is not None:
            req.on_finish(req)
        return req

    def _fail(self, req: Request, error: BaseException) -> Request:
        req.error = error
        return self._finish(req, "error")


class _GrowingLayer(DynamicLayer):
    """A cache layer whose keys and values are views of buffers with room to grow, so a decode step
    writes its column in place; transformers' DynamicLayer concatenates the whole cache every step
    (torch.cat was 40% of a SmolLM2 decode step on this CPU at batch 8)."""

    def __init__(self, **kwargs):
        self._k: Any = None
        self._v: Any = None
        self._len = 0
        super().__init__(**kwargs)

    @property
    def keys(self):
        return None if self._k is None else self._k[:, :, : self._len]

    @keys.setter
    def keys(self, t):
        self._k, self._len = _roomy(t), 0 if t is None or t.dim() < 4 else t.shape[2]

    @property
    def values(self):
        return None if self._v is None else self._v[:, :, : self._len]

    @values.setter
    def values(self, t):
        self._v = _roomy(t)

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized or self._k is None or self._k.dim() < 4:
            self.device, self.is_initialized = key_states.device, True
            self.keys, self.values = key_states, value_states
            return self.keys, self.values
        assert self._v is not None
        end = self._len + key_states.shape[2]
        if end > self._k.shape[2]:
            self._k, self._v = _roomy(self.keys, end), _roomy(self.values, end)
        self._k[:, :, self._len : end] = key_states
        self._v[:, :, self._len : end] = value_states
        self._len = end
        return self.keys, self.values


def _roomy(t: Any, need: int = 0) -> Any:
    """A copy of a (B, H, T, D) cache tensor in a buffer with room for at least `need` (and twice T)."""
    if t is None or t.dim() < 4:
        return t
    b, h, length, d = t.shape
    room = t.new_empty((b, h, max(2 * length, need, length + 64), d))
    room[:, :, :length] = t
    return room


def _growing_cache() -> DynamicCache:
    cache = DynamicCache()
    cache.layer_class_to_replicate = _GrowingLayer
    return cache


def _cache_argument(model) -> str:
    """transformers renamed `past_key_values` to `cache` (the old name warns, then goes in 5.40)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _generator(seed: int | None) -> torch.Generator | None:
    """A CPU generator for `seed`; any int is taken modulo 2**64 (torch's own reading of a negative seed
    in [-2**63, 0), and no overflow error for a larger one)."""
    if seed is None:
        return None
    g = torch.Generator()
    g.manual_seed(seed % (1 << 64))
    return g


def _draw(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """A token drawn from softmax(logits / temperature) within the top-p mass (on the CPU).

    Stable for any positive temperature: the logits are shifted so their maximum is 0 before the
    division, in float64, so a tiny temperature (1e-300) gives -inf for the others and 1 for the
    maximum (greedy, ties shared) instead of inf - inf = nan. Non-finite probabilities (nan logits
    from the model) raise ValueError, which fails this request alone.
    """
    scores = logits.cpu().double()
    probs = torch.softmax((scores - scores.max()) / temperature, dim=-1)
    if not bool(torch.isfinite(probs).all()):
        raise ValueError("the model's next-token scores are not finite (nan or inf); cannot sample")
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(0) - sorted_probs > top_p  # the smallest set whose mass reaches top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator)[0].to(logits.device)


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """Zeros prepended along the sequence axis (dim 2 of a (B, H, T, D) cache, dim 1 of a (B, T) mask)."""
    dim = 2 if t.dim() == 4 else 1
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)
