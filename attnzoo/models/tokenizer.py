"""Tokenizer (HF `tokenizers`) built from a GGUF vocabulary or an HF tokenizer.json, and the chat
template rendered in jinja2's sandbox."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

from attnzoo.errors import ModelLoadError
from attnzoo.models.config import ModelConfig

# llama.cpp's pre-tokenizer names whose vocabularies were trained with digits split one by one
# (StarCoder family, SmolLM): a \p{N} split before the GPT-2 byte-level regex.
_DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact", "codeshell", "exaone", "minerva", "command-r"}
_GGUF_CONTROL, _GGUF_USER_DEFINED = 3, 4


class Tokenizer:
    def __init__(self, tok: HFTokenizer, *, bos_token_id: int | None, eos_token_ids: list[int],
                 add_bos: bool = False, chat_template: str | None = None):
        self.tok, self.bos_token_id, self.eos_token_ids = tok, bos_token_id, eos_token_ids
        self.add_bos, self.chat_template = add_bos, chat_template

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def token_str(self, token_id: int) -> str | None:
        return self.tok.id_to_token(token_id)

    @classmethod
    def from_gguf_fields(cls, f: dict[str, Any], cfg: ModelConfig) -> "Tokenizer":
        kind = f.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ModelLoadError(f"GGUF tokenizer model {kind!r} is not supported; supported: 'gpt2' (byte-level BPE)")
        tokens: list[str] = f["tokenizer.ggml.tokens"]
        merges = [tuple(m.split(" ", 1)) for m in f["tokenizer.ggml.merges"]]
        types = f.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        tok = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                     fuse_unk=False, byte_fallback=False))
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if f.get("tokenizer.ggml.pre") in _DIGIT_SPLIT_PRE:
            tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"\p{N}"), "isolated"), byte_level])
        else:
            tok.pre_tokenizer = byte_level
        tok.decoder = decoders.ByteLevel()
        special = [AddedToken(t, special=True, normalized=False)
                   for t, ty in zip(tokens, types) if ty in (_GGUF_CONTROL, _GGUF_USER_DEFINED)]
        tok.add_special_tokens(special)
        eos = [f[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if k in f]
        return cls(tok, bos_token_id=f.get("tokenizer.ggml.bos_token_id"), eos_token_ids=sorted(set(eos)),
                   add_bos=bool(f.get("tokenizer.ggml.add_bos_token", False)),
                   chat_template=f.get("tokenizer.chat_template"))

    @classmethod
    def from_hf_dir(cls, path: Path, cfg: ModelConfig) -> "Tokenizer | None":
        """None when the directory has no tokenizer.json (e.g. tiny test checkpoints)."""
        if not (path / "tokenizer.json").exists():
            return None
        tok = HFTokenizer.from_file(str(path / "tokenizer.json"))
        conf_path = path / "tokenizer_config.json"
        conf = json.loads(conf_path.read_text()) if conf_path.exists() else {}
        template = conf.get("chat_template")
        if template is None and (path / "chat_template.jinja").exists():
            template = (path / "chat_template.jinja").read_text()
        eos = list(cfg.eos_token_ids)
        eos_tok = conf.get("eos_token")
        if isinstance(eos_tok, dict):
            eos_tok = eos_tok.get("content")
        if eos_tok and tok.token_to_id(eos_tok) is not None:
            eos = sorted(set(eos + [tok.token_to_id(eos_tok)]))
        return cls(tok, bos_token_id=cfg.bos_token_id, eos_token_ids=eos,
                   add_bos=bool(conf.get("add_bos_token", False)), chat_template=template)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> str:
        if not self.chat_template:
            raise ValueError("this model has no chat template; use plain generation instead")
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"each message needs 'role' and 'content', got {m!r}")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(msg: str) -> None:
            raise TemplateError(msg)

        env.globals.update(raise_exception=raise_exception,
                           strftime_now=lambda fmt: datetime.now().strftime(fmt))
        template = env.from_string(self.chat_template)
        bos = self.token_str(self.bos_token_id) if self.bos_token_id is not None else ""
        eos = self.token_str(self.eos_token_ids[0]) if self.eos_token_ids else ""
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               bos_token=bos, eos_token=eos, tools=tools)
