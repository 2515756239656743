"""Local LoRA training and evaluation on a tiny random Llama with a LoRA adapter."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.nn import functional as F

from edge_agent.errors import ConfigError, DataError, TaskError
from edge_agent.training.data import Example, tokenize
from edge_agent.training.train import TrainConfig, evaluate, greedy_continuations, train_lora

REPETITIVE = [
    Example("Capital of France?", "Paris"),
    Example("Capital of Italy?", "Rome"),
    Example("Capital of Spain?", "Madrid"),
    Example("Say hello.", "hello hello hello"),
]


@pytest.fixture(scope="module")
def tokenizer(embedded_tokenizer: Any) -> Any:
    return embedded_tokenizer


@pytest.fixture(scope="module")
def make_model(tokenizer: Any) -> Callable[[], torch.nn.Module]:
    """A fresh tiny Llama (same random init every call) wrapped with a LoRA adapter."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=len(tokenizer),
    )
    torch.manual_seed(0)
    base_state = {k: v.clone() for k, v in LlamaForCausalLM(config).state_dict().items()}

    def make() -> torch.nn.Module:
        base = LlamaForCausalLM(config)
        base.load_state_dict(base_state)
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
        torch.manual_seed(1)  # lora_A init
        return get_peft_model(base, lora)

    return make


def lora_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def base_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}


CFG = TrainConfig(steps=20, batch_size=2, lr=1e-2, seed=3)


def test_training_reduces_loss_and_changes_only_lora(make_model: Any, tokenizer: Any) -> None:
    model = make_model()
    base_before, lora_before = base_state(model), lora_state(model)
    result = train_lora(model, tokenizer, REPETITIVE, CFG)
    assert result.steps == 20 and len(result.losses) == 20
    assert result.num_examples == 4
    assert result.first_loss == result.losses[0] and result.last_loss == result.losses[-1]
    assert result.mean_loss == pytest.approx(sum(result.losses) / 20)
    assert math.log(len(tokenizer)) - 0.5 < result.first_loss < math.log(len(tokenizer)) + 0.5
    assert result.last_loss < result.first_loss - 0.3
    assert result.seconds > 0
    base_after, lora_after = base_state(model), lora_state(model)
    assert base_after.keys() == base_before.keys() and len(base_after) > 10
    assert all(torch.equal(base_before[k], base_after[k]) for k in base_before)
    assert len(lora_after) == 8  # 2 layers x (q, v) x (A, B)
    changed = [k for k in lora_before if not torch.equal(lora_before[k], lora_after[k])]
    assert sorted(changed) == sorted(lora_before)
    assert model.training  # mode restored


def test_same_seed_gives_bit_identical_lora(make_model: Any, tokenizer: Any) -> None:
    cfg = TrainConfig(steps=4, batch_size=3, lr=1e-2, seed=11, warmup_steps=2)
    first, second, other = make_model(), make_model(), make_model()
    r1 = train_lora(first, tokenizer, REPETITIVE, cfg)
    r2 = train_lora(second, tokenizer, REPETITIVE, cfg)
    r3 = train_lora(other, tokenizer, REPETITIVE, TrainConfig(steps=4, batch_size=3, lr=1e-2))
    assert r1.losses == r2.losses
    s1, s2 = lora_state(first), lora_state(second)
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert r3.losses != r1.losses  # another seed, another batch order


def test_extra_loss_is_added_to_the_objective(make_model: Any, tokenizer: Any) -> None:
    calls = []

    def pull_b_to_half(model: torch.nn.Module) -> torch.Tensor:
        calls.append(1)
        b = [p for n, p in model.named_parameters() if "lora_B" in n]
        return 1e4 * sum(((p - 0.5) ** 2).sum() for p in b)  # type: ignore[return-value]

    model = make_model()
    cfg = TrainConfig(steps=5, batch_size=2, lr=2e-2, grad_clip=None)
    result = train_lora(model, tokenizer, REPETITIVE, cfg, extra_loss=pull_b_to_half)
    assert len(calls) == 5
    b_values = torch.cat([p.flatten() for n, p in lora_state(model).items() if "lora_B" in n])
    # The huge pull dominates: Adam moves every B entry (initialised to 0) by ~lr per step toward
    # 0.5, all alike; CE alone moves them by at most lr per step in both directions.
    assert b_values.min().item() > 0.09
    assert b_values.max().item() < 0.11
    # reported losses are the CE part only (the pull term is ~1e4 * 0.25 * entries)
    assert all(10.0 < x < 11.5 for x in result.losses)


