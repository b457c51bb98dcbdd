"""Generation: batched (left padding, KV cache) for `strop generate`, streaming for `strop chat`."""

from __future__ import annotations

from collections.abc import Iterator
from threading import Thread

import torch

from strop.data.template import ChatTemplate


def _sampling(temperature: float, top_p: float) -> dict:
    if temperature <= 0:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": temperature, "top_p": top_p}


@torch.no_grad()
def generate(
    model,
    template: ChatTemplate,
    conversations: list[list[dict]],
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int = 8,
    stop: list[str] | None = None,
    progress: bool = False,
) -> list[str]:
    """Replies to each conversation, in order (greedy when temperature is 0).

    Prompts are batched by length (little padding), left-padded, with the KV cache; a reply ends at
    an end-of-turn token, after `max_new_tokens`, or just before the first of the `stop` strings.
    """
    from tqdm.auto import tqdm

    tok = template.tokenizer
    device = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    prompts = [template.prompt_ids(c) for c in conversations]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    replies: list[str] = [""] * len(prompts)
    extra = {"stop_strings": list(stop), "tokenizer": tok} if stop else {}
    bar = tqdm(total=len(prompts), desc="generate", unit="ex", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(batch):
            ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]) :] = 1
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            eos_token_id=sorted(template.stop_ids),
            pad_token_id=pad,
            **extra,
            **_sampling(temperature, top_p),
        )
        for row, i in enumerate(batch):
            replies[i] = _cut(tok.decode(out[row, width:], skip_special_tokens=True), stop).strip()
        bar.update(len(batch))
    bar.close()
    return replies


def _cut(text: str, stop: list[str] | None) -> str:
    """The text before the first stop string (generation halts on a token that completes one)."""
    for s in stop or ():
        at = text.find(s)
        if at >= 0:
            text = text[:at]
    return text


def stream(
    model,
    template: ChatTemplate,
    conversation: list[dict],
    max_new_tokens: int = 256,
    temperature: float = 0.7,
    top_p: float = 0.9,
) -> Iterator[str]:
    """Yield the reply's text piece by piece as it is generated."""
    from transformers import TextIteratorStreamer

    tok = template.tokenizer
    device = next(model.parameters()).device
    ids = torch.tensor([template.prompt_ids(conversation)], device=device)
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    kwargs = dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        eos_token_id=sorted(template.stop_ids),
        streamer=streamer,
        pad_token_id=tok.pad_token_id,
        **_sampling(temperature, top_p),
    )
    failed: list[BaseException] = []

    def run() -> None:
        try:
            model.generate(**kwargs)
        except BaseException as e:  # noqa: BLE001 - re-raised below; without end() the streamer waits forever
            failed.append(e)
            streamer.end()

    thread = Thread(target=run, daemon=True)
    thread.start()
    yield from streamer
    thread.join()
    if failed:
        raise failed[0]
