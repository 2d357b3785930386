"""Triton multi-LoRA kernels against the torch reference: outputs and all four gradients.

On a machine without CUDA these run under Triton's CPU interpreter (set up in the root
conftest), so the shapes are small and odd: tokens 1, 7, 67; in/out features off the
block sizes (and past one block: 130); rank 4 and 16 (and 12); 1, 3 and 5 experts; dense and
top-k routing (turn-sized runs and per-token random ids); with and without ``out``.
Every input is fresh random data; every buffer the kernels allocate starts as NaN.
"""

from __future__ import annotations

import pytest
import torch

from moe_empathy.kernels import MultiLoraInputs, configs, multi_lora, multi_lora_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}

# tokens, in, out, experts, rank, k (0 = dense), routing, with out, dtype
CASES = [
    (1, 37, 53, 1, 4, 0, None, False, torch.float32),
    (7, 37, 53, 3, 16, 0, None, True, torch.float32),
    (67, 70, 45, 5, 4, 0, None, False, torch.float32),
    (67, 37, 53, 3, 16, 0, None, True, torch.float16),
    (1, 37, 53, 3, 4, 1, "random", True, torch.float32),
    (7, 37, 53, 5, 16, 2, "random", False, torch.float32),
    (67, 37, 53, 3, 4, 1, "runs", True, torch.float32),
    (67, 70, 45, 5, 16, 2, "runs", False, torch.float32),
    (67, 37, 53, 5, 4, 2, "random", True, torch.float16),
    (7, 130, 29, 1, 16, 1, "runs", False, torch.float16),
    (67, 29, 130, 3, 16, 2, "runs", True, torch.float32),
    (7, 37, 53, 3, 12, 2, "random", True, torch.float32),  # a rank off the powers of two
]


def _case_id(case) -> str:
    tokens, fin, fout, experts, rank, k, routing, with_out, dtype = case
    mode = "dense" if k == 0 else f"top{k}-{routing}"
    return f"T{tokens}-{fin}x{fout}-E{experts}-r{rank}-{mode}-{'out' if with_out else 'new'}-{str(dtype)[6:]}"


def _poison(t: torch.Tensor) -> torch.Tensor:
    return t.fill_(float("nan")) if t.is_floating_point() else t


