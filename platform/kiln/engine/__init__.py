"""kiln's LLM serving engine: continuous batching over a paged KV cache, with speculation hooks.

`LLMEngine` (engine.py) ties together `Scheduler` (scheduler.py), `BlockManager`
(block_manager.py), `ModelRunner` (model_runner.py) and the sampler (sampler.py); speculative
decoding plugs in through the `Speculator` protocol of speculation_api.py. Needs only torch and
transformers.
"""

from kiln.engine.engine import LLMEngine
from kiln.engine.params import RequestOutput, SamplingParams

__all__ = ["LLMEngine", "RequestOutput", "SamplingParams"]
