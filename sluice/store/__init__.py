"""Persistent state: one database facade (PostgreSQL or SQLite) and its versioned schema migrations."""