@pytest.fixture
def poisoned_alloc(monkeypatch):
    """Every floating ``new_empty`` / ``empty_like`` made during the test is filled with NaN."""
    new_empty, empty_like = torch.Tensor.new_empty, torch.empty_like
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **kw: _poison(new_empty(self, *a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: _poison(empty_like(*a, **kw)))


def _turn_runs(tokens: int, experts: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """``[tokens, k]`` distinct-per-token ids that stay fixed over turn-sized runs."""
    ids = torch.empty(tokens, k, dtype=torch.int64)
    start = 0
    while start < tokens:
        length = int(torch.randint(1, 40, (1,), generator=gen))
        ids[start : start + length] = torch.randperm(experts, generator=gen)[:k]
        start += length
    return ids


def _inputs(case, seed: int):
    tokens, fin, fout, experts, rank, k, routing, with_out, dtype = case
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype)

    x = rand(tokens, fin)
    lora_A = rand(experts, rank, fin, scale=fin**-0.5)
    lora_B = rand(experts, fout, rank, scale=rank**-0.5)
    if k == 0:
        expert_ids = None
        gate = torch.softmax(torch.randn(tokens, experts, generator=gen), dim=-1)
    else:
        if routing == "runs":
            expert_ids = _turn_runs(tokens, experts, k, gen)
        else:
            expert_ids = torch.randint(0, experts, (tokens, k), generator=gen)
        gate = torch.rand(tokens, k, generator=gen)
    base = rand(tokens, fout) if with_out else None
    grad_out = rand(tokens, fout)
    to = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return tuple(map(to, (x, lora_A, lora_B, gate, expert_ids, base, grad_out)))


def _run(backend, x, lora_A, lora_B, gate, expert_ids, base, grad_out, scaling):
    """Output and gradients (x, A, B, gate, and out's source when given) of one backend."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, lora_A, lora_B, gate)]
    base_leaf = None if base is None else base.detach().clone().requires_grad_()
    out = None if base_leaf is None else base_leaf * 1.0  # a non-leaf, like a base layer's output
    result = multi_lora(*leaves, scaling, expert_ids=expert_ids, out=out, backend=backend)
    if out is not None:
        assert result is out
    result.backward(grad_out)
    grads = [leaf.grad for leaf in leaves] + ([] if base_leaf is None else [base_leaf.grad])
    return result.detach(), grads


def _assert_close(actual, expected, dtype, what, seed):
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values (unwritten elements?), seed {seed}"
    tol = TOLERANCE[dtype] * max(1.0, expected.abs().max().item())
    err = (actual.float() - expected.float()).abs().max().item()
    assert err <= tol, f"{what}: max error {err:.3g} > {tol:.3g}, seed {seed}"


def _check_case(case):
    dtype = case[-1]
    seed = int(torch.randint(0, 2**31 - 1, (1,)))
    inputs = _inputs(case, seed)
    result, grads = _run("triton", *inputs, scaling=0.75)
    # the reference in fp32 on the same (rounded) inputs
    ref_inputs = [t.float() if t is not None and t.is_floating_point() else t for t in inputs]
    ref_result, ref_grads = _run("torch", *ref_inputs, scaling=0.75)
    _assert_close(result, ref_result.to(result.dtype), dtype, "output", seed)
    names = ["dx", "dA", "dB", "dgate", "dout"][: len(grads)]
    for name, grad, ref_grad in zip(names, grads, ref_grads, strict=True):
        _assert_close(grad, ref_grad.to(grad.dtype), dtype, name, seed)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_forward_backward_match_reference(case, poisoned_alloc):
    _check_case(case)


@pytest.mark.parametrize("case", [CASES[3], CASES[9], CASES[10]], ids=_case_id)
def test_split_reductions_match_reference(case, poisoned_alloc, monkeypatch):
    """The split-K shrink (in or out past one 128 block) and the token-split weight
    gradients (67 tokens: 3 blocks) add partial sums atomically."""
    monkeypatch.setattr(configs, "FORCE_SPLIT", 2)
    _check_case(case)


@pytest.mark.parametrize("case", [CASES[2], CASES[7]], ids=_case_id)
def test_forward_without_grad(case, poisoned_alloc):
    seed = int(torch.randint(0, 2**31 - 1, (1,)))
    x, lora_A, lora_B, gate, expert_ids, base, _ = _inputs(case, seed)
    with torch.no_grad():
        result = multi_lora(x, lora_A, lora_B, gate, 2.0, expert_ids=expert_ids, backend="triton")
    dense_gate = MultiLoraInputs(x, lora_A, lora_B, gate, 2.0, expert_ids).dense_gate()
    expected = multi_lora_reference(x, lora_A, lora_B, dense_gate, 2.0)
    _assert_close(result, expected, x.dtype, "output", seed)


def test_strided_inputs_and_transposed_out(poisoned_alloc):
    wide = torch.randn(7, 50, device=DEVICE)
    x = wide[:, 3:40]  # row stride 50
    lora_A = torch.randn(3, 4, 37, device=DEVICE)
    lora_B = torch.randn(3, 29, 4, device=DEVICE)
    gate = torch.rand(3, 7, device=DEVICE).t()  # non-contiguous gate
    base = torch.randn(29, 7, device=DEVICE)
    out = base.clone().t()  # column stride 7
    result = multi_lora(x, lora_A, lora_B, gate, 0.5, out=out, backend="triton")
    assert result is out
    expected = base.t() + multi_lora_reference(x, lora_A, lora_B, gate, 0.5)
    _assert_close(result, expected, torch.float32, "output", 0)


def test_out_as_view_of_a_base_layer_output():
    """As in the model: ``out`` is a reshaped view of ``linear(x, W)`` and ``x`` feeds both."""
    weight = torch.randn(20, 16, device=DEVICE)
    x = torch.randn(2, 9, 16, device=DEVICE)
    lora_A, lora_B = torch.randn(3, 4, 16, device=DEVICE), torch.randn(3, 20, 4, device=DEVICE)
    gate = torch.rand(18, 3, device=DEVICE)
    results = {}
    for backend in ("triton", "torch"):
        leaves = [t.clone().requires_grad_() for t in (weight, x, lora_A, lora_B, gate)]
        w, xx, a, b, g = leaves
        base = torch.nn.functional.linear(xx, w)  # [2, 9, 20]
        flat = multi_lora(xx.reshape(-1, 16), a, b, g, 0.5, out=base.reshape(-1, 20), backend=backend)
        flat.view_as(base).sin().sum().backward()
        results[backend] = [flat.detach()] + [leaf.grad for leaf in leaves]
    names = ["output", "dW", "dx", "dA", "dB", "dgate"]
    for name, got, want in zip(names, results["triton"], results["torch"], strict=True):
        _assert_close(got, want, torch.float32, name, 0)


def test_no_tokens():
    lora_A, lora_B = torch.randn(2, 4, 8, device=DEVICE), torch.randn(2, 5, 4, device=DEVICE)
    x, gate = torch.randn(0, 8, device=DEVICE), torch.rand(0, 2, device=DEVICE)
    assert multi_lora(x, lora_A, lora_B, gate, 1.0, backend="triton").shape == (0, 5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton interpreter has no bfloat16")
@pytest.mark.parametrize("k", [0, 2])
def test_bfloat16_on_gpu(k, poisoned_alloc):
    _check_case((67, 70, 45, 3, 16, k, "runs", True, torch.bfloat16))
