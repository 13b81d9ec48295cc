"""Sluice: a production serving layer for LLM and RAG services built on vLLM."""

__version__ = "0.1.0"
