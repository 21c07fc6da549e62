"""Records -> samples: which format a dataset is in, which columns hold what, and one sample per record.

A `Mapping` is decided once per dataset from its first record (format and `fields`, with the
common column names tried where `fields` leaves an entry unset); `parse()` then turns each
record into a `Sample` in one canonical shape, or says why it is invalid (a missing cell, an
empty response: counted, and refused above `maxInvalidFraction`). What no setting of the data
can fix (a column that is not there, a role nobody mapped) is a refusal that names the columns
or keys found, the format expected, and the `fields` setting that fixes it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from kubetune.api.models import DEFAULT_ROLES, FIELD_ALIASES, FieldMapping

from kubetune_trainer.records import Where, refuse

# Columns each format needs (and may use), by `fields` key.
REQUIRED: dict[str, tuple[str, ...]] = {
    "chat": ("messages",),
    "preference": ("prompt", "chosen", "rejected"),
    "instruction": ("instruction", "response"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
OPTIONAL: dict[str, tuple[str, ...]] = {"instruction": ("input",)}
DETECT_ORDER = ("chat", "preference", "instruction", "prompt_completion", "text")


@dataclass(frozen=True)
class Sample:
    """One record in canonical form.

    chat: `messages` (roles system/user/assistant). instruction: `prompt` (instruction + input) and
    `response`. prompt_completion: `prompt` and `response` (the completion). text: `text`.
    preference: `prompt` (or `messages` when the prompt is a conversation), `response` (chosen) and `rejected`.
    """

    kind: str
    messages: tuple[tuple[str, str], ...] = ()
    prompt: str = ""
    response: str = ""
    rejected: str = ""
    text: str = ""


@dataclass(frozen=True)
class Mapping:
    """The format of a dataset and the column (or message key) used for each `fields` key."""

    format: str
    columns: dict[str, str]
    roles: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        cols = ", ".join(f"{k}={v}" for k, v in self.columns.items())
        roles = ", ".join(f"{k}->{v}" for k, v in self.roles.items() if DEFAULT_ROLES.get(k) != v)
        return f"{self.format} ({cols}" + (f"; roles {roles})" if roles else ")")


class Invalid(Exception):
    """A record the dataset may skip: a missing cell, an empty or null response, nothing to learn."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _find(record: dict[str, Any], key: str, fields: FieldMapping) -> str | None:
    return next((name for name in fields.names(key) if name in record), None)


def _options(key: str, fields: FieldMapping) -> str:
    names = fields.names(key)
    return " or ".join(f"'{n}'" for n in names)


def _fix(key: str, columns: list[str], used: set[str]) -> str:
    spare = [c for c in columns if c not in used]
    if len(spare) == 1:
        return f"set spec.dataset.fields.{key}: {spare[0]}"
    return f"set spec.dataset.fields.{key} to the column that holds it" + (f" (one of {', '.join(spare)})" if spare else "")


def _mismatch(where: Where, fmt: str, record: dict[str, Any], fields: FieldMapping, missing: list[str], found: dict[str, str]) -> Exception:
    columns = sorted(record)
    need = ", ".join(f"{k} ({_options(k, fields)})" for k in missing)
    fixes = "; ".join(_fix(k, columns, set(found.values())) for k in missing)
    return refuse(f"{where}: format {fmt} needs {need} but the record has columns {columns}; {fixes}")


def resolve(record: Any, where: Where, fmt: str, fields: FieldMapping) -> Mapping:
    """The mapping for a dataset whose first record is `record` (format `auto` detects it)."""
    if not isinstance(record, dict):
        raise refuse(f"{where}: a record must be an object with named columns, not {type(record).__name__} {str(record)[:60]}")
    if fmt == "auto":
        for candidate in DETECT_ORDER:
            if all(_find(record, k, fields) for k in REQUIRED[candidate]):
                fmt = candidate
                break
        else:
            expected = "; ".join(f"{f}: " + " + ".join(_options(k, fields) for k in REQUIRED[f]) for f in DETECT_ORDER)
            raise refuse(
                f"{where}: cannot detect the dataset format from columns {sorted(record)}; expected one of {expected}. "
                "Set spec.dataset.format and map your columns with spec.dataset.fields (e.g. fields.response: <column>)"
            )
    if fmt not in REQUIRED:
        raise refuse(f"unknown dataset format {fmt}; use one of auto, {', '.join(REQUIRED)}")
    columns: dict[str, str] = {}
    missing = []
    for key in REQUIRED[fmt]:
        name = _find(record, key, fields)
        if name is None:
            missing.append(key)
        else:
            columns[key] = name
    if missing:
        raise _mismatch(where, fmt, record, fields, missing, columns)
    for key in OPTIONAL.get(fmt, ()):
        name = _find(record, key, fields)
        if name is not None:
            columns[key] = name
    roles: dict[str, str] = {}
    if fmt == "chat":
        columns.update(_message_keys(_messages(record[columns["messages"]], where, columns["messages"]), where, columns["messages"], fields))
        roles = {**DEFAULT_ROLES, **fields.roles}
    return Mapping(fmt, columns, roles)


def _messages(value: Any, where: Where, column: str) -> list[Any]:
    if isinstance(value, str):  # a conversation stored as JSON text (CSV cells)
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise refuse(f"{where}: column '{column}' holds text that is not a JSON list of messages: {exc.msg}") from exc
    if not isinstance(value, list):
        raise refuse(f"{where}: column '{column}' must be a list of messages, not {type(value).__name__}; set spec.dataset.fields.messages to the column with the conversation")
    return value


