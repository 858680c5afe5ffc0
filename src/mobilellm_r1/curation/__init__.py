"""Data curation (paper section 5.1.1, Figure 5): quality filter -> Ask-LLM (reasoning) -> Ask-LLM
(domain) -> semantic dedup -> representative sets D^R_i -> capability-probing sets D^P (code, math,
knowledge). Entry point: :func:`run_curation`; CLI: ``mobilellm-r1 curate``."""

from .pipeline import CurationConfig, discover_sources, run_curation

__all__ = ["CurationConfig", "discover_sources", "run_curation"]
