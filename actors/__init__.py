"""Ray actors that wrap kiln core objects (engines, scorers, generators) for jobs and serve.

Dependency direction: `serve`, `jobs` -> `actors` -> `kiln`. The serving engine, SNN and GP
classifier actors land here with their issues.
"""
