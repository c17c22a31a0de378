"""Every surface of the gateway that names a model, and every model list: one table for the tests of model
access, so a surface added later is added once."""

import httpx


def model_calls(model: str) -> list[tuple[str, dict]]:
    """(path, JSON body) of each POST that asks for `model`."""
    return [
        ("/chat", {"model": model, "messages": []}),
        ("/api/chat", {"model": model, "messages": []}),
        ("/api/generate", {"model": model, "prompt": "x"}),
        ("/api/embed", {"model": model, "input": "x"}),
        ("/api/embeddings", {"model": model, "prompt": "x"}),
        ("/api/show", {"model": model}),
        ("/v1/chat/completions", {"model": model, "messages": []}),
        ("/v1/completions", {"model": model, "prompt": "x"}),
        ("/v1/embeddings", {"model": model, "input": "x"}),
        ("/v1/responses", {"model": model, "input": "x"}),
    ]


# (path, the answer's list field, the key naming each model)
MODEL_LISTS = [
    ("/models", "models", "name"),
    ("/api/tags", "models", "name"),
    ("/api/ps", "models", "name"),
    ("/v1/models", "data", "id"),
]


def error_message(response: httpx.Response) -> str:
    """The message of an error in either surface's shape: Ollama's flat one or OpenAI's nested one."""
    error = response.json()["error"]
    return error["message"] if isinstance(error, dict) else error
