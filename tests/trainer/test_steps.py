"""One optimizer step's pieces: grouping micro-batches, the token denominator, and fused AdamW skipping a bad step
on the device (the flags are then read one step late)."""

from __future__ import annotations

import torch
from kubetune_trainer import steps


def test_micro_batches_group_into_steps_and_the_last_may_be_short() -> None:
    groups = list(steps.optimizer_steps(iter(range(7)), 3))
    assert groups == [[0, 1, 2], [3, 4, 5], [6]]


def test_denominator_is_the_steps_labelled_tokens_over_world_and_accumulation() -> None:
    a = {"labels": torch.tensor([[-100, 5, 6, -100, 7]])}  # 3 labelled after the shift
    b = {"labels": torch.tensor([[-100, 1, 2, 3, 4, 5, 6]])}  # 6
    assert float(steps.step_denominator([a, b], world=1, accumulation=2, device=torch.device("cpu"))) == 9 / 2


def _adamw(fused: bool) -> tuple[torch.nn.Parameter, torch.optim.Optimizer]:
    p = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.AdamW([p], lr=0.1, fused=fused)
    p.grad = torch.full((4,), 0.5)
    return p, opt


def test_fused_adamw_skips_the_update_when_the_flag_is_set() -> None:
    p, opt = _adamw(fused=True)
    assert steps.skips_on_device(opt)
    steps.set_found_inf(opt, torch.tensor([1.0, 0.0]))  # [loss not finite, SIGTERM]
    opt.step()
    assert torch.equal(p.detach(), torch.ones(4))
    assert float(opt.state[p]["step"]) == 0  # the step count is rolled back too
    steps.set_found_inf(opt, torch.tensor([0.0, 1.0]))  # only a SIGTERM: the update happens
    opt.step()
    assert not torch.equal(p.detach(), torch.ones(4))


def test_unfused_optimizers_read_the_flags_before_the_update() -> None:
    _, opt = _adamw(fused=False)
    assert not steps.skips_on_device(opt)