def _message_keys(messages: list[Any], where: Where, column: str, fields: FieldMapping) -> dict[str, str]:
    first = next((m for m in messages if isinstance(m, dict)), None)
    if first is None:
        raise refuse(f"{where}: the messages in '{column}' are not objects with a role and a text")
    found = {key: _find(first, key, fields) for key in ("role", "content")}
    for key, name in found.items():
        if name is None:
            raise refuse(
                f"{where}: messages in '{column}' have keys {sorted(first)}, none of them {_options(key, fields)}; "
                f"{_fix(key, sorted(first), {n for n in found.values() if n})}"
            )
    return {k: v for k, v in found.items() if v}


def _text(value: Any) -> str:
    """A cell or message content as text; OpenAI-style content parts are joined."""
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        return "".join(str(p.get("text", "")) for p in value)
    return value if isinstance(value, str) else json.dumps(value) if isinstance(value, dict | list) else str(value)


def _cell(record: dict[str, Any], column: str, what: str, where: Where, learned: bool = False) -> str:
    if column not in record or record[column] is None:
        raise Invalid("missing cell", f"{where}: no value in column '{column}' ({what})")
    value = _text(record[column])
    if learned and not value.strip():
        raise Invalid("empty response", f"{where}: column '{column}' ({what}) is empty")
    return value


def parse(record: Any, where: Where, mapping: Mapping) -> Sample:
    """The sample in `record`; raises Invalid for what may be skipped and TrainerError for what cannot."""
    if not isinstance(record, dict):
        raise refuse(f"{where}: a record must be an object with named columns, not {type(record).__name__} {str(record)[:60]}")
    c, fmt = mapping.columns, mapping.format
    if fmt == "chat":
        if c["messages"] not in record or record[c["messages"]] is None:
            raise Invalid("missing cell", f"{where}: no value in column '{c['messages']}' (messages)")
        return Sample("chat", messages=_turns(_messages(record[c["messages"]], where, c["messages"]), where, mapping))
    if fmt == "instruction":
        instruction = _cell(record, c["instruction"], "instruction", where)
        extra = record.get(c["input"]) if "input" in c else None
        prompt = f"{instruction}\n\n{_text(extra)}" if extra not in (None, "") else instruction
        return Sample("instruction", prompt=prompt, response=_cell(record, c["response"], "response", where, learned=True))
    if fmt == "prompt_completion":
        return Sample("prompt_completion", prompt=_cell(record, c["prompt"], "prompt", where),
                      response=_cell(record, c["completion"], "completion", where, learned=True))  # fmt: skip
    if fmt == "text":
        return Sample("text", text=_cell(record, c["text"], "text", where, learned=True))
    if fmt == "preference":
        conversation = record.get(c["prompt"])
        messages: tuple[tuple[str, str], ...] = ()
        if isinstance(conversation, list):  # the prompt as a conversation
            chat = Mapping("chat", {"messages": c["prompt"], **_message_keys(conversation, where, c["prompt"], FieldMapping())}, {**DEFAULT_ROLES})
            messages, prompt_text = _turns(conversation, where, chat, need_assistant=False), ""
        else:
            prompt_text = _cell(record, c["prompt"], "prompt", where)
        chosen = _cell(record, c["chosen"], "chosen", where, learned=True)
        rejected = _cell(record, c["rejected"], "rejected", where, learned=True)
        if chosen == rejected:
            raise Invalid("chosen equals rejected", f"{where}: chosen and rejected are the same text")
        return Sample("preference", messages=messages, prompt=prompt_text, response=chosen, rejected=rejected)
    raise refuse(f"unknown dataset format {fmt}")


def _turns(messages: list[Any], where: Where, mapping: Mapping, need_assistant: bool = True) -> tuple[tuple[str, str], ...]:
    role_key, content_key = mapping.columns["role"], mapping.columns["content"]
    turns = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or role_key not in message:
            keys = sorted(message) if isinstance(message, dict) else type(message).__name__
            raise refuse(f"{where}: message {i} has no '{role_key}' key (it has {keys}); set spec.dataset.fields.role to the key that holds the role")
        raw = str(message[role_key])
        role = mapping.roles.get(raw)
        if role is None:
            known = ", ".join(f"{k}->{v}" for k, v in mapping.roles.items())
            raise refuse(
                f"{where}: message {i} has role '{raw}', which is not mapped (known: {known}); "
                f"add it to spec.dataset.fields.roles, e.g. roles: {{{raw}: assistant}}"
            )
        content = message.get(content_key)
        if role == "assistant" and (content is None or not _text(content).strip()):
            raise Invalid("empty response", f"{where}: message {i} ({raw}) has an empty or null '{content_key}'")
        if content is None:
            raise Invalid("missing cell", f"{where}: message {i} ({raw}) has no '{content_key}'")
        turns.append((role, _text(content)))
    if need_assistant and not any(role == "assistant" for role, _ in turns):
        raise Invalid("no assistant turn", f"{where}: no assistant message to learn from")
    return tuple(turns)


def aliases_table() -> dict[str, tuple[str, ...]]:
    """`fields` key -> the column names tried when it is unset (for docs and preflight)."""
    return dict(FIELD_ALIASES)
