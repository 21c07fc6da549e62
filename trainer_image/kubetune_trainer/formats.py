"""Records -> samples: which format a dataset is in, which columns hold what, and one sample per record.

A `Mapping` is decided once per dataset from its first record (format and `fields`, with the
common column names tried where `fields` leaves an entry unset); `parse()` then turns each
record into a `Sample` in one canonical shape, or says why it is invalid (a missing cell, an
empty response: counted, and refused above `maxInvalidFraction`). What no setting of the data
can fix (a column that is not there, a role nobody mapped) is a refusal that names the columns
or keys found, the format expected, and the `fields` setting that fixes it.

Column names match exactly first, then ignoring case and the separators ` _-.` (`Instruction`,
`Output`, `chosen_response` does not match `chosen`); two columns that match one name that way are
refused with both named. The mapping names the columns used (preflight shows it).

Chat messages may carry OpenAI's `weight` (0: the turn is context, not learned), assistant
`tool_calls` (rendered by the chat template and learned), and `tool` results (never learned); a
record's `tools` column goes to the chat template.

Preference records (format `preference`, the only one `objective: dpo` reads) come as TRL names them:
an explicit `prompt` with `chosen` and `rejected` (strings, or message lists: conversational), or
`chosen` and `rejected` alone whose common beginning is the prompt (implicit: whole transcripts,
HH-RLHF's "\n\nHuman: ... \n\nAssistant:" text, or message lists that repeat the prompt turns).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kubetune.api.models import DEFAULT_ROLES, FIELD_ALIASES, FieldMapping

from kubetune_trainer.records import Where, refuse

# Columns each format needs (and may use), by `fields` key.
REQUIRED: dict[str, tuple[str, ...]] = {
    "chat": ("messages",),
    "preference": ("chosen", "rejected"),
    "instruction": ("instruction", "response"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
OPTIONAL: dict[str, tuple[str, ...]] = {"instruction": ("input",), "preference": ("prompt",)}
DETECT_ORDER = ("chat", "preference", "instruction", "prompt_completion", "text")
TOOL_ROLES = {
    "tool": "tool",
    "ipython": "tool",
    "function": "tool",
}  # results of a tool call: context, never learned
TOOLS_COLUMN = ("tools",)
_SEPARATORS = re.compile(r"[\s_\-.]+")


@dataclass(frozen=True)
class Turn:
    """One message: its role (system, user, assistant or tool), text, whether it is learned (OpenAI's
    `weight`), and what else the chat template reads (tool_calls, name, tool_call_id)."""

    role: str
    content: str
    learn: bool = True
    extra: tuple[tuple[str, Any], ...] = ()

    def message(self) -> dict[str, Any]:
        return {"role": self.role, "content": self.content, **dict(self.extra)}

    @property
    def tool_calls(self) -> list[Any]:
        return list(dict(self.extra).get("tool_calls") or [])


@dataclass(frozen=True)
class Sample:
    """One record in canonical form.

    chat: `messages`, and `tools` when the record has them. instruction: `prompt` (instruction + input)
    and `response`. prompt_completion: `prompt` and `response` (the completion). text: `text`.
    preference: text pairs in `prompt`, `response` (chosen) and `rejected`; conversational pairs in
    `messages` (the prompt turns), `chosen_turns` and `rejected_turns`.
    """

    kind: str
    messages: tuple[Turn, ...] = ()
    prompt: str = ""
    response: str = ""
    rejected: str = ""
    text: str = ""
    chosen_turns: tuple[Turn, ...] = ()
    rejected_turns: tuple[Turn, ...] = ()
    tools: tuple[Any, ...] | None = None

    @property
    def conversational(self) -> bool:
        return bool(self.messages or self.chosen_turns)


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


def _norm(name: str) -> str:
    return _SEPARATORS.sub("", name).lower()


def _match(record: dict[str, Any], names: tuple[str, ...], where: Where, what: str) -> str | None:
    """The column named by one of `names`: exactly, else the one column equal to one of them up to case and
    separators. Two such columns are refused, both named."""
    exact = next((name for name in names if name in record), None)
    if exact is not None:
        return exact
    wanted = {_norm(n) for n in names}
    hits = [c for c in record if isinstance(c, str) and _norm(c) in wanted]
    if len(hits) > 1:
        raise refuse(
            f"{where}: columns {hits} could each be {what} ({' or '.join(repr(n) for n in names)}); set spec.dataset.fields.{what} to the one to use"
        )
    return hits[0] if hits else None


def _find(record: dict[str, Any], key: str, fields: FieldMapping, where: Where) -> str | None:
    return _match(record, fields.names(key), where, key)


def _options(key: str, fields: FieldMapping) -> str:
    names = fields.names(key)
    return " or ".join(f"'{n}'" for n in names)


def _fix(key: str, columns: list[str], used: set[str]) -> str:
    spare = [c for c in columns if c not in used]
    if len(spare) == 1:
        return f"set spec.dataset.fields.{key}: {spare[0]}"
    return f"set spec.dataset.fields.{key} to the column that holds it" + (
        f" (one of {', '.join(spare)})" if spare else ""
    )


def _mismatch(
    where: Where,
    fmt: str,
    record: dict[str, Any],
    fields: FieldMapping,
    missing: list[str],
    found: dict[str, str],
) -> Exception:
    columns = sorted(record)
    need = ", ".join(f"{k} ({_options(k, fields)})" for k in missing)
    fixes = "; ".join(_fix(k, columns, set(found.values())) for k in missing)
    return refuse(f"{where}: format {fmt} needs {need} but the record has columns {columns}; {fixes}")


def resolve(record: Any, where: Where, fmt: str, fields: FieldMapping, objective: str = "sft") -> Mapping:
    """The mapping for a dataset whose first record is `record` (format `auto` detects it; under objective
    dpo only preference pairs are read)."""
    if not isinstance(record, dict):
        raise refuse(
            f"{where}: a record must be an object with named columns, not {type(record).__name__} {str(record)[:60]}"
        )
    if objective == "dpo" and fmt not in ("auto", "preference"):
        raise refuse(
            f"objective dpo reads preference pairs (format preference: chosen, rejected and an optional prompt), not format {fmt}; set spec.dataset.format: preference (or auto)"
        )
    if fmt == "auto":
        fmt = _detect(record, where, fields, objective)
    if fmt not in REQUIRED:
        raise refuse(f"unknown dataset format {fmt}; use one of auto, {', '.join(REQUIRED)}")
    columns = _columns(record, where, fmt, fields)
    if fmt not in ("chat", "preference"):
        return Mapping(fmt, columns)
    tools = _match(record, TOOLS_COLUMN, where, "tools")
    if tools is not None:
        columns["tools"] = tools
    if fmt == "chat":
        messages = _messages(record[columns["messages"]], where, columns["messages"])
        columns.update(_message_keys(messages, where, columns["messages"], fields))
    return Mapping(fmt, columns, {**DEFAULT_ROLES, **fields.roles})


def _columns(record: dict[str, Any], where: Where, fmt: str, fields: FieldMapping) -> dict[str, str]:
    """The column of each key format `fmt` requires (refused, with the fix, when one is missing) and of
    each optional key the record has."""
    columns: dict[str, str] = {}
    missing = []
    for key in REQUIRED[fmt]:
        name = _find(record, key, fields, where)
        if name is None:
            missing.append(key)
        else:
            columns[key] = name
    if missing:
        raise _mismatch(where, fmt, record, fields, missing, columns)
    for key in OPTIONAL.get(fmt, ()):
        name = _find(record, key, fields, where)
        if name is not None:
            columns[key] = name
    return columns


def _detect(record: dict[str, Any], where: Where, fields: FieldMapping, objective: str) -> str:
    """format auto: the first format whose required columns the record has (under objective dpo: preference only)."""
    order = ("preference",) if objective == "dpo" else DETECT_ORDER
    for candidate in order:
        if all(_find(record, k, fields, where) for k in REQUIRED[candidate]):
            return candidate
    if objective == "dpo":
        raise refuse(
            f"{where}: objective dpo needs preference pairs: {_options('chosen', fields)} and {_options('rejected', fields)} "
            f"(strings or message lists), with an optional {_options('prompt', fields)}, but the record has columns {sorted(record)}; "
            "map yours with spec.dataset.fields.chosen / rejected / prompt"
        )
    expected = "; ".join(
        f"{f}: " + " + ".join(_options(k, fields) for k in REQUIRED[f]) for f in DETECT_ORDER
    )
    raise refuse(
        f"{where}: cannot detect the dataset format from columns {sorted(record)}; expected one of {expected}. "
        "Set spec.dataset.format and map your columns with spec.dataset.fields (e.g. fields.response: <column>)"
    )


def _messages(value: Any, where: Where, column: str) -> list[Any]:
    if isinstance(value, str):  # a conversation stored as JSON text (CSV cells)
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise refuse(
                f"{where}: column '{column}' holds text that is not a JSON list of messages: {exc.msg}"
            ) from exc
    if not isinstance(value, list):
        raise refuse(
            f"{where}: column '{column}' must be a list of messages, not {type(value).__name__}; set spec.dataset.fields.messages to the column with the conversation"
        )
    return value


def _message_keys(messages: list[Any], where: Where, column: str, fields: FieldMapping) -> dict[str, str]:
    first = next((m for m in messages if isinstance(m, dict)), None)
    if first is None:
        raise refuse(f"{where}: the messages in '{column}' are not objects with a role and a text")
    found = {key: _find(first, key, fields, where) for key in ("role", "content")}
    if (
        found["content"] is None
        and found["role"] is not None
        and any(isinstance(m, dict) and m.get("tool_calls") for m in messages)
    ):
        found["content"] = fields.names("content")[
            0
        ]  # a tool call without text: the key is absent from that message only
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
    return (
        value
        if isinstance(value, str)
        else json.dumps(value)
        if isinstance(value, dict | list)
        else str(value)
    )


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
        raise refuse(
            f"{where}: a record must be an object with named columns, not {type(record).__name__} {str(record)[:60]}"
        )
    c, fmt = mapping.columns, mapping.format
    if fmt == "chat":
        if c["messages"] not in record or record[c["messages"]] is None:
            raise Invalid("missing cell", f"{where}: no value in column '{c['messages']}' (messages)")
        turns = _turns(_messages(record[c["messages"]], where, c["messages"]), where, mapping, c)
        return Sample("chat", messages=turns, tools=_tools(record, where, mapping))
    if fmt == "instruction":
        instruction = _cell(record, c["instruction"], "instruction", where)
        extra = record.get(c["input"]) if "input" in c else None
        prompt = f"{instruction}\n\n{_text(extra)}" if extra not in (None, "") else instruction
        return Sample(
            "instruction",
            prompt=prompt,
            response=_cell(record, c["response"], "response", where, learned=True),
        )
    if fmt == "prompt_completion":
        return Sample("prompt_completion", prompt=_cell(record, c["prompt"], "prompt", where),
                      response=_cell(record, c["completion"], "completion", where, learned=True))  # fmt: skip
    if fmt == "text":
        return Sample("text", text=_cell(record, c["text"], "text", where, learned=True))
    if fmt == "preference":
        return _preference(record, where, mapping)
    raise refuse(f"unknown dataset format {fmt}")


def _tools(record: dict[str, Any], where: Where, mapping: Mapping) -> tuple[Any, ...] | None:
    """The record's tool definitions for the chat template (a list, or a JSON list stored as text)."""
    column = mapping.columns.get("tools")
    value = record.get(column) if column else None
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise refuse(
                f"{where}: column '{column}' holds text that is not a JSON list of tool definitions: {exc.msg}"
            ) from exc
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise refuse(
            f"{where}: column '{column}' must be a list of tool definitions (objects), not {type(value).__name__}"
        )
    return tuple(value)


