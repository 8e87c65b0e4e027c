"""kiln: the core library of the kiln platform (pure PyTorch + Hugging Face, never Ray).

Subpackages are imported on demand so that each one needs only what it uses
(`import kiln.worlds` works without Ray, DeepSpeed or diffusers installed).
"""

__version__ = "0.1.0"
