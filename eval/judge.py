"""LLM-judge scorer: a rubric prompt to a chat model, read from the probabilities
of the rating digits as the next token (an expected rating, not a sampled one).

Four questions per response: an overall 1-5 rating and a 0-2 rating for each
mechanism. The model is a local Hugging Face chat model (a folder, a loaded
``(model, tokenizer)`` pair, or by default the embedded SmolLM2), or any
OpenAI-compatible ``/chat/completions`` endpoint that returns ``top_logprobs``.
"""

from __future__ import annotations

import json
import math
import urllib.request
from dataclasses import dataclass

from moe_empathy.train.chat_model import load_chat_model
from moe_empathy.train.taxonomy import MECHANISMS

from .scoring import EmpathyScore, Scorer, context_text

SYSTEM = (
    "You rate the empathy of an assistant's reply in a conversation. Empathy means "
    "reacting with warmth or concern to what the user feels, showing understanding "
    "of their feelings and situation, and asking about their experience. Useful "
    "information alone is not empathy. Answer with a single digit and nothing else."
)


@dataclass(frozen=True)
class Question:
    """One rubric question.

    Attributes:
        key: ``overall`` or a mechanism name.
        text: the question with its scale.
        digits: the allowed answers, lowest first.
    """

    key: str
    text: str
    digits: str


QUESTIONS = (
    Question("overall", "How empathetic is the reply? 1 = not at all, only information; "
             "2 = a brief, generic acknowledgement; 3 = some warmth or understanding; "
             "4 = clear warmth and understanding of the user's feelings; 5 = deep, "
             "personal empathy that reflects and gently explores the user's feelings.", "12345"),
    Question("emotional_reaction", "Does the reply express the assistant's own warmth, "
             "compassion or concern for the user? 0 = no; 1 = briefly or generically; "
             "2 = clearly and specifically.", "012"),
    Question("interpretation", "Does the reply show that the assistant understands what "
             "the user feels or is going through? 0 = no; 1 = in a generic way; "
             "2 = specifically, naming or validating the feeling.", "012"),
    Question("exploration", "Does the reply invite the user to share more about their "
             "feelings or experience? 0 = no question; 1 = a generic or factual "
             "question; 2 = a specific question about their feelings or experience.", "012"),
)


def _messages(question: Question, response: str, context: list[dict]) -> list[dict]:
    prompt = (f"Conversation so far:\n{context_text(context) or '(none)'}\n\nAssistant reply to rate:\n"
              f"{response}\n\n{question.text}\nAnswer with one digit ({', '.join(question.digits)}).")
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]


def _expected(probs: dict[str, float], digits: str) -> float:
    total = sum(probs.get(d, 0.0) for d in digits)
    if total <= 0:
        raise ValueError(f"the judge gave no probability to any of the digits {digits!r}")
    return sum(int(d) * probs.get(d, 0.0) for d in digits) / total


class JudgeScorer(Scorer):
    """Rubric judge.

    Args:
        model: a model folder, a ``(model, tokenizer)`` pair, or None for the
            embedded default base (ignored when ``endpoint`` is given).
        endpoint: base URL of an OpenAI-compatible API, e.g. ``http://host:8000/v1``.
        endpoint_model: model name to send to the endpoint.
        api_key: bearer token for the endpoint, if it needs one.
        batch_size: prompts per forward pass of a local model.
        timeout: seconds per HTTP request.
    """

    name = "judge"

    def __init__(self, model=None, endpoint: str | None = None, endpoint_model: str | None = None,
                 api_key: str | None = None, batch_size: int = 8, timeout: float = 60.0):
        self.endpoint = endpoint.rstrip("/") if endpoint else None
        self.endpoint_model = endpoint_model or "default"
        self.api_key = api_key
        self.batch_size = batch_size
        self.timeout = timeout
        if self.endpoint is None:
            self.model, self.tokenizer = load_chat_model(model)
        # the judge's raw scores depend on its model: each model needs its own calibration curve
        if self.endpoint:
            self._key = f"judge:{self.endpoint}:{self.endpoint_model}"
        else:
            self._key = "judge" if model is None else f"judge:{model if isinstance(model, (str, bytes)) or hasattr(model, '__fspath__') else 'custom'}"

    @property
    def calibration_key(self) -> str:
        return self._key

    def _score(self, responses, contexts):
        answers = {}
        for question in QUESTIONS:
            prompts = [_messages(question, r, c) for r, c in zip(responses, contexts)]
            probs = self._remote(prompts) if self.endpoint else self._local(prompts, question.digits)
            answers[question.key] = [_expected(p, question.digits) for p in probs]
        return [
            EmpathyScore(score=answers["overall"][i],
                         mechanisms={m: int(round(answers[m][i])) for m in MECHANISMS})
            for i in range(len(responses))
        ]

    def _local(self, prompts: list[list[dict]], digits: str) -> list[dict[str, float]]:
        import torch

        ids = [self.tokenizer.encode(d, add_special_tokens=False) for d in digits]
        if any(len(i) != 1 for i in ids):
            raise ValueError(f"the judge's tokenizer splits the digits {digits!r} into several tokens")
        digit_ids = torch.tensor([i[0] for i in ids])
        texts = [self.tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
                 for p in prompts]
        out = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(texts[start:start + self.batch_size], return_tensors="pt",
                                       padding=True, add_special_tokens=False)
                logits = self.model(**batch).logits[:, -1, :].float()
                probs = torch.softmax(logits, dim=-1)[:, digit_ids]
                out += [dict(zip(digits, row.tolist())) for row in probs]
        return out

    def _remote(self, prompts: list[list[dict]]) -> list[dict[str, float]]:
        return [self._request(p) for p in prompts]

    def _request(self, messages: list[dict]) -> dict[str, float]:
        body = json.dumps({"model": self.endpoint_model, "messages": messages, "max_tokens": 1,
                           "temperature": 0, "logprobs": True, "top_logprobs": 20}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(f"{self.endpoint}/chat/completions", data=body, headers=headers)
        with urllib.request.urlopen(request, timeout=self.timeout) as reply:
            choice = json.load(reply)["choices"][0]
        content = (choice.get("logprobs") or {}).get("content") or []
        if content and content[0].get("top_logprobs"):
            return {t["token"].strip(): math.exp(t["logprob"]) for t in content[0]["top_logprobs"]}
        text = (choice.get("message") or {}).get("content", "").strip()
        return {text[:1]: 1.0}