def _tool_calls(message: dict[str, Any], where: Where, i: int) -> list[dict[str, Any]]:
    """An assistant message's tool calls as chat templates read them: {"type": "function", "function": {"name",
    "arguments" (an object)}}; OpenAI's JSON-text arguments and its older `function_call` are converted."""
    calls = message.get("tool_calls")
    if calls is None and isinstance(message.get("function_call"), dict):
        calls = [{"type": "function", "function": message["function_call"]}]
    if calls is None or calls == []:
        return []
    if isinstance(calls, str):
        try:
            calls = json.loads(calls)
        except json.JSONDecodeError as exc:
            raise refuse(f"{where}: message {i} has tool_calls that are not a JSON list: {exc.msg}") from exc
    if not isinstance(calls, list):
        raise refuse(f"{where}: message {i} has tool_calls that are not a list of calls")
    out = []
    for call in calls:
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise refuse(f"{where}: message {i} has a tool call without a function name: {str(call)[:80]}")
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError:
                pass  # kept as text: the template shows it as written
        out.append({**({"id": call["id"]} if isinstance(call, dict) and "id" in call else {}), "type": "function",
                    "function": {"name": function["name"], "arguments": arguments}})  # fmt: skip
    return out


def _weight(message: dict[str, Any], where: Where, i: int) -> bool:
    """OpenAI's per-message `weight`: 1 (or absent) learns an assistant turn, 0 keeps it as context only."""
    if "weight" not in message or message["weight"] is None:
        return True
    weight = message["weight"]
    if isinstance(weight, bool) or weight in (0, 1):
        return bool(weight)
    raise refuse(f"{where}: message {i} has weight {weight!r}; weight is 0 (not learned) or 1 (learned)")


