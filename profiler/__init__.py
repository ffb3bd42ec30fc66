"""attnprof: attention distance profiles of causal LMs, base vs LoRA-merged."""
__version__ = "0.1.0"
