"""Samples -> token ids and labels: what the model reads, and which of its tokens it learns.

Labels are -100 (IGNORE) except on what the model should produce: the assistant turns of a
chat (every one of a multi-turn conversation), a response, a completion, or all of a text.
A learned span ends with the tokenizer's EOS: generation stops there, so whatever a chat
template writes after EOS (ChatML's newline after `<|im_end|>`) is not learned. Formats
without a template get EOS appended to the response.
"""

from __future__ import annotations

from typing import Any

from kubetune.api.contract import ExitCode

from kubetune_trainer.errors import TrainerError
from kubetune_trainer.formats import Sample

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


def chat_tokens(tokenizer: Any, messages: list[dict[str, str]], where: object = "") -> Tokens:
    """The rendered conversation; each assistant turn learned from its first token through EOS."""
    if not has_template(tokenizer):
        raise TrainerError(ExitCode.DATASET_INVALID, "format chat needs a tokenizer with a chat template (tokenizer_config.json chat_template)")

    def render(msgs: list[dict[str, str]], generation_prompt: bool) -> str:
        try:
            return str(tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt))
        except Exception as exc:  # templates raise on what they do not support (role order, system turns)
            raise TrainerError(ExitCode.DATASET_INVALID, f"{where}: the chat template refuses this conversation: {type(exc).__name__}: {exc}") from exc

    ids = _ids(tokenizer, render(messages, False))
    labels = [IGNORE] * len(ids)
    eos = tokenizer.eos_token_id
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_ids(tokenizer, render(messages[:i], True)))
        end = len(_ids(tokenizer, render(messages[: i + 1], False)))
        labels[start : start + len(upto_eos(ids[start:end], eos))] = upto_eos(ids[start:end], eos)
    return ids, labels


def prompt_response_tokens(tokenizer: Any, prompt: str, response: str) -> Tokens:
    prompt_ids = _ids(tokenizer, prompt)
    response_ids = _ids(tokenizer, response) + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
    return prompt_ids + response_ids, [IGNORE] * len(prompt_ids) + response_ids


def _as_chat(sample: Sample, response: str) -> list[dict[str, str]]:
    turns = list(sample.messages) if sample.messages else [("user", sample.prompt)]
    return [{"role": r, "content": c} for r, c in turns] + [{"role": "assistant", "content": response}]


def _prompted(sample: Sample, tokenizer: Any, response: str, where: object) -> Tokens:
    if has_template(tokenizer) or sample.messages:
        return chat_tokens(tokenizer, _as_chat(sample, response), where)
    return prompt_response_tokens(tokenizer, f"### Instruction:\n{sample.prompt}\n\n### Response:\n", response)


def tokenize(sample: Sample, tokenizer: Any, where: object = "") -> Tokens:
    """Ids and labels for supervised fine-tuning. A preference sample trains on its chosen response."""
    if sample.kind == "chat":
        return chat_tokens(tokenizer, [{"role": r, "content": c} for r, c in sample.messages], where)
    if sample.kind in ("instruction", "preference"):
        return _prompted(sample, tokenizer, sample.response, where)
    if sample.kind == "prompt_completion":
        return prompt_response_tokens(tokenizer, sample.prompt, sample.response)
    if sample.kind == "text":
        ids = _ids(tokenizer, sample.text) + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
        return ids, list(ids)
    raise TrainerError(ExitCode.CONFIG_INVALID, f"unknown sample kind {sample.kind}")


def tokenize_preference(sample: Sample, tokenizer: Any, where: object = "") -> tuple[Tokens, Tokens]:
    """(chosen, rejected), each with the same prompt and its own response learned: what preference tuning reads."""
    return _prompted(sample, tokenizer, sample.response, where), _prompted(sample, tokenizer, sample.rejected, where)
