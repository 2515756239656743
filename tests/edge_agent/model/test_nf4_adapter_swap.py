"""Regression: an NF4 model must give the same outputs after an eval pass and a state_dict().

bitsandbytes 0.50.2 repacks NF4 weights for CPU inference on an eval-mode forward and breaks
them on the next ``state_dict()``; the agent does exactly that between an evaluation task and
loading the next adapter. ``load_base`` opts out of the repacking.
"""

from __future__ import annotations

import torch

from edge_agent.model.store import ResolvedModel, load_base
from edge_agent.training.lora import LoraSpec, attach_lora, get_adapter_state, set_adapter_state


def test_outputs_survive_eval_then_adapter_reload(tiny_resolved: ResolvedModel) -> None:
    model, _tok = load_base(tiny_resolved, "nf4")
    spec = LoraSpec(r=4, alpha=8.0, dropout=0.0, target_modules=("q_proj", "v_proj"))
    peft_model = attach_lora(model, spec, init_seed=3)
    ids = torch.arange(1, 33).reshape(2, 16)
    peft_model.eval()
    with torch.no_grad():
        before = peft_model(input_ids=ids).logits
        state = get_adapter_state(peft_model)  # state_dict() on the quantized modules
        set_adapter_state(peft_model, state)
        after = peft_model(input_ids=ids).logits
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
