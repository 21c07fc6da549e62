"""Samples -> token ids and labels: what the model reads, and which of its tokens it learns.

Labels are -100 (IGNORE) except on what the model should produce: the assistant turns of a
chat (every one of a multi-turn conversation, tool calls included; not those with weight 0, and
never a tool's result), a response, a completion, or all of a text. A learned span ends with the
tokenizer's EOS: generation stops there, so whatever a chat template writes after EOS (ChatML's
newline after `<|im_end|>`) is not learned. Formats without a template get EOS appended to the
response.

A record's `tools` go to the chat template with every rendering; a template that drops the tools,
the tool calls or the tool results is refused by name rather than trained on a conversation it
does not show.

Preference pairs are tokenized as TRL's DPOTrainer does (tests/trainer/test_preference_shapes.py
compares the ids): a conversational pair renders the prompt with the generation prompt and prompt +
reply whole, a text pair tokenizes prompt and prompt + reply (+ EOS) as text; the reply is what
follows the longest common prefix of the prompt's ids and both prompt + reply ids, and all of it is
scored.
"""

from __future__ import annotations

import json
from typing import Any

from kubetune.api.contract import ExitCode

from kubetune_trainer.errors import TrainerError
from kubetune_trainer.formats import Sample, Turn

IGNORE = -100
Tokens = tuple[list[int], list[int]]  # input ids, labels


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def has_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def upto_eos(ids: list[int], eos: int | None) -> list[int]:
    """`ids` up to and including the first EOS: what generation can produce, and what exact match compares."""
    if eos is not None and eos in ids:
        return ids[: ids.index(eos) + 1]
    return list(ids)


def _template_name(tokenizer: Any) -> str:
    return f"the chat template of {getattr(tokenizer, 'name_or_path', '') or 'the tokenizer'}"


def _render(
    tokenizer: Any, messages: list[dict[str, Any]], generation_prompt: bool, tools: Any, where: object
) -> str:
    try:
        kwargs = {"tools": list(tools)} if tools else {}
        return str(
            tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation_prompt, **kwargs
            )
        )
    except (
        Exception
    ) as exc:  # templates raise on what they do not support (role order, system turns, tool roles)
        raise TrainerError(
            ExitCode.DATASET_INVALID,
            f"{where}: {_template_name(tokenizer)} refuses this conversation: {type(exc).__name__}: {exc}",
        ) from exc


def _check_tools(tokenizer: Any, turns: list[Turn], tools: Any, text: str, where: object) -> None:
    """Refuse a template that silently drops what a tool-calling conversation holds."""
    fix = "use a model whose chat template renders tools (Qwen2.5, Llama 3.1, Mistral), or drop the tool turns from the data"
    if tools and text == _render(tokenizer, [t.message() for t in turns], False, None, where):
        raise TrainerError(
            ExitCode.DATASET_INVALID,
            f"{where}: {_template_name(tokenizer)} does not render `tools` (the output is the same without them); {fix}",
        )
    for i, turn in enumerate(turns):
        for call in turn.tool_calls:
            if call["function"]["name"] not in text:
                raise TrainerError(
                    ExitCode.DATASET_INVALID,
                    f"{where}: {_template_name(tokenizer)} does not render tool_calls (message {i} calls {call['function']['name']!r}, "
                    f"which is not in the rendered text); {fix}",
                )
        result = turn.content.strip()
        if (
            turn.role == "tool" and result and result not in text and json.dumps(result)[1:-1] not in text
        ):  # raw, or as a JSON string
            raise TrainerError(
                ExitCode.DATASET_INVALID,
                f"{where}: {_template_name(tokenizer)} does not render tool results (message {i}); {fix}",
            )


def chat_tokens(tokenizer: Any, turns: list[Turn], where: object = "", tools: Any = None) -> Tokens:
    """The rendered conversation; each learned assistant turn labelled from its first token through EOS."""
    if not has_template(tokenizer):
        raise TrainerError(
            ExitCode.DATASET_INVALID,
            "format chat needs a tokenizer with a chat template (tokenizer_config.json chat_template)",
        )
    messages = [t.message() for t in turns]
    text = _render(tokenizer, messages, False, tools, where)
    if tools or any(t.role == "tool" or t.tool_calls for t in turns):
        _check_tools(tokenizer, turns, tools, text, where)
    ids = _ids(tokenizer, text)
    labels = [IGNORE] * len(ids)
    eos = tokenizer.eos_token_id
    for i, turn in enumerate(turns):
        if turn.role != "assistant" or not turn.learn:
            continue
        start = len(_ids(tokenizer, _render(tokenizer, messages[:i], True, tools, where)))
        end = len(_ids(tokenizer, _render(tokenizer, messages[: i + 1], False, tools, where)))
        labels[start : start + len(upto_eos(ids[start:end], eos))] = upto_eos(ids[start:end], eos)
    return ids, labels


