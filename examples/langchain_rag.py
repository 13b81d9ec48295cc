"""A LangChain chain that uses Sluice as its model: retrieval happens in the gateway, not in the chain.

Start a gateway (`make demo`, which prints an API key), then:

    SLUICE_API_KEY=sk-... .venv/bin/python examples/langchain_rag.py "How do I create an API key?"

With a RAG route configured (`rag.routes`, docs/rag.md) the chain asks it, and prints the sources the
gateway grounded the answer on (the `X-Sluice-Sources` header); otherwise it asks the first model served.
Options: `--url` (default $SLUICE_URL or http://127.0.0.1:8080), `--model` (default $SLUICE_MODEL, else
`docs-assistant` if `/v1/models` lists it, else the first model listed), `--stream`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_openai import ChatOpenAI
from openai import OpenAI
from pydantic import SecretStr

RAG_MODEL = "docs-assistant"


def pick_model(client: OpenAI) -> str:
    """`docs-assistant` (the RAG route of docs/rag.md's example) if the gateway serves it, else the first model."""
    models = [model.id for model in client.models.list()]
    if not models:
        sys.exit("the gateway serves no model right now")
    return RAG_MODEL if RAG_MODEL in models else models[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("question", nargs="?", default="How do I create an API key?")
    parser.add_argument("--url", default=os.environ.get("SLUICE_URL", "http://127.0.0.1:8080"))
    parser.add_argument("--model", default=os.environ.get("SLUICE_MODEL"))
    parser.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    args = parser.parse_args()
    key = os.environ.get("SLUICE_API_KEY")
    if not key:
        sys.exit("set SLUICE_API_KEY to the key `make demo` printed")
    base_url = args.url.rstrip("/") + "/v1"
    model = args.model or pick_model(OpenAI(base_url=base_url, api_key=key))

    llm = ChatOpenAI(
        base_url=base_url, api_key=SecretStr(key), model=model, temperature=0, max_tokens=200,
        include_response_headers=True,  # to read X-Sluice-Grounded and X-Sluice-Sources
    )  # fmt: skip
    prompt = ChatPromptTemplate.from_messages([("system", "Answer in two sentences at most."), ("user", "{question}")])
    print(f"model: {model}\n")
    if args.stream:
        for part in (prompt | llm | StrOutputParser()).stream({"question": args.question}):
            print(part, end="", flush=True)
        print()
        return
    message = (prompt | llm).invoke({"question": args.question})
    print(StrOutputParser().invoke(message))
    headers = message.response_metadata.get("headers", {})
    grounded = headers.get("x-sluice-grounded")
    if grounded is not None:
        print(f"\ngrounded: {grounded}")
        for n, source in enumerate(json.loads(headers.get("x-sluice-sources", "[]")), 1):
            where = f"{source['source']}, chunk {source['chunk_index']}, score {source['score']}"
            print(f"  [{n}] {source['title']} ({where})")


if __name__ == "__main__":
    main()
