"""distmerge: distributed merging of LLM checkpoints."""

__version__ = "0.1.0"
