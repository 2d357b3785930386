"""The per-turn gate: pools each turn's readable context and mixes the experts.

For turn ``k`` the gate reads the hidden states (entering decoder layer ``gate_layer``)
of the tokens with ``turn_ids == k`` and ``gate_mask == 1``: the user message and the
template tokens around it, never the assistant reply. Each token's state is RMS-normalised
before the mean, so the first token's huge "attention sink" norm cannot dominate the pool.
Memory across turns (``gate_memory``): ``"none"`` reads each turn alone; ``"ema"`` reads an
exponential moving average of the pooled turns; ``"gru"`` runs a small recurrent cell over the
turns, fed each turn's pooled state and the previous turn's decision, and decides from the
turn's own pool together with the cell's state (so a follow-up question that says nothing of
the user's state can still be routed by a shift several turns back).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .routing import RoutingPlan


@dataclass
class GateState:
    """What the gate carries from one forward to the next when a KV cache is reused.

    Args:
        turn_weights: ``[batch, turns, E]`` weights of every turn seen so far.
        last_turn: ``[batch]`` the newest turn id of each row (its weights apply to new tokens).
        memory: ``[batch, hidden]`` the ``"ema"`` context after ``last_turn``, or
            ``[batch, gate_memory_size]`` the ``"gru"`` state after it; None without memory.
        plan: the routing of tokens that continue turn ``last_turn`` (decoding its reply),
            built by the model on first use and reused at every decode step, else None.
    """

    turn_weights: torch.Tensor
    last_turn: torch.Tensor
    memory: torch.Tensor | None = None
    plan: RoutingPlan | None = None


@dataclass
class GateOutput:
    """The gate's decision for one forward.

    Args:
        weights: ``[batch, turns, E]`` per-turn weights (rows sum to 1 on present turns).
        logits: ``[batch, turns, E]`` gate logits (None for turns only carried from a state).
        turn_mask: ``[batch, turns]`` True for turns that have tokens or were carried.
        fresh: ``[batch, turns]`` True for turns decided in this forward (not carried).
        state: the :class:`GateState` to pass to the next forward with the KV cache.
    """

    weights: torch.Tensor
    logits: torch.Tensor | None
    turn_mask: torch.Tensor
    fresh: torch.Tensor
    state: GateState


class TurnGate(nn.Module):
    """Maps each turn's pooled context to weights over the experts.

    Args:
        hidden_size: width of the hidden states it reads.
        num_experts: number of experts ``E``.
        gate_hidden_size: width of the hidden layer; 0 for a single linear layer.
        gate_type: ``"soft"`` or ``"top_k"``.
        top_k: experts kept per turn for ``"top_k"``.
        temperature: softmax temperature.
        memory: ``"none"``, ``"ema"`` or ``"gru"``.
        memory_decay: weight of the past in the ``"ema"`` memory.
        memory_size: width of the ``"gru"`` state.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        gate_hidden_size: int,
        gate_type: str,
        top_k: int,
        temperature: float,
        memory: str,
        memory_decay: float,
        memory_size: int = 0,
    ):
        super().__init__()
        self.num_experts = num_experts
        self.gate_type = gate_type
        self.top_k = top_k
        self.temperature = temperature
        self.memory = memory
        self.memory_decay = memory_decay
        self.norm = nn.LayerNorm(hidden_size)
        reads = hidden_size
        if memory == "gru":
            if memory_size < 1:
                raise ValueError(f"a \"gru\" gate memory needs memory_size >= 1, got {memory_size}")
            self.cell = nn.GRUCell(hidden_size + num_experts, memory_size)  # input: the turn's pool, the last decision
            reads = hidden_size + memory_size
        if gate_hidden_size > 0:
            self.proj = nn.Sequential(nn.Linear(reads, gate_hidden_size), nn.GELU(), nn.Linear(gate_hidden_size, num_experts))
        else:
            self.proj = nn.Linear(reads, num_experts)

    def pool_turns(
        self, hidden: torch.Tensor, turn_ids: torch.Tensor, gate_mask: torch.Tensor, num_turns: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean of the RMS-normalised readable states of each turn.

        Args:
            hidden: ``[batch, seq, hidden]``.
            turn_ids: ``[batch, seq]``, -1 on padding.
            gate_mask: ``[batch, seq]``, 1 where the gate may read.
            num_turns: number of turns ``T`` to pool.

        Returns:
            ``[batch, T, hidden]`` pooled states and ``[batch, T]`` readable-token counts.
        """
        states = hidden.float()
        states = states * torch.rsqrt(states.pow(2).mean(-1, keepdim=True) + 1e-6)  # [batch, seq, hidden]
        turns = torch.arange(num_turns, device=hidden.device)
        readable = (gate_mask > 0) & (turn_ids >= 0)  # [batch, seq]
        member = (turn_ids.unsqueeze(-1) == turns) & readable.unsqueeze(-1)  # [batch, seq, T]
        counts = member.sum(1)  # [batch, T]
        sums = torch.einsum("bst,bsh->bth", member.to(states.dtype), states)  # [batch, T, hidden]
        return sums / counts.clamp(min=1).unsqueeze(-1).to(states.dtype), counts

    def contexts(
        self, pooled: torch.Tensor, counts: torch.Tensor, carried: torch.Tensor, state: GateState | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What the gate sees for each turn: its own pool, or the ``"ema"`` memory.

        Args:
            pooled: ``[batch, T, hidden]``; counts: ``[batch, T]``;
            carried: ``[batch, T]`` turns whose decision comes from ``state``.
            state: the previous forward's state, or None.

        Returns:
            ``[batch, T, hidden]`` contexts and the ``[batch, hidden]`` memory after the last turn.
        """
        if self.memory == "none":
            return pooled, None
        batch, num_turns, _ = pooled.shape
        prev = state.memory if state is not None and state.memory is not None else pooled.new_zeros(batch, pooled.shape[-1])
        started = torch.full((batch,), state is not None and state.memory is not None, device=pooled.device)
        out = []
        for k in range(num_turns):
            has = counts[:, k] > 0
            mixed = torch.where(started.unsqueeze(-1), self.memory_decay * prev + (1 - self.memory_decay) * pooled[:, k], pooled[:, k])
            ctx = torch.where(has.unsqueeze(-1) & ~carried[:, k].unsqueeze(-1), mixed, prev)  # [batch, hidden]
            started = started | has
            prev = ctx
            out.append(ctx)
        return torch.stack(out, 1), prev

    def decide(
        self, pooled: torch.Tensor, counts: torch.Tensor, carried: torch.Tensor, state: GateState | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The logits of every turn from the turns' pools, and the memory after the last one.

        Args:
            pooled: ``[batch, T, hidden]`` from :meth:`pool_turns`; counts: ``[batch, T]``;
            carried: ``[batch, T]`` turns whose decision comes from ``state``.
            state: the previous forward's state, or None.

        Returns:
            ``[batch, T, E]`` float32 logits (those of carried turns or turns without readable
            tokens are not used) and the memory to carry (see :attr:`GateState.memory`).
        """
        if self.memory == "gru":
            return self.recur(pooled, counts, carried, state)
        ctx, memory = self.contexts(pooled, counts, carried, state)
        return self.proj(self.norm(ctx.to(self.norm.weight.dtype))).float(), memory

    def recur(
        self, pooled: torch.Tensor, counts: torch.Tensor, carried: torch.Tensor, state: GateState | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``"gru"`` gate: turn by turn, the cell reads the turn's pool and the previous
        decision, and the logits read the turn's pool and the cell's new state.

        Args: as for :meth:`decide`.
        """
        batch, num_turns, _ = pooled.shape
        x = self.norm(pooled.to(self.norm.weight.dtype))  # [batch, T, hidden]
        memory = state.memory if state is not None else None
        h = memory if memory is not None else x.new_zeros(batch, self.cell.hidden_size)  # [batch, M]
        last = x.new_zeros(batch, self.num_experts)  # [batch, E] the previous turn's decision
        if state is not None:
            index = state.last_turn.clamp(min=0).view(-1, 1, 1).expand(-1, 1, self.num_experts)
            last = (state.turn_weights.gather(1, index).squeeze(1) * (state.last_turn >= 0).unsqueeze(-1)).to(x.dtype)
        logits = []
        for k in range(num_turns):
            deciding = ((counts[:, k] > 0) & ~carried[:, k]).unsqueeze(-1)  # [batch, 1]
            h_new = self.cell(torch.cat([x[:, k], last], -1), h)  # [batch, M]
            logit = self.proj(torch.cat([x[:, k], h_new], -1)).float()  # [batch, E]
            h = torch.where(deciding, h_new, h)
            last = torch.where(deciding, self.route(logit).detach().to(x.dtype), last)
            logits.append(logit)
        return torch.stack(logits, 1), h

    def route(self, logits: torch.Tensor) -> torch.Tensor:
        """Softmax (with temperature), then top-k renormalised for ``"top_k"`` gates.

        Args:
            logits: ``[..., E]``.
        """
        probs = F.softmax(logits.float() / self.temperature, dim=-1)
        if self.gate_type == "soft":
            return probs
        top_w, top_i = probs.topk(self.top_k, dim=-1)
        return torch.zeros_like(probs).scatter(-1, top_i, top_w / top_w.sum(-1, keepdim=True))

    def forward(
        self,
        hidden: torch.Tensor,
        turn_ids: torch.Tensor,
        gate_mask: torch.Tensor,
        state: GateState | None = None,
        forced: torch.Tensor | None = None,
    ) -> GateOutput:
        """Decides every turn that has tokens in this forward.

        Args:
            hidden: ``[batch, seq, hidden]`` states entering the gate layer.
            turn_ids: ``[batch, seq]`` exchange index of each token, -1 on padding.
            gate_mask: ``[batch, seq]`` 1 where the gate may read.
            state: carried from the previous forward when a KV cache is reused.
            forced: ``[E]`` weights to use for every turn instead of the gate's own, or
                ``[batch, E]`` one mixture per row.
        """
        batch = hidden.shape[0]
        device = hidden.device
        valid = turn_ids >= 0
        last_turn = torch.where(valid, turn_ids, -1).amax(1)  # [batch]
        if state is not None:
            last_turn = torch.maximum(last_turn, state.last_turn)
        num_turns = max(int(last_turn.max()) + 1, 1)
        turns = torch.arange(num_turns, device=device)
        present = ((turn_ids.unsqueeze(-1) == turns) & valid.unsqueeze(-1)).any(1)  # [batch, T]
        carried = torch.zeros(batch, num_turns, dtype=torch.bool, device=device)
        if state is not None:
            carried = turns <= state.last_turn.unsqueeze(-1)
        fresh = present & ~carried

        logits = None
        memory = state.memory if state is not None else None
        if forced is not None:
            if forced.dim() == 2 and forced.shape[0] != batch:
                raise ValueError(
                    f"force_gate was given {forced.shape[0]} per-row mixtures for a batch of {batch} rows; with "
                    "num_beams or num_return_sequences = k, give each row's choice k times in a row "
                    "(e.g. [name for name in names for _ in range(k)], or weights.repeat_interleave(k, 0))"
                )
            rows = forced.float().to(device).view(-1, 1, self.num_experts)  # [batch or 1, 1, E]
            weights = rows.expand(batch, num_turns, -1).clone()
        elif fresh.any():
            pooled, counts = self.pool_turns(hidden, turn_ids, gate_mask, num_turns)
            logits, memory = self.decide(pooled, counts, carried, state)  # [batch, T, E]
            weights = self.route(logits)
        else:
            weights = hidden.new_zeros(batch, num_turns, self.num_experts, dtype=torch.float32)
        if state is not None:
            known = state.turn_weights.shape[1]
            old = F.pad(state.turn_weights, (0, 0, 0, max(num_turns - known, 0)))[:, :num_turns]
            weights = torch.where(carried.unsqueeze(-1), old.to(weights.dtype), weights)
        turn_mask = present | carried
        weights = weights * turn_mask.unsqueeze(-1)
        return GateOutput(weights, logits, turn_mask, fresh, GateState(weights.detach(), last_turn, memory))

