"""Structured output: a JSON Schema sent as the OpenAI ``response_format`` and replies validated against it.

The request field (OpenAI "Structured Outputs", the same shape SGLang, vLLM and llama.cpp's server accept)::

    "response_format": {"type": "json_schema",
                        "json_schema": {"name": <schema "title" or "output">, "schema": <schema>, "strict": true}}

Servers that constrain decoding by the schema (all three do) can still return a reply that does not validate:
cut off by ``max_tokens``, or a schema feature the grammar engine ignores. Such a reply is re-asked (the
"reask" of instructor: the same prompt followed by the validation error) up to
``generation.response_format_attempts`` times in all; then the row gets ``gen_status = "invalid_output"``,
the raw reply in ``generation`` and the validation error in ``gen_error``.

Validation: ``json.loads`` then the schema's own JSON Schema draft (``jsonschema.validators.validator_for``;
Draft 2020-12 when the schema names none).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError

log = logging.getLogger(__name__)

REASK = (
    "\n\nYour previous reply was not valid JSON for the required schema ({error}). "
    "Reply again with only a JSON value that matches the schema."
)
"""Appended to the prompt when a reply is re-asked (``{error}``: the validation error, shortened)."""


BUNDLED_SCHEMAS = ("configs/schemas/label.json",)
"""JSON Schemas shipped with the package, usable by these names from any directory (:func:`load_schema`)."""


def load_schema(path: str | Path) -> dict[str, Any]:
    """Read and check a JSON Schema file.

    ``path`` is the user's file when it exists (absolute, or relative to the current directory), else the bundled
    copy of a ``configs/...`` name such as ``configs/schemas/label.json``
    (:func:`pipeline.resources.resolve_bundled`), so a bundled schema works after ``pip install`` from anywhere.

    Raises:
        pipeline.errors.ConfigError: missing/unreadable file, invalid JSON (line and column), not an object,
            or not a valid JSON Schema (the schema path of the problem).
    """
    import jsonschema

    from pipeline.resources import resolve_bundled

    p = resolve_bundled(path)
    if p != Path(path).expanduser():
        log.debug("response_format %s: not found from here; using the bundled copy %s", path, p)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: cannot read response_format schema: {getattr(exc, 'strerror', None) or exc} "
                          f"(bundled schemas: {', '.join(BUNDLED_SCHEMAS)})") from None
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{p}:{exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(schema, dict):
        raise ConfigError(f"{p}: a JSON Schema must be a JSON object")
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(x) for x in exc.absolute_path) or "(root)"
        raise ConfigError(f"{p}: not a valid JSON Schema at {where}: {exc.message}") from None
    return schema


@dataclass(frozen=True)
class StructuredOutput:
    """A loaded response format: the request field and the reply validator.

    Attributes:
        schema: the JSON Schema (dict).
        name: ``json_schema.name`` sent to the server (the schema's ``title``, else ``"output"``).
    """

    schema: dict[str, Any]
    name: str = "output"

    @classmethod
    def from_file(cls, path: str | Path) -> StructuredOutput:
        """Load and check ``path`` (see :func:`load_schema`)."""
        schema = load_schema(path)
        title = schema.get("title")
        name = "".join(c if c.isalnum() or c in "_-" else "_" for c in title)[:64] if isinstance(title, str) else ""
        return cls(schema, name or "output")

    def request_fields(self) -> dict[str, Any]:
        """The OpenAI ``response_format`` request field for this schema."""
        return {"response_format": {"type": "json_schema",
                                    "json_schema": {"name": self.name, "schema": self.schema, "strict": True}}}

    def parse(self, text: str) -> tuple[Any, str | None]:
        """``(value, None)`` if ``text`` is JSON that validates, else ``(None, error message)``."""
        import jsonschema

        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            return None, f"not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        cls = jsonschema.validators.validator_for(self.schema, default=jsonschema.Draft202012Validator)
        error = jsonschema.exceptions.best_match(cls(self.schema).iter_errors(value))
        if error is not None:
            where = "/".join(str(x) for x in error.absolute_path) or "(root)"
            return None, f"schema violation at {where}: {error.message[:300]}"
        return value, None


def dumps(value: Any) -> str:
    """The parsed object as the compact JSON string stored in the ``generation_json`` column."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
