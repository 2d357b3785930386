"""Bad inputs to ``multi_lora`` raise a clear ``ValueError`` before any kernel runs."""

from __future__ import annotations

import pytest
import torch

from moe_empathy.kernels import multi_lora
from moe_empathy.kernels.routing import segment_blocks

T, IN, OUT, E, R = 5, 12, 10, 3, 4


def _good(**changes):
    args = {
        "x": torch.randn(T, IN),
        "lora_A": torch.randn(E, R, IN),
        "lora_B": torch.randn(E, OUT, R),
        "gate": torch.rand(T, E),
        "scaling": 2.0,
        "expert_ids": None,
        "out": None,
    }
    args.update(changes)
    return args


BAD = {
    "x not 2-D": (_good(x=torch.randn(T, 1, IN)), "x must have 2 dimensions"),
    "A not 3-D": (_good(lora_A=torch.randn(E * R, IN)), "lora_A must have 3 dimensions"),
    "in features": (_good(x=torch.randn(T, IN + 1)), "input features"),
    "E disagrees": (_good(lora_B=torch.randn(E + 1, OUT, R)), "experts"),
    "rank disagrees": (_good(lora_B=torch.randn(E, OUT, R + 1)), "rank"),
    "no experts": (_good(lora_A=torch.randn(0, R, IN), lora_B=torch.randn(0, OUT, R)), "at least one expert"),
    "gate rows": (_good(gate=torch.rand(T + 1, E)), "gate has 6 rows"),
    "dense gate width": (_good(gate=torch.rand(T, E - 1)), "one weight per expert"),
    "integer gate": (_good(gate=torch.ones(T, E, dtype=torch.int64)), "gate must be floating point"),
    "ids shape": (_good(gate=torch.rand(T, 2), expert_ids=torch.zeros(T, 1, dtype=torch.int64)), "one shape"),
    "ids float": (_good(gate=torch.rand(T, 2), expert_ids=torch.zeros(T, 2)), "expert_ids must be integers"),
    "id too big": (_good(gate=torch.rand(T, 1), expert_ids=torch.full((T, 1), E)), r"lie in \[0, 3\)"),
    "id negative": (_good(gate=torch.rand(T, 1), expert_ids=torch.full((T, 1), -1)), r"lie in \[0, 3\)"),
    "out shape": (_good(out=torch.zeros(T, OUT + 1)), "out must have shape"),
    "out dtype": (_good(out=torch.zeros(T, OUT, dtype=torch.float16)), "out must have x's dtype"),
    "mixed dtypes": (_good(lora_A=torch.randn(E, R, IN, dtype=torch.float16)), "share a dtype"),
    "float64": (_good(x=torch.randn(T, IN, dtype=torch.float64)), "float32, float16 or bfloat16"),
    "scaling": (_good(scaling=torch.tensor(2.0)), "scaling must be a real number"),
    "devices": (_good(lora_B=torch.randn(E, OUT, R, device="meta")), "one device"),
    "not a tensor": (_good(gate=[[1.0] * E] * T), "gate must be a torch.Tensor"),
}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_raises(name, backend):
    args, message = BAD[name]
    args = dict(args)
    positional = [args.pop(name) for name in ("x", "lora_A", "lora_B", "gate", "scaling")]
    with pytest.raises(ValueError, match=message):
        multi_lora(*positional, backend=backend, **args)


def test_unknown_backend():
    args = _good()
    with pytest.raises(ValueError, match="backend"):
        multi_lora(args["x"], args["lora_A"], args["lora_B"], args["gate"], 1.0, backend="cuda")


def test_sparse_routing_blocks_cover_each_token_once_with_one_expert_tuple():
    ids = torch.tensor([[2, 0]] * 40 + [[1, 2]] * 3 + [[2, 0]] * 5 + [[0, 1]] * 20)
    perm, starts, ends = (t.long() for t in segment_blocks(ids, block_m=16))
    assert sorted(perm.tolist()) == list(range(ids.shape[0]))
    assert (ends - starts).min() >= 1 and (ends - starts).max() <= 16
    covered = torch.cat([torch.arange(s, e) for s, e in zip(starts.tolist(), ends.tolist())])
    assert covered.tolist() == list(range(ids.shape[0]))
    for s, e in zip(starts.tolist(), ends.tolist()):
        block_ids = ids[perm[s:e]]
        assert (block_ids == block_ids[0]).all()
    # the two [2, 0] runs merge into one segment of 45 tokens: 3 blocks; 3 + 20 tokens: 1 + 2
    assert starts.numel() == 3 + 1 + 2
