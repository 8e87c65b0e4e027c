"""Ray Serve deployments and the serve config (the OpenAI-compatible LLM app and the classifier
apps land here with their issues)."""