def _turns(
    messages: list[Any], where: Where, mapping: Mapping, keys: dict[str, str], need_assistant: bool = True
) -> tuple[Turn, ...]:
    turns = tuple(_turn(message, i, where, mapping, keys) for i, message in enumerate(messages))
    if need_assistant and not any(t.role == "assistant" and t.learn for t in turns):
        weighted = any(t.role == "assistant" for t in turns)
        raise Invalid(
            "no assistant turn",
            f"{where}: no assistant message to learn from"
            + (" (every one has weight 0)" if weighted else ""),
        )
    return turns


def _turn(message: Any, i: int, where: Where, mapping: Mapping, keys: dict[str, str]) -> Turn:
    """Message `i` as a Turn: its mapped role, text and weight, an assistant's tool calls, a tool result's name and id."""
    content_key = keys["content"]
    raw, role = _role(message, i, where, mapping, keys["role"])
    learn = _weight(message, where, i)
    content = message.get(content_key)
    extra: list[tuple[str, Any]] = []
    if role == "assistant":
        calls = _tool_calls(message, where, i)
        if calls:
            extra.append(("tool_calls", calls))
        elif learn and (content is None or not _text(content).strip()):
            raise Invalid(
                "empty response",
                f"{where}: message {i} ({raw}) has an empty or null '{content_key}' and no tool_calls",
            )
    elif role == "tool":
        extra += [(k, message[k]) for k in ("name", "tool_call_id") if message.get(k) is not None]
    if content is None and not extra and role != "assistant":
        raise Invalid("missing cell", f"{where}: message {i} ({raw}) has no '{content_key}'")
    return Turn(role, "" if content is None else _text(content), learn, tuple(extra))


