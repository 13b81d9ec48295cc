"""The audit and usage log: a record per request, written in batches off the request path (see writer.py)."""
