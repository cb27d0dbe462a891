"""Logprobs in OpenAI's two shapes: chat's `content` list and completions' parallel arrays."""

from __future__ import annotations

from attnzoo.models.tokenizer import Tokenizer


def _tok(tokenizer: Tokenizer, tid: int) -> str:
    return tokenizer.decode([tid], skip_special_tokens=False)


def _top(entry: dict[int, float], sampled: int, n: int) -> list[tuple[int, float]]:
    # the engine's dict holds the top n plus the sampled token; keep exactly the top n
    items = sorted(entry.items(), key=lambda kv: -kv[1])
    if sampled in dict(items[:n]) or len(items) <= n:
        return items[:n]
    return [kv for kv in items if kv[0] != sampled][:n]


def chat_logprobs(tokenizer: Tokenizer, token_ids: list[int], entries: list[dict[int, float]], n: int) -> dict:
    content = []
    for tid, entry in zip(token_ids, entries):
        s = _tok(tokenizer, tid)
        content.append({"token": s, "logprob": entry[tid], "bytes": list(s.encode()),
                        "top_logprobs": [{"token": (t := _tok(tokenizer, i)), "logprob": lp, "bytes": list(t.encode())}
                                         for i, lp in _top(entry, tid, n)]})
    return {"content": content}


def completion_logprobs(tokenizer: Tokenizer, token_ids: list[int], entries: list[dict[int, float]], n: int,
                        offset: int = 0) -> dict:
    tokens, lps, tops, offsets = [], [], [], []
    for tid, entry in zip(token_ids, entries):
        s = _tok(tokenizer, tid)
        tokens.append(s)
        lps.append(entry[tid])
        tops.append({_tok(tokenizer, i): lp for i, lp in _top(entry, tid, n)} if n else None)
        offsets.append(offset)
        offset += len(s)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}