def prompt_response_tokens(tokenizer: Any, prompt: str, response: str) -> Tokens:
    prompt_ids = _ids(tokenizer, prompt)
    response_ids = _ids(tokenizer, response) + (
        [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    )
    return prompt_ids + response_ids, [IGNORE] * len(prompt_ids) + response_ids


def _prompted(sample: Sample, tokenizer: Any, response: str, where: object) -> Tokens:
    if has_template(tokenizer):
        return chat_tokens(tokenizer, [Turn("user", sample.prompt), Turn("assistant", response)], where)
    return prompt_response_tokens(
        tokenizer, f"### Instruction:\n{sample.prompt}\n\n### Response:\n", response
    )


def tokenize(sample: Sample, tokenizer: Any, where: object = "") -> Tokens:
    """Ids and labels for supervised fine-tuning. A preference sample trains on its chosen reply."""
    if sample.kind == "chat":
        return chat_tokens(tokenizer, list(sample.messages), where, sample.tools)
    if sample.kind == "instruction":
        return _prompted(sample, tokenizer, sample.response, where)
    if sample.kind == "preference":
        return tokenize_preference(sample, tokenizer, where)[0]
    if sample.kind == "prompt_completion":
        return prompt_response_tokens(tokenizer, sample.prompt, sample.response)
    if sample.kind == "text":
        ids = _ids(tokenizer, sample.text) + (
            [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        )
        return ids, list(ids)
    raise TrainerError(ExitCode.CONFIG_INVALID, f"unknown sample kind {sample.kind}")


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def preference_ids(
    sample: Sample, tokenizer: Any, where: object = ""
) -> tuple[list[int], list[int], list[int]]:
    """(prompt, chosen, rejected) token ids of a preference pair, as TRL's DPOTrainer makes them."""
    if sample.conversational:
        prompt_ids, with_chosen, with_rejected = _conversation_pair_ids(sample, tokenizer, where)
    else:
        prompt_ids, with_chosen, with_rejected = _text_pair_ids(sample, tokenizer)
    n = min(_common_prefix(prompt_ids, with_chosen), _common_prefix(prompt_ids, with_rejected))
    return prompt_ids[:n], with_chosen[n:], with_rejected[n:]


def _text_pair_ids(sample: Sample, tokenizer: Any) -> tuple[list[int], list[int], list[int]]:
    """The ids of the prompt, and of the prompt followed by each reply (ending in EOS), tokenized as one text."""
    eos = tokenizer.eos_token or ""
    chosen = sample.response if sample.response.endswith(eos) else sample.response + eos
    rejected = sample.rejected if sample.rejected.endswith(eos) else sample.rejected + eos
    prompt_ids = list(tokenizer(sample.prompt)["input_ids"])
    with_chosen = list(tokenizer(sample.prompt + chosen)["input_ids"])
    with_rejected = list(tokenizer(sample.prompt + rejected)["input_ids"])
    return prompt_ids, with_chosen, with_rejected


def _conversation_pair_ids(
    sample: Sample, tokenizer: Any, where: object
) -> tuple[list[int], list[int], list[int]]:
    """The chat template's ids of the prompt turns (with the generation prompt), and of the prompt turns followed
    by each reply; the tools and tool turns of both conversations are checked against the template first."""
    if not has_template(tokenizer):
        raise TrainerError(
            ExitCode.DATASET_INVALID,
            f"{where}: conversational preference pairs need a tokenizer with a chat template (tokenizer_config.json chat_template)",
        )
    prompt = [t.message() for t in sample.messages]
    turns = list(sample.messages)
    for reply in (sample.chosen_turns, sample.rejected_turns):
        text = _render(tokenizer, prompt + [t.message() for t in reply], False, sample.tools, where)
        if sample.tools or any(t.role == "tool" or t.tool_calls for t in turns + list(reply)):
            _check_tools(tokenizer, turns + list(reply), sample.tools, text, where)
    return (
        _template_ids(tokenizer, prompt, True, sample.tools, where),
        _template_ids(
            tokenizer, prompt + [t.message() for t in sample.chosen_turns], False, sample.tools, where
        ),
        _template_ids(
            tokenizer, prompt + [t.message() for t in sample.rejected_turns], False, sample.tools, where
        ),
    )


def _template_ids(
    tokenizer: Any, messages: list[dict[str, Any]], generation_prompt: bool, tools: Any, where: object
) -> list[int]:
    """The chat template's token ids of `messages` (what _render gives as text)."""
    kwargs = {"tools": list(tools)} if tools else {}
    try:
        out = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, add_generation_prompt=generation_prompt, **kwargs
        )
    except Exception as exc:
        raise TrainerError(
            ExitCode.DATASET_INVALID,
            f"{where}: {_template_name(tokenizer)} refuses this conversation: {type(exc).__name__}: {exc}",
        ) from exc
    return list(out["input_ids"])


def tokenize_preference(sample: Sample, tokenizer: Any, where: object = "") -> tuple[Tokens, Tokens]:
    """(chosen, rejected), each the prompt followed by its reply, the reply scored: what preference tuning reads."""
    prompt, chosen, rejected = preference_ids(sample, tokenizer, where)
    masked = [IGNORE] * len(prompt)
    return (prompt + chosen, masked + chosen), (prompt + rejected, masked + rejected)
