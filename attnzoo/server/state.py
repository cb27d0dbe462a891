"""What every handler needs: the engine, the served model's names, and the admission checks."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field

from attnzoo.engine.llm import LLM
from attnzoo.engine.sampling import SamplingParams
from attnzoo.server.engine_thread import EngineDead, EngineThread
from attnzoo.server.errors import APIError, from_value_error
from attnzoo.server.metrics import ServerMetrics


@dataclass
class ServerState:
    llm: LLM
    engine: EngineThread
    metrics: ServerMetrics
    model_name: str
    model_aliases: set[str] = field(default_factory=set)   # e.g. the model's path
    api_key: str | None = None
    max_queued_requests: int | None = None
    stall_timeout_s: float = 60.0
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def tokenizer(self):
        return self.llm.tokenizer

    @property
    def kv_tokens(self) -> int:
        return self.llm.kv.num_pages * self.llm.kv.page_size

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name and name not in self.model_aliases:
            raise APIError(404, f"The model `{name}` does not exist. This server serves `{self.model_name}`.",
                           param="model", code="model_not_found")

    def admit(self) -> None:
        """Reject before queueing when too many requests already wait (vLLM's --max-num-queued-reqs)."""
        if self.max_queued_requests is not None and self.engine.queued() > self.max_queued_requests:
            raise APIError(429, f"The server is overloaded: more than {self.max_queued_requests} requests are "
                                f"waiting. Retry later.", code="server_overloaded")

    async def encode(self, text: str) -> list[int]:
        # off the event loop: a long prompt takes milliseconds to tokenize
        return await asyncio.to_thread(self.tokenizer.encode, text)

    async def submit(self, prompts: list[list[int]], params: list[SamplingParams]) -> tuple[list[str], asyncio.Queue]:
        """Add every prompt or none; the ids share one queue."""
        self.admit()
        queue: asyncio.Queue = asyncio.Queue()
        rids: list[str] = []
        try:
            for ids, p in zip(prompts, params):
                rid = self.engine.new_id()
                await self.engine.add(rid, ids, p, queue)
                rids.append(rid)
        except ValueError as e:
            for rid in rids:
                self.engine.abort(rid)
            raise from_value_error(e) from None
        except EngineDead as e:
            raise APIError(503, str(e), code="engine_dead") from None
        except BaseException:
            for rid in rids:
                self.engine.abort(rid)
            raise
        return rids, queue


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"
