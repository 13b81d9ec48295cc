"""Create the untrained demonstration LoRA adapters (`medical`, `code`) for the converted base model.

Run by the engine venv's interpreter as a file path, never imported by the gateway (it needs torch, peft
and transformers):

    .venv-engine/bin/python sluice/engine/make_adapters.py --model MODEL_DIR medical=OUT_DIR code=OUT_DIR

These adapters are NOT trained: they exist so that vLLM's multi-LoRA serving, the gateway's routing by
adapter name and runtime adapter loading can be exercised for real. Each is rank 8 on `q_proj`/`v_proj`;
LoRA's usual initialisation (B = 0) would make an adapter an exact no-op, so B gets small seeded noise
instead: answers differ slightly from the base model's (which shows the adapter is really applied) while
staying as fluent as the base model's. Each folder is written under a temporary name and renamed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import zlib
from pathlib import Path
from typing import Any

RANK = 8
ALPHA = 16
TARGETS = ["q_proj", "v_proj"]
MARKER = "sluice-adapter.json"
README = """# `{name}`: an untrained demonstration LoRA adapter

Rank {rank} on {targets}, with seeded random weights. It was not trained on any data and knows nothing about
its name: it exists so that multi-LoRA serving and routing by adapter name can be exercised for real.
Made by `sluice engine prepare` for Gemma 3 270M; the Gemma Terms of Use apply to the base model.
"""


def make_adapter(base: Any, model_dir: Path, name: str, out: Path, noise: float) -> None:
    import torch
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0, task_type="CAUSAL_LM")
    model = get_peft_model(base, config, adapter_name="default")
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "lora_B" in param_name:
                param.copy_(torch.randn(param.shape, generator=generator) * noise)
    work = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    try:
        model.save_pretrained(str(work))
        config_path = work / "adapter_config.json"
        adapter_config = json.loads(config_path.read_text())
        adapter_config["base_model_name_or_path"] = str(model_dir)
        config_path.write_text(json.dumps(adapter_config, indent=2) + "\n")
        marker = {
            "name": name,
            "trained": False,
            "purpose": "demonstration adapter: rank-8 LoRA with seeded random weights, not trained on any data",
            "base_model": str(model_dir),
            "rank": RANK,
            "target_modules": TARGETS,
            "noise_std": noise,
        }
        (work / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        (work / "README.md").write_text(README.format(name=name, rank=RANK, targets=", ".join(TARGETS)))
        if out.exists():
            shutil.rmtree(out)
        work.rename(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    model.unload()  # take the LoRA layers out again so the next adapter starts from the plain model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path, help="the converted base model folder")
    parser.add_argument("--noise", type=float, default=0.02, help="standard deviation of the lora_B weights")
    parser.add_argument("adapters", nargs="+", metavar="NAME=DIR", help="adapters to create")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM

    targets: dict[str, Path] = {}
    for item in args.adapters:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            parser.error(f"expected NAME=DIR, got {item!r}")
        targets[name] = Path(folder).absolute()
    model_dir = args.model.absolute()
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16)
    for name, out in targets.items():
        print(f"      creating adapter {name!r} in {out}", file=sys.stderr, flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        make_adapter(base, model_dir, name, out, args.noise)
    print(json.dumps({"adapters": {name: str(out) for name, out in targets.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
