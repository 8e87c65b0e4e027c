"""Ray actors that wrap kiln core objects (engines, scorers, generators) for jobs and serve.

Dependency direction: `serve`, `jobs` -> `actors` -> `kiln`. `llm.py`: the serving engine
stepping for every caller; `classifier.py`: the SNN and GP classifiers behind one protocol.
"""
