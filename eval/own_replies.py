"""Warming the gate of a trained checkpoint up again on contexts that hold its own replies.

``python -m moe_empathy.eval.own_replies --model DIR --config CONFIG --out DIR`` first plays
every dialogue of the config's warm-up corpus with the checkpoint itself (its gate choosing the
experts; greedy, with the evaluation's repeat guard and reply cap), then runs the warm-up
(:func:`moe_empathy.train.gate_rewarm.rewarm`, same checks) on contexts that hold those
replies, with the script's labels. The played dialogues go to ``own_replies.jsonl`` in ``--out``.

This is one round of DAgger (Ross et al., 2011). A gate warmed up on the corpus's replies meets
the model's own in generation: shorter, cut at the reply cap, and at the level the gate chose,
right or wrong, so that one wrong choice colours the next turn's context and the error
repeats. Trained on its own rollouts, the gate sees such contexts with the right labels.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from moe_empathy.errors import run_command
from moe_empathy.modeling_moe_empathy import MoeEmpathyForCausalLM
from moe_empathy.train.gate_rewarm import build_parser, rewarm
from moe_empathy.utils import atomic_write_text

from .rollout import progress_bar, rollout
from .systems import build_systems

OWN_REPLIES_FILE = "own_replies.jsonl"


class OwnReplies:
    """Swaps the replies of dialogue records for the model's own (a
    :class:`~moe_empathy.train.gate_rewarm.ContextReplies`).

    Args:
        model: the gated model; its gate chooses the experts while it plays.
        tokenizer: its tokenizer.
        max_new_tokens: the reply cap (the evaluation's).
        batch_size: dialogues played together.
        turn_multiple: each dialogue is cut to a multiple of this many turns (one shorter than
            that is kept whole), so that more dialogues have one length and play in one batch.
    """

    description = "the model's own replies"

    def __init__(self, model: MoeEmpathyForCausalLM, tokenizer: PreTrainedTokenizerBase, max_new_tokens: int = 32,
                 batch_size: int = 24, turn_multiple: int = 4):
        if turn_multiple < 1:
            raise ValueError(f"--turn-multiple must be >= 1, got {turn_multiple}")
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.batch_size, self.turn_multiple = max_new_tokens, batch_size, turn_multiple
        self.played: list[dict] = []  # every played dialogue, for own_replies.jsonl

    def kept_turns(self, turns: int) -> int:
        """How many of a dialogue's ``turns`` (user-assistant pairs) are played."""
        return turns if turns < self.turn_multiple else turns - turns % self.turn_multiple

    def __call__(self, records: list[dict], split: str) -> list[dict]:
        """The records cut to :meth:`kept_turns`, every assistant reply the model's own; the
        user messages and labels are the script's.

        Args:
            records: one split's dialogue records.
            split: the split's name (kept with each played dialogue).
        """
        records = [{**r, "turns": r["turns"][: 2 * self.kept_turns(len(r["turns"]) // 2)]} for r in records]
        gated = build_systems(["gated"], self.model.eval(), self.tokenizer)[0]
        with progress_bar() as progress:
            played, _ = rollout([gated], records, self.tokenizer, self.batch_size, self.max_new_tokens, progress=progress)
        out = []
        for record, play in zip(records, played["gated"]):
            replies = iter(play.replies)
            out.append({**record, "turns": [{**t, "content": next(replies)} if t["role"] == "assistant" else t for t in record["turns"]]})
            self.played.append({"split": split, "dialogue_id": play.dialogue_id, "replies": play.replies, "levels": play.levels, "gate": play.gate})
        return out

    def write(self, folder: Path) -> None:
        """Writes the played dialogues to ``folder / own_replies.jsonl``."""
        atomic_write_text(folder / OWN_REPLIES_FILE, "".join(json.dumps(p) + "\n" for p in self.played))


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m moe_empathy.eval.own_replies``: plays, then warms the gate up again."""
    parser = build_parser("moe_empathy.eval.own_replies", __doc__.split("\n")[0])
    parser.add_argument("--reply-tokens", type=int, default=32, help="reply cap while playing (default 32, the evaluation's)")
    parser.add_argument("--batch-size", type=int, default=24, help="dialogues played together (default 24)")
    parser.add_argument("--turn-multiple", type=int, default=4,
                        help="dialogues are cut to a multiple of this many turns, so that more play in one batch (default 4)")
    args = parser.parse_args(argv)
    return run_command(lambda a: rewarm(a, lambda model, tokenizer: OwnReplies(model, tokenizer, a.reply_tokens, a.batch_size, a.turn_multiple)), args)


if __name__ == "__main__":
    sys.exit(main())
