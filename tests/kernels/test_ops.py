"""The custom ops behind the Triton path: ``torch.library.opcheck`` (schema, fake tensors,
autograd registration, AOT dispatch with dynamic shapes) and ``torch.compile`` taking
``multi_lora`` whole (``fullgraph=True``), on odd sizes; dense and top-k routing.

Under Triton's CPU interpreter every token block costs, so the top-k ids come in two runs."""

from __future__ import annotations

import pytest
import torch

from moe_empathy.kernels import multi_lora
from moe_empathy.kernels.ops import multi_lora_triton  # noqa: F401  (registers torch.ops.moe_empathy)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OPS = torch.ops.moe_empathy

# tokens, in, out, experts, rank, k (0 = dense)
SIZES = [(7, 37, 53, 3, 4, 0), (19, 29, 45, 5, 12, 2), (1, 37, 53, 3, 16, 1)]


def _size_id(size) -> str:
    tokens, fin, fout, experts, rank, k = size
    return f"T{tokens}-{fin}x{fout}-E{experts}-r{rank}-{'dense' if k == 0 else f'top{k}'}"


def _inputs(size, requires_grad: bool = False):
    tokens, fin, fout, experts, rank, k = size
    gen = torch.Generator().manual_seed(sum(size))

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE).requires_grad_(requires_grad)

    x, lora_A, lora_B = rand(tokens, fin), rand(experts, rank, fin), rand(experts, fout, rank)
    gate = rand(tokens, k or experts)
    expert_ids = None
    if k:  # two turn-like runs of tokens sharing their experts (every token block is interpreted)
        runs = [torch.randperm(experts, generator=gen)[:k] for _ in range(2)]
        expert_ids = torch.stack([runs[2 * t >= tokens] for t in range(tokens)]).to(DEVICE)
    base = rand(tokens, fout)
    return x, lora_A, lora_B, gate, expert_ids, base


def _routing(expert_ids):
    return [] if expert_ids is None else OPS.token_blocks(expert_ids)


@pytest.mark.parametrize("size", SIZES, ids=_size_id)
def test_opcheck_forward_ops(size):
    x, lora_A, lora_B, gate, expert_ids, base = _inputs(size, requires_grad=True)
    routing = _routing(expert_ids)
    torch.library.opcheck(OPS.multi_lora, (x, lora_A, lora_B, gate, routing, base, 0.5))
    torch.library.opcheck(OPS.multi_lora, (x, lora_A, lora_B, gate, routing, None, 0.5))
    detached = [t.detach() for t in (base, x, lora_A, lora_B, gate)]
    torch.library.opcheck(OPS.multi_lora_, (*detached, routing, 0.5))
    if expert_ids is not None:
        torch.library.opcheck(OPS.token_blocks, (expert_ids,))


@pytest.mark.parametrize("size", SIZES, ids=_size_id)
def test_opcheck_backward_ops(size):
    x, lora_A, lora_B, gate, expert_ids, base = _inputs(size)
    routing = _routing(expert_ids)
    _, unscaled, gated = OPS.multi_lora(x, lora_A, lora_B, gate, routing, None, 0.5)
    grad_out = torch.randn_like(base)
    num_experts = lora_A.shape[0]
    grad_unscaled, _ = OPS.multi_lora_shrink_backward(grad_out, lora_B, gate, unscaled, routing, 0.5)
    torch.library.opcheck(OPS.multi_lora_shrink_backward, (grad_out, lora_B, gate, unscaled, routing, 0.5))
    torch.library.opcheck(OPS.multi_lora_expand_backward, (grad_unscaled, lora_A, routing))
    torch.library.opcheck(OPS.multi_lora_lora_A_grad, (grad_unscaled, x, routing, num_experts))
    torch.library.opcheck(OPS.multi_lora_lora_B_grad, (gated, grad_out, routing, num_experts))


def test_inplace_op_equals_functional_op_on_a_transposed_out():
    x, lora_A, lora_B, gate, expert_ids, base = _inputs(SIZES[1])
    routing = _routing(expert_ids)
    expected = OPS.multi_lora(x, lora_A, lora_B, gate, routing, base, 0.5)[0]
    out = base.t().contiguous().t()  # column stride = tokens
    OPS.multi_lora_(out, x, lora_A, lora_B, gate, routing, 0.5)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("size", SIZES[:2], ids=_size_id)
def test_compiled_multi_lora_equals_eager_with_gradients(size, backend):
    """Dynamo and AOTAutograd take the call without a graph break: on the Triton path the fake
    impls and the registered backward, including top-k routing's data-dependent block count;
    on both, the checked-inputs record that ``multi_lora`` builds."""
    torch._dynamo.reset()
    x, lora_A, lora_B, gate, expert_ids, base = _inputs(size)

    def step(x, lora_A, lora_B, gate, base, expert_ids):
        out = base * 1.0  # a non-leaf, like a base layer's output
        y = multi_lora(x, lora_A, lora_B, gate, 0.5, expert_ids=expert_ids, out=out, backend=backend, validate=False)
        return y.sin().sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (step, compiled):
        leaves = [t.detach().clone().requires_grad_() for t in (x, lora_A, lora_B, gate, base)]
        loss = fn(*leaves, expert_ids)
        loss.backward()
        results.append([loss.detach()] + [leaf.grad for leaf in leaves])
    for eager, traced in zip(*results, strict=True):
        torch.testing.assert_close(traced, eager, rtol=0, atol=1e-5)
