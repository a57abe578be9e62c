"""Secrets never reach a log line: registered values are masked wherever they occur, and
values under secret-looking keys are masked at every nesting level.

:func:`register_secret` (or :func:`register_settings_secrets` for whole settings objects)
registers a value; :func:`scrub` masks registered values inside a string; :func:`redact`
masks a structure; :func:`redacted_settings` is the start-up line's view of the settings.
"""

from __future__ import annotations

import dataclasses
import re
import threading
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any, Final, cast

import orjson
from pydantic import BaseModel, SecretBytes, SecretStr

MASK: Final = "**********"
# Keys whose values are secrets whatever they hold: librdkafka's sasl.password,
# ssl.key.password, ssl.keystore.password, sasl.oauthbearer.client.secret, the settings'
# sasl_password / ssl_key_password, and the usual token / API key / credential names.
# "token" must be a whole final word: batch_tokens, max_batch_tokens and tokenizer are not.
SECRET_KEY_PATTERN: Final = re.compile(
    r"pass(word|wd|phrase)|secret|private[._-]?key|ssl\.key\.pem|sasl\.oauthbearer\.config"
    r"|(^|[._-])(token|access[._-]?token|api[._-]?key|credentials?)$",
    re.IGNORECASE,
)
# Deeper structures than this are rendered as (scrubbed) text instead of being walked.
MAX_REDACT_DEPTH: Final = 16


class _Secrets:
    """Registered secrets, in every form they can take in a line. Writers replace ``forms``
    under the lock and never mutate it, so readers on any thread need no lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.forms: tuple[str, ...] = ()


_secrets = _Secrets()


def _forms(secret: str) -> set[str]:
    """How a secret can appear in a line: raw, JSON-escaped, repr-escaped."""
    return {secret, orjson.dumps(secret).decode()[1:-1], repr(secret)[1:-1]}


def register_secret(value: str | SecretStr | SecretBytes | bytes | None) -> None:
    """Mask this value wherever it appears in any later log line. Empty values are ignored."""
    if isinstance(value, SecretStr | SecretBytes):
        value = value.get_secret_value()
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if not value:
        return
    with _secrets.lock:
        forms = set(_secrets.forms) | _forms(value)
        # Longest first, so a secret containing another one is masked whole.
        _secrets.forms = tuple(sorted(forms, key=len, reverse=True))


def clear_secrets() -> None:
    """Forget every registered secret (tests)."""
    with _secrets.lock:
        _secrets.forms = ()


def register_settings_secrets(*settings: object) -> None:
    """Register every secret in pydantic settings (or dataclasses of them): ``SecretStr`` /
    ``SecretBytes`` fields, and string values under secret-looking keys at any depth (such
    as ``consumer_config={"sasl.password": ...}``)."""
    for item in settings:
        _collect_secrets(item, key=None, depth=0)


def _collect_secrets(value: Any, key: str | None, depth: int) -> None:
    if depth > MAX_REDACT_DEPTH:
        return
    if isinstance(value, SecretStr | SecretBytes):
        register_secret(value)
    elif isinstance(value, str | bytes):
        if key is not None and SECRET_KEY_PATTERN.search(key):
            register_secret(value)
    else:
        for child_key, child in _children(value, key):
            _collect_secrets(child, child_key, depth + 1)


def _children(value: Any, key: str | None) -> Iterable[tuple[str | None, Any]]:
    """The (key, value) pairs inside a settings object, dataclass, mapping or collection;
    items of a collection inherit the key the collection sits under."""
    if isinstance(value, BaseModel):
        return [(name, getattr(value, name)) for name in type(value).model_fields]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [(field.name, getattr(value, field.name)) for field in dataclasses.fields(value)]
    if isinstance(value, Mapping):
        return [(str(item_key), item) for item_key, item in value.items()]
    if isinstance(value, list | tuple | set | frozenset):
        return [(key, item) for item in value]
    return []


def scrub(text: str) -> str:
    """Mask every registered secret occurring in ``text``."""
    for form in _secrets.forms:
        if form in text:
            text = text.replace(form, MASK)
    return text


def redact(value: Any, depth: int = 0) -> Any:
    """A copy of ``value`` with secrets masked: registered values inside strings, and the
    values of secret-looking keys in mappings at any depth. Pydantic models become dicts."""
    if isinstance(value, str):
        return scrub(value)
    if depth > MAX_REDACT_DEPTH:
        return scrub(str(value))
    if isinstance(value, SecretStr | SecretBytes):
        return MASK
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if isinstance(value, Mapping):
        return {key: _redact_item(key, item, depth + 1) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = [redact(item, depth + 1) for item in value]
        return tuple(items) if isinstance(value, tuple) else items
    return value


def _redact_item(key: Any, value: Any, depth: int) -> Any:
    if isinstance(key, str) and SECRET_KEY_PATTERN.search(key) and value not in (None, ""):
        return MASK
    return redact(value, depth)


def redact_event(
    logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: :func:`redact` applied to the whole event dict."""
    return cast(MutableMapping[str, Any], redact(event_dict))


def redacted_settings(*settings: object) -> dict[str, Any]:
    """Effective settings for the start-up line, secrets masked, one section per model.

    Accepts pydantic models (section name: the class name without ``Settings``, lower case)
    and dataclasses of models such as ``RunSettings`` (section name: the field name).
    """
    sections: dict[str, Any] = {}
    for item in settings:
        for name, model in _sections(item):
            sections[name] = redact(model.model_dump(mode="json"))
    return sections


def _sections(item: object) -> Iterable[tuple[str, BaseModel]]:
    if isinstance(item, BaseModel):
        name = type(item).__name__.removesuffix("Settings").lower() or "settings"
        yield name, item
    elif dataclasses.is_dataclass(item) and not isinstance(item, type):
        for field in dataclasses.fields(item):
            value = getattr(item, field.name)
            if isinstance(value, BaseModel):
                yield field.name, value
    else:
        raise TypeError(f"not a settings model: {type(item).__name__}")
