"""Ray Serve apps and `serve/config.yaml`: the OpenAI-compatible LLM app (`llm.py`) and the
image classifier app (`classify.py`), sharing the API key, body limit and errors of
`common.py`."""
