"""mobilellm-r1: the MobileLLM-R1 recipe (arXiv 2509.24945) for sub-billion-parameter reasoning models."""

__version__ = "0.1.0"
