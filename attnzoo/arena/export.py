"""Write a trained arena model as a directory the engine loads (`attnzoo chat --model runs/arena/gdn`):
attnzoo's native checkpoint (models/native.py) plus a byte-level tokenizer that matches data.py's ids."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from attnzoo.arena.data import KEY_BASE, MQAR_KEYS, MQAR_VALUES, SPECIAL_TOKENS, VALUE_BASE, VOCAB_SIZE
from attnzoo.models.decoder import DecoderLM
from attnzoo.models.native import save_native

# ChatML-shaped; the arena's models were trained on Python sources, so a "chat" continues code
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what the ByteLevel pre-tokenizer emits)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


@cache
def tokenizer_json() -> str:
    """Byte-level tokenizer: token id = byte value (no merges), then the specials and the MQAR tokens at
    the ids data.py gives them."""
    vocab = {ch: b for b, ch in bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    names = sorted(SPECIAL_TOKENS, key=SPECIAL_TOKENS.get)
    names += [f"<|k{i}|>" for i in range(MQAR_KEYS)] + [f"<|v{i}|>" for i in range(MQAR_VALUES)]
    tok.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in names])
    if tok.get_vocab_size(with_added_tokens=True) != VOCAB_SIZE or tok.token_to_id("<|k0|>") != KEY_BASE \
            or tok.token_to_id("<|v0|>") != VALUE_BASE:
        raise RuntimeError("the arena tokenizer's ids do not match attnzoo.arena.data")
    return tok.to_str()


def tokenizer_files() -> dict[str, str]:
    conf = {"eos_token": "<|im_end|>", "add_bos_token": False, "chat_template": CHAT_TEMPLATE,
            "model_max_length": None, "tokenizer_class": "PreTrainedTokenizerFast"}
    return {"tokenizer.json": tokenizer_json(), "tokenizer_config.json": json.dumps(conf, indent=1) + "\n"}


def export_model(model: DecoderLM, path: str | Path) -> Path:
    return save_native(model, path, tokenizer_files())
