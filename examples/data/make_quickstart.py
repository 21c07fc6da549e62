"""Builds the quickstart's files deterministically: a tiny tokenizer + random-init Llama, and the task data.

    python examples/data/make_quickstart.py    # rewrites examples/data/tiny-llama/ and spell-digits/

The base model is a 2-layer Llama with random weights (seed 0): it cannot do the task.
The task: read four digit words, answer with the digits ("seven zero two nine" -> "7 0 2 9").
Train and held-out eval sets use disjoint digit strings, so exact match on eval measures
generalisation, not memory.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SPECIAL = ["<pad>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {
        tok: i
        for i, tok in enumerate(
            SPECIAL + WORDS + [str(d) for d in range(10)] + ["spell", "the", "digits", ":"]
        )
    }
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", eos_token="<|end|>", bos_token=None
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>", "<|system|>"]})
    tokenizer.chat_template = CHAT_TEMPLATE
    from tokenizers import decoders

    tokenizer.backend_tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer.save_pretrained(out)
    return tokenizer


def build_model(out: Path, vocab_size: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=5,
        bos_token_id=None,
    )
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)


def build_data(out: Path) -> None:
    rng = random.Random(0)
    numbers = rng.sample(range(10_000), 2_400)

    def record(n: int) -> dict:
        digits = f"{n:04d}"
        return {
            "messages": [
                {"role": "user", "content": " ".join(WORDS[int(d)] for d in digits)},
                {"role": "assistant", "content": " ".join(digits)},
            ]
        }

    out.mkdir(parents=True, exist_ok=True)
    (out / "train.jsonl").write_text("".join(json.dumps(record(n)) + "\n" for n in numbers[:2_000]))
    (out / "eval.jsonl").write_text("".join(json.dumps(record(n)) + "\n" for n in numbers[2_000:]))


if __name__ == "__main__":
    tok = build_tokenizer(HERE / "tiny-llama")
    build_model(HERE / "tiny-llama", len(tok))
    build_data(HERE / "spell-digits")
    print("wrote", HERE / "tiny-llama", HERE / "spell-digits")
