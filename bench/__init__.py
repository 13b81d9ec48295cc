"""Sluice benchmark suite: direct vs gateway vs nginx, streaming, and the HTTP stack study.

Run it with ``python -m bench.run`` (see ``bench/run.py`` for options); results go to stdout as
Markdown and into ``docs/benchmarks.md``.
"""