def test_should_stop_ends_early(make_model: Any, tokenizer: Any) -> None:
    polls = []

    def stop_after_three() -> bool:
        polls.append(1)
        return len(polls) > 3

    model = make_model()
    cfg = TrainConfig(steps=50, batch_size=2, lr=1e-2)
    done: list[int] = []
    result = train_lora(
        model, tokenizer, REPETITIVE, cfg, should_stop=stop_after_three, on_step=done.append
    )
    assert result.steps == 3 and len(result.losses) == 3
    assert done == [1, 2, 3]
    assert result.last_loss == result.losses[2]

    untouched = make_model()
    before = lora_state(untouched)
    result = train_lora(untouched, tokenizer, REPETITIVE, cfg, should_stop=lambda: True)
    assert result.steps == 0 and math.isnan(result.mean_loss) and math.isnan(result.first_loss)
    assert all(torch.equal(before[k], v) for k, v in lora_state(untouched).items())


def test_bad_inputs_raise_package_errors(make_model: Any, tokenizer: Any) -> None:
    model = make_model()
    with pytest.raises(DataError):
        train_lora(model, tokenizer, [], CFG)
    with pytest.raises(DataError):
        evaluate(model, tokenizer, [])
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(TaskError, match="no trainable parameters"):
        train_lora(model, tokenizer, REPETITIVE, CFG)
    with pytest.raises(ConfigError) as info:
        TrainConfig(steps=0, batch_size=0, lr=-1.0)
    assert "steps" in str(info.value) and "batch_size" in str(info.value)
    assert "lr" in str(info.value)


def test_eval_loss_matches_hand_computation(make_model: Any, tokenizer: Any) -> None:
    model = make_model()
    train_lora(model, tokenizer, REPETITIVE, TrainConfig(steps=3, batch_size=2, lr=1e-2))

    def hand_loss(example: Example) -> tuple[float, int]:
        (tok,) = tokenize([example], tokenizer, max_len=128)
        with torch.no_grad():
            logits = model.eval()(input_ids=torch.tensor([tok.input_ids])).logits[0]
        logprobs = F.log_softmax(logits.double(), dim=-1)
        nll = [
            -logprobs[t - 1, tok.labels[t]].item()
            for t in range(1, len(tok.labels))
            if tok.labels[t] != -100
        ]
        return sum(nll), len(nll)

    total, count = hand_loss(REPETITIVE[0])
    model.train()
    one = evaluate(model, tokenizer, REPETITIVE[:1])
    assert count == 3
    assert one.loss == pytest.approx(total / count, rel=1e-5)
    assert one.n == 1 and one.exact_match is None
    assert model.training  # mode restored

    # token-weighted over padded batches: equals the hand sum over all examples / all tokens
    parts = [hand_loss(ex) for ex in REPETITIVE]
    batched = evaluate(model, tokenizer, REPETITIVE, batch_size=3)
    expected = sum(s for s, _ in parts) / sum(c for _, c in parts)
    assert batched.loss == pytest.approx(expected, rel=1e-5)
    assert batched.n == 4


def test_exact_match_on_generated_answers(make_model: Any, tokenizer: Any) -> None:
    model = make_model()
    prompts = [ex.prompt for ex in REPETITIVE[:3]]
    probes = [Example(p, "x") for p in prompts]
    one_by_one = greedy_continuations(model, tokenizer, probes, batch_size=1, max_new_tokens=4)
    batched = greedy_continuations(model, tokenizer, probes, batch_size=3, max_new_tokens=4)
    assert batched == one_by_one  # left padding does not change greedy outputs
    assert all(out.strip() for out in batched)
    # Answers equal to the model's own continuations modulo case and spacing: all hits.
    answers = [
        Example(p, "  " + out.upper().replace(" ", "   ") + " ")
        for p, out in zip(prompts, batched, strict=True)
    ]
    result = evaluate(model, tokenizer, answers, exact_match=True, max_new_tokens=4, batch_size=2)
    assert result.exact_match == 1.0 and result.n == 3
    # One answer changed: 2 of 3.
    answers[1] = Example(prompts[1], "certainly not this")
    result = evaluate(model, tokenizer, answers, exact_match=True, max_new_tokens=4)
    assert result.exact_match == pytest.approx(2 / 3)
    # Plain text records have no answer to match.
    text_only = evaluate(model, tokenizer, [Example("", "", text="abc")], exact_match=True)
    assert text_only.exact_match is None and math.isfinite(text_only.loss)