def _role(message: Any, i: int, where: Where, mapping: Mapping, role_key: str) -> tuple[str, str]:
    """(the role as written, the role it maps to); a message without one, or with one nobody mapped, is refused."""
    if not isinstance(message, dict) or role_key not in message:
        found = sorted(message) if isinstance(message, dict) else type(message).__name__
        raise refuse(
            f"{where}: message {i} has no '{role_key}' key (it has {found}); set spec.dataset.fields.role to the key that holds the role"
        )
    raw = str(message[role_key])
    role = mapping.roles.get(raw) or mapping.roles.get(raw.lower()) or TOOL_ROLES.get(raw.lower())
    if role is None:
        known = ", ".join(f"{k}->{v}" for k, v in mapping.roles.items())
        raise refuse(
            f"{where}: message {i} has role '{raw}', which is not mapped (known: {known}, and tool for tool results); "
            f"add it to spec.dataset.fields.roles, e.g. roles: {{{raw}: assistant}}"
        )
    return raw, role


# ------------------------------------------------------------------- preference pairs


def _as_messages(value: Any) -> list[dict[str, Any]] | None:
    """A message list (or one stored as JSON text) in a preference cell; None for plain text."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        return value
    return None


def implicit_prompt(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) of two texts that share their beginning, as TRL's extract_prompt cuts them:
    at the first differing character, the space before it left to the replies."""
    n, limit = 0, min(len(chosen), len(rejected))
    while n < limit and chosen[n] == rejected[n]:
        n += 1
    if 0 < n < limit and chosen[n - 1] == " ":
        n -= 1
    return chosen[:n], chosen[n:], rejected[n:]


