"""Retrieval-augmented generation: ingest documents into ChromaDB, retrieve and ground answers (docs/rag.md)."""
