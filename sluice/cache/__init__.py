"""The response cache: exact and semantic lookups, scoped so an answer never crosses tenants (docs/cache.md)."""