def _common(a: tuple[Turn, ...], b: tuple[Turn, ...]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _preference(record: dict[str, Any], where: Where, mapping: Mapping) -> Sample:
    c = mapping.columns
    chosen_raw = record.get(c["chosen"])
    rejected_raw = record.get(c["rejected"])
    prompt_raw = record.get(c["prompt"]) if "prompt" in c else None
    for column, value in ((c["chosen"], chosen_raw), (c["rejected"], rejected_raw)):
        if value is None:
            raise Invalid("missing cell", f"{where}: no value in column '{column}'")
    as_lists = {
        name: _as_messages(v)
        for name, v in (("prompt", prompt_raw), ("chosen", chosen_raw), ("rejected", rejected_raw))
    }
    if not any(v is not None for v in as_lists.values()):
        return _text_pair(record, where, c, prompt_raw, chosen_raw, rejected_raw)
    turns = _cell_reader(as_lists, where, mapping)
    chosen, rejected = turns("chosen", chosen_raw, "assistant"), turns("rejected", rejected_raw, "assistant")
    shared = _common(chosen, rejected)
    given = None if prompt_raw is None or prompt_raw == "" else turns("prompt", prompt_raw, "user")
    prompt = _pair_prompt(chosen[:shared], given, where)
    chosen, rejected = chosen[shared:], rejected[shared:]
    for name, part in (("chosen", chosen), ("rejected", rejected)):
        if not any(t.role == "assistant" and (t.content.strip() or t.tool_calls) for t in part):
            raise Invalid("empty response", f"{where}: {name} has no assistant reply after the prompt")
    if chosen == rejected:
        raise Invalid("chosen equals rejected", f"{where}: chosen and rejected are the same")
    return Sample(
        "preference",
        messages=prompt,
        chosen_turns=chosen,
        rejected_turns=rejected,
        tools=_tools(record, where, mapping),
    )


def _cell_reader(
    as_lists: dict[str, list[dict[str, Any]] | None], where: Where, mapping: Mapping
) -> Callable[[str, Any, str], tuple[Turn, ...]]:
    """How a conversational pair's cells read as turns: a message list by the chat rules (its keys taken from
    the first message of any cell), a plain text as one turn of the given role."""
    c = mapping.columns
    first = next(m[0] for m in as_lists.values() if m is not None)
    keys = _message_keys(
        [first], where, next(c[k] for k, m in as_lists.items() if m is not None), FieldMapping()
    )
    mapping_chat = Mapping("chat", c, mapping.roles)

    def turns(name: str, value: Any, role: str) -> tuple[Turn, ...]:
        listed = as_lists[name]
        if listed is None:
            return (Turn(role, _text(value)),)
        return _turns(listed, where, mapping_chat, keys, need_assistant=False)

    return turns


def _pair_prompt(common: tuple[Turn, ...], given: tuple[Turn, ...] | None, where: Where) -> tuple[Turn, ...]:
    """The prompt turns of a conversational pair: the prompt column's (`given`) followed by the first turns chosen
    and rejected share (`common`), or those shared turns alone when there is no prompt column."""
    if given is None:
        if not common:
            raise Invalid(
                "no shared prompt",
                f"{where}: chosen and rejected share no first turns (the prompt) and the record has no prompt column",
            )
        return common
    # UltraFeedback's shape: chosen and rejected repeat the prompt's turns; they are not scored twice
    repeated = len(common) >= len(given) and [(t.role, t.content) for t in common[-len(given) :]] == [
        (t.role, t.content) for t in given
    ]
    return common if repeated else given + common


def _text_pair(
    record: dict[str, Any],
    where: Where,
    c: dict[str, str],
    prompt_raw: Any,
    chosen_raw: Any,
    rejected_raw: Any,
) -> Sample:
    chosen, rejected = _text(chosen_raw), _text(rejected_raw)
    if "prompt" in c and prompt_raw is not None:
        prompt = _text(prompt_raw)
    else:
        prompt, chosen, rejected = implicit_prompt(chosen, rejected)
        if not prompt:
            raise Invalid(
                "no shared prompt",
                f"{where}: chosen and rejected share no beginning (the prompt) and the record has no prompt column",
            )
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            raise Invalid(
                "empty response",
                f"{where}: {name} is empty" + ("" if "prompt" in c else " after the prompt both share"),
            )
    if chosen == rejected:
        raise Invalid("chosen equals rejected", f"{where}: chosen and rejected are the same text")
    return Sample("preference", prompt=prompt, response=chosen, rejected=rejected)


def aliases_table() -> dict[str, tuple[str, ...]]:
    """`fields` key -> the column names tried when it is unset (for docs and preflight)."""
    return dict(FIELD_ALIASES)
