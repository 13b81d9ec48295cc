"""Minimal alternative proxies implementing Sluice's hot path on different Python HTTP stacks.

Each one parses the JSON body, reads ``model``, checks the bearer key against a set, forwards to the
upstream with a pooled keep-alive client and returns the response (streamed bodies chunk by chunk).
They exist only to be measured by ``python -m bench.run --only stacks``.
"""
