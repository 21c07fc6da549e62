"""Run under torchrun by test_token_weighted_loss.py: one optimizer step of the trainer's own pieces on this rank.

The trainer's Accelerator (build_accelerator), its model (prepare_model: padding-free attention, chunked loss), its
micro-batches (token budget, flattened) and its step (steps.step_denominator + steps.forward_backward) over this
rank's share of a ragged data set, 2 micro-batches of accumulation. Then, on the same model unwrapped, the reference:
every example of every rank alone, its summed token losses divided by the step's total token count. Saves both
gradients, both losses and the world size torch.distributed saw.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import yaml
from kubetune.api.trainer_config import TrainerConfig
from kubetune_trainer import batching, steps
from kubetune_trainer import data as data_mod
from kubetune_trainer import model as model_mod
from kubetune_trainer.backend import BackendChoice, build_accelerator
from kubetune_trainer.data import IGNORE, Example

LENGTHS = [
    23,
    5,
    17,
    30,
    9,
    12,
    26,
    7,
    14,
    19,
    11,
    3,
]  # ragged: every micro-batch holds a different token count
ACCUM = 2


def examples(vocab: int) -> list[Example]:
    g = torch.Generator().manual_seed(7)
    out = []
    for n in LENGTHS:
        ids = torch.randint(1, vocab, (n,), generator=g).tolist()
        out.append(Example(ids, [IGNORE] * (n // 4) + ids[n // 4 :], list(range(n))))
    return out


def main() -> None:
    config = TrainerConfig.model_validate(yaml.safe_load(Path(sys.argv[1]).read_text()))
    out_dir, packing = Path(sys.argv[2]), sys.argv[3] == "packed"
    spec = config.spec
    assert config.gradient_accumulation_steps == ACCUM, config.gradient_accumulation_steps
    acc = build_accelerator(config, BackendChoice(False, "test: DDP"), on_gpu=False)
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    torch.manual_seed(0)
    model = model_mod.prepare_model(spec, Path(spec.model.source), on_gpu=False)
    assert model_mod.fast_path(model)["varlenAttention"]
    vocab = model.config.vocab_size
    exs = examples(vocab)
    units = data_mod.pack(exs, max_len=32) if packing else exs
    groups = batching.micro_batches(units, budget=40)  # no shuffle: every rank sees the same list
    assert len(groups) >= world * ACCUM, len(groups)
    mine = [batching.Flatten(32)([g]) for g in groups[rank * ACCUM : (rank + 1) * ACCUM]]
    used = [e for g in groups[: world * ACCUM] for u in g for e in (split_packed(u) if packing else [u])]

    model = acc.prepare(model)
    model.train()
    denominator = steps.step_denominator(mine, world, ACCUM, acc.device)
    losses = steps.forward_backward(acc, model, mine, steps.lm_loss(model, denominator))
    step_loss = torch.stack(losses).sum()
    steps.all_reduce(step_loss)
    trained = {
        n: p.grad.detach().clone()
        for n, p in acc.unwrap_model(model).named_parameters()
        if p.grad is not None
    }

    plain = acc.unwrap_model(model)
    plain.zero_grad()
    total = sum(int((torch.tensor(e.labels[1:]) != IGNORE).sum()) for e in used)
    ref_loss = torch.zeros(())
    for e in used:
        out = plain(
            input_ids=torch.tensor([e.input_ids]),
            labels=torch.tensor([e.labels]),
            num_items_in_batch=torch.tensor(float(total)),
            use_cache=False,
        )
        out.loss.backward()
        ref_loss += out.loss.detach()
    reference = {n: p.grad.detach().clone() for n, p in plain.named_parameters() if p.grad is not None}
    torch.save({"world": world, "rank": rank, "trained": trained, "reference": reference, "examples": len(used), "tokens": total,
                "counts": [int(batching.label_count(b)) for b in mine],
                # the loss the trainer reports: the mean over micro-batches and ranks of the micro-batch losses
                "reported_loss": float(step_loss) / (world * ACCUM), "reference_loss": float(ref_loss)},
               out_dir / f"rank-{rank}.pt")  # fmt: skip
    torch.distributed.destroy_process_group()


def split_packed(row: Example) -> list[Example]:
    """The examples inside a packed row (data.pack unlabels each one's first token, which alone is never used)."""
    starts = [i for i, p in enumerate(row.position_ids) if p == 0] + [len(row.input_ids)]
    return [
        Example(row.input_ids[a:b], row.labels[a:b], row.position_ids[a:b])
        for a, b in zip(starts[:-1], starts[1:], strict=True)
    ]


if __name__ == "__main__":
    main()
