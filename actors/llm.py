"""`LLMEngineActor`: one `kiln.engine.LLMEngine` stepping continuously for every caller.

All requests that reach the process share one engine, so they are batched together however many
front-end replicas sent them: `generate` is an async generator over `LLMEngine.stream`, whose
driver task keeps stepping while any request is unfinished. The class is a plain Python class
so it runs as a Serve replica (`serve/llm.py`) or as `ray.remote(LLMEngineActor)`.

What it yields is already safe to show a user: text deltas that never take back a character
(held back while they could still become a stop string or an incomplete UTF-8 character), so
the concatenated deltas of a stream equal the text of the same request run to completion.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import torch
from ray.util import metrics

from kiln.engine import LLMEngine, SamplingParams

# Plain chat rendering for checkpoints without a chat template (kiln's tiny models).
PLAIN_CHAT_TURN = "{role}: {content}\n"
PLAIN_CHAT_REPLY = "assistant:"


class LLMEngineActor:
    def __init__(self, model: str | Path, torch_threads: int | None = None, **engine_options):
        """`engine_options` go to `LLMEngine` (draft_model, proposer, speculation, max_num_seqs
        ...); `torch_threads` caps intra-op threads where the replica shares its CPUs."""
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.engine = LLMEngine(model, **engine_options)
        self.tokenizer = self.engine.tokenizer
        self.speculation = "none" if self.engine.speculator is None else "per-request"
        self._running = 0
        self._metrics = {
            "queue_depth": metrics.Gauge(
                "kiln_llm_queue_depth", "Requests in the engine (waiting or running)."
            ),
            "generated_tokens": metrics.Counter(
                "kiln_llm_generated_tokens", "Tokens generated; rate() of it is tokens/s."
            ),
            "tokens_per_second": metrics.Gauge(
                "kiln_llm_tokens_per_second", "Generated tokens/s of the last finished request."
            ),
            "spec_alpha": metrics.Gauge(
                "kiln_llm_spec_acceptance_rate", "Estimated draft acceptance rate (alpha)."
            ),
            "spec_k_mean": metrics.Gauge(
                "kiln_llm_spec_chosen_k", "Mean proposal length SmartSpec chose last step."
            ),
            "spec_goodput_measured": metrics.Gauge(
                "kiln_llm_spec_goodput", "Measured goodput (generated tokens/s), moving average."
            ),
        }

    def info(self) -> dict:
        return {"max_model_len": self.engine.max_model_len, "speculation": self.speculation}

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """The checkpoint's chat template, or a plain `role: content` transcript."""
        if self.tokenizer is not None and self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
        turns = "".join(PLAIN_CHAT_TURN.format(**m) for m in messages)
        return turns + PLAIN_CHAT_REPLY

    async def generate(
        self, request_id: str, prompt: str | list[int], params: dict
    ) -> AsyncIterator[dict]:
        """Text deltas of one request; the last item is finished, with usage and speculation.

        Bad input (one the engine refuses, or prompt + max_tokens beyond the context) yields a
        single {"error": message} item before any text, so callers can answer 400.
        """
        token_ids = self.tokenizer(prompt).input_ids if isinstance(prompt, str) else prompt
        wanted = len(token_ids) + params.get("max_tokens", SamplingParams.max_tokens)
        if wanted > self.engine.max_model_len:
            yield {
                "error": f"max_tokens: the prompt has {len(token_ids)} tokens, so max_tokens may "
                f"be at most {self.engine.max_model_len - len(token_ids)} (the model context is "
                f"{self.engine.max_model_len} tokens)"
            }
            return
        start, sent = time.perf_counter(), ""
        self._running += 1
        self._metrics["queue_depth"].set(self._running)
        try:
            async for out in self.engine.stream(token_ids, params, request_id):
                if out.finish_reason == "error":
                    yield {"error": out.error}
                    return
                text = out.text if out.finished else _stable_prefix(out.text, params.get("stop"))
                delta = text[len(sent) :]
                sent += delta
                if not out.finished:
                    if delta:
                        yield {"text": delta}
                    continue
                self._record(out, time.perf_counter() - start)
                yield {
                    "text": delta,
                    "finish_reason": out.finish_reason,
                    "usage": {
                        "prompt_tokens": len(out.prompt_token_ids),
                        "completion_tokens": len(out.token_ids),
                        "total_tokens": len(out.prompt_token_ids) + len(out.token_ids),
                    },
                    "speculation": out.spec_stats,
                }
        finally:
            self._running -= 1
            self._metrics["queue_depth"].set(self._running)

    def _record(self, out, seconds: float) -> None:
        self._metrics["generated_tokens"].inc(len(out.token_ids))
        self._metrics["tokens_per_second"].set(len(out.token_ids) / max(seconds, 1e-9))
        if self.engine.speculator is not None:
            for name, value in self.engine.speculator.metrics().items():
                if name in self._metrics:
                    self._metrics[name].set(value)


def _stable_prefix(text: str, stop: list[str] | None) -> str:
    """`text` minus what may still change: a trailing replacement character (an incomplete
    UTF-8 sequence) or a suffix that could grow into a stop string (which would be trimmed)."""
    text = text.rstrip("\ufffd")
    for s in stop or ():
        for length in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:length]):
                text = text[:-length]
                break
    return text
