import ast
import dataclasses
import json
import string
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

import moe_empathy.eval as eval_pkg
from moe_empathy.eval import EmpathyScore, get_scorer
from moe_empathy.eval.scoring import mechanisms_to_score
from moe_empathy.cli import build_parser
from moe_empathy.eval.calibration import load_hand_items
from moe_empathy.eval.validate_scorers import validate_scorers
from moe_empathy.train.phrases import load_phrases

EVAL_DIR = Path(eval_pkg.__file__).parent
SCORER_MODULES = ["scoring.py", "scorers.py", "lexical.py", "embedding.py", "judge.py", "validate_scorers.py", "calibration.py", "helpfulness.py", "rated_sample.py"]
# what the scorers may take from train, neither holding any phrasing: the shared names of levels
# and mechanisms, and the chat-model loader (the judge's)
FROM_TRAIN = ("moe_empathy.train.taxonomy", "moe_empathy.train.chat_model")

CONTEXT = "My sister died last week and I have to sort out her flat. Where do I even start?"
FLAT = "Start with the lease: tell the landlord in writing and ask about the notice period."
WARM = ("I'm so sorry about your sister. Clearing her home while you're grieving must feel "
        "unbearable at times, and it's okay to go slowly. Start with the lease and the landlord. "
        "How are you holding up, and is anyone helping you with this?")


@pytest.fixture(scope="module")
def lexical():
    return get_scorer("lexical", calibrated=False)


@pytest.fixture(scope="module")
def embedding():
    return get_scorer("embedding", calibrated=False)


def _check(scores, n):
    assert len(scores) == n
    for s in scores:
        assert isinstance(s, EmpathyScore)
        assert 1.0 <= s.score <= 5.0
        assert set(s.mechanisms) == {"emotional_reaction", "interpretation", "exploration"}
        assert all(v in (0, 1, 2) for v in s.mechanisms.values())


@pytest.mark.parametrize("name", ["lexical", "embedding"])
def test_clear_cut_ordering(name, lexical, embedding):
    scorer = {"lexical": lexical, "embedding": embedding}[name]
    flat, warm = scorer.score([FLAT, WARM], [CONTEXT, [{"role": "user", "content": CONTEXT}]])
    _check([flat, warm], 2)
    assert warm.score > flat.score + 1.0
    assert sum(warm.mechanisms.values()) > sum(flat.mechanisms.values())
    assert warm.mechanisms["exploration"] == 2 and flat.mechanisms["exploration"] == 0


def test_bad_inputs_are_named(lexical):
    with pytest.raises(ValueError, match="2 responses but 1 contexts"):
        lexical.score(["a", "b"], ["c"])
    with pytest.raises(ValueError, match=r"responses\[1\] is empty"):
        lexical.score(["fine", "  "], None)
    with pytest.raises(TypeError, match=r"responses\[0\] is int"):
        lexical.score([3], None)
    with pytest.raises(TypeError, match="wrap a single response"):
        lexical.score("just a string", None)
    with pytest.raises(TypeError, match="context must be a string or a list"):
        lexical.score(["ok"], [42])
    with pytest.raises(ValueError, match="unknown scorer 'vibes'.*lexical"):
        get_scorer("vibes")
    assert lexical.score([], []) == []


def test_score_scale_bounds():
    assert mechanisms_to_score({"emotional_reaction": 0, "interpretation": 0, "exploration": 0}) == 1.0
    assert mechanisms_to_score({"emotional_reaction": 2, "interpretation": 2, "exploration": 2}) == 5.0


def test_hand_labelled_set_is_well_formed():
    data = [json.loads(line) for line in (EVAL_DIR / "data" / "hand_labelled.jsonl").read_text().splitlines()]
    assert 40 <= len(data) <= 80
    assert len({d["id"] for d in data}) == len(data)
    for d in data:
        assert d["response"].strip() and d["context"].strip()
        assert d["score"] in range(1, 6)
        assert all(d["mechanisms"][m] in (0, 1, 2) for m in ("emotional_reaction", "interpretation", "exploration"))
    assert {d["score"] for d in data} == {1, 2, 3, 4, 5}
    assert len(load_hand_items()) == len(data)


def test_validation_report_and_cli(tmp_path, capsys):
    report = validate_scorers(["lexical"])
    lexical = report["scorers"]["lexical"]
    assert lexical["devset_heldout"]["raw"]["n"] == report["sets"]["devset_heldout"]["n"] > 100
    sets = report["sets"]  # each set of model-written replies, and their held-out parts together
    assert sets["model_heldout"]["n"] == sets["devset_heldout"]["n"] + sets["recent_heldout"]["n"] and sets["recent_heldout"]["n"] > 100
    assert lexical["hand_heldout"]["raw"]["spearman"] > 0.3  # agrees with the hand labels, far from chance
    # the constant reference has no ranking and one MAE whether "calibrated" or not
    assert report["sets"]["devset_heldout"]["constant"]["spearman"] is None
    parser = build_parser()
    args = parser.parse_args(["eval", "scorers", "--scorers", "lexical", "--json", str(tmp_path / "r.json")])
    args.func(args)
    out = capsys.readouterr().out
    assert "| lexical |" in out and "| constant" in out
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["scorers"]["lexical"]["devset_heldout"]["calibrated"]["mae"] == pytest.approx(
        lexical["devset_heldout"]["calibrated"]["mae"])
    with pytest.raises(ValueError, match="unknown scorer"):
        args.func(parser.parse_args(["eval", "scorers", "--scorers", "lexical,nope"]))


# ---------------------------------------------------------------- no shared inventory


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names.append("." * node.level + (node.module or ""))
            names += [a.name for a in node.names]
    return names


def _strings(obj):
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _strings(v)


def _fragments(template: str, words: int):
    """Literal pieces of a generator template (between placeholders) of ``words``+ words."""
    for literal, *_ in string.Formatter().parse(template):
        piece = literal.strip(" ,.;:!?-").lower()
        if len(piece.split()) >= words:
            yield piece


def _inventory(words: int) -> set[str]:
    return {frag for s in _strings(dataclasses.asdict(load_phrases())) for frag in _fragments(s, words)}


def test_scorers_do_not_read_the_generator_inventory():
    inventory = _inventory(3)
    assert len(inventory) > 200
    for module in SCORER_MODULES:
        path = EVAL_DIR / module
        for imported in _imports(path):
            assert imported in FROM_TRAIN or not any(word in imported for word in ("train", "phrases", "synth")), (
                f"{module} imports {imported}")
        source = path.read_text().lower()
        shared = [frag for frag in inventory if frag in source]
        assert not shared, f"{module} contains generator phrases: {shared[:5]}"
    # the hand-written set shares everyday three-word phrases with the generator, but
    # no longer stretch of its wording
    hand = (EVAL_DIR / "data" / "hand_labelled.jsonl").read_text().lower()
    assert not [frag for frag in _inventory(5) if frag in hand]


# ---------------------------------------------------------------- judge


@pytest.fixture(scope="module")
def tiny_chat_model(tokenizer):
    from tests.moe_empathy.conftest import tiny_base

    return tiny_base(vocab_size=len(tokenizer)), tokenizer


def test_judge_local_model(tiny_chat_model):
    judge = get_scorer("judge", calibrated=False, model=tiny_chat_model, batch_size=2)
    scores = judge.score([FLAT, WARM, "Sure."], [CONTEXT, CONTEXT, ""])
    _check(scores, 3)
    again = get_scorer("judge", calibrated=False, model=tiny_chat_model, batch_size=3).score([FLAT, WARM, "Sure."],
                                                                          [CONTEXT, CONTEXT, ""])
    # left padding: a prompt's rating does not depend on its batch mates
    assert [s.score for s in again] == pytest.approx([s.score for s in scores], abs=1e-4)


class _StubHandler(BaseHTTPRequestHandler):
    """OpenAI-compatible stub: rates 5 when the reply mentions 'sorry', else 1."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append((self.path, self.headers.get("Authorization"), body))
        prompt = body["messages"][-1]["content"]
        warm = "sorry" in prompt.split("Assistant reply to rate:")[1].lower()
        scale = "12345" if "(1, 2, 3, 4, 5)" in prompt else "012"
        top = scale[-1] if warm else scale[0]
        logprobs = [{"token": top, "logprob": -0.1}, {"token": scale[1], "logprob": -2.4}]
        answer = {"choices": [{"message": {"role": "assistant", "content": top},
                               "logprobs": {"content": [{"token": top, "logprob": -0.1,
                                                         "top_logprobs": logprobs}]}}]}
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_judge_http_endpoint_against_local_stub():
    server = HTTPServer(("127.0.0.1", 0), _StubHandler)
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        judge = get_scorer("judge", calibrated=False, endpoint=f"http://127.0.0.1:{server.server_port}/v1",
                           endpoint_model="stub", api_key="test-key", timeout=10)
        flat, warm = judge.score([FLAT, WARM], [CONTEXT, CONTEXT])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    _check([flat, warm], 2)
    assert warm.score > 4.0 > 2.0 > flat.score
    assert warm.mechanisms == {"emotional_reaction": 2, "interpretation": 2, "exploration": 2}
    assert len(server.requests) == 8  # 4 rubric questions x 2 responses
    path, auth, body = server.requests[0]
    assert path == "/v1/chat/completions" and auth == "Bearer test-key"
    assert body["model"] == "stub" and body["max_tokens"] == 1 and body["logprobs"] is True


@pytest.mark.slow
def test_judge_with_embedded_smollm2_orders_clear_cut_examples():
    flat, warm = get_scorer("judge", calibrated=False).score([FLAT, WARM], [CONTEXT, CONTEXT])
    assert warm.score > flat.score


def test_embedding_gives_no_credit_for_warmth_the_user_gave_no_cause_for(embedding):
    reply = "I'm so sorry you're going through this; it's a lot. Check that the printer is on the same network."
    neutral = [{"role": "user", "content": "My printer says it's offline. What should I check?"}]
    distressed = [{"role": "user", "content": "My mother died last night and I can't stop shaking."}]
    on_neutral, on_distressed, alone = embedding.score([reply] * 3, [neutral, distressed, ""])
    assert on_neutral.score < on_distressed.score
    assert on_neutral.mechanisms["emotional_reaction"] <= on_distressed.mechanisms["emotional_reaction"]
    assert alone.score == pytest.approx(on_distressed.score, abs=0.05)  # no context: nothing discounted
    assert embedding.distress([[]]) == [1.0]
    alone_string = embedding.score([reply], [neutral[0]["content"]])[0]  # a string is one user message
    assert alone_string.score == pytest.approx(on_neutral.score, abs=1e-5) and alone_string.mechanisms == on_neutral.mechanisms


def test_embedding_reads_a_multi_line_user_message_whole(embedding):
    message = "Quick question about my printer.\nMy mother died last night and I can't stop shaking."
    whole, first_line = embedding.distress([[{"role": "user", "content": message}],
                                            [{"role": "user", "content": message.splitlines()[0]}]])
    assert whole > first_line
    assert embedding.distress([[{"role": "assistant", "content": message}]]) == [1.0]  # only the user's words count


def test_embedding_reads_the_speakers_own_feelings_as_no_empathy(embedding):
    # Degenerate replies in which the assistant talks about itself; raters give them 1.
    own = ["I'm sobbing. I'm exhausted. I'm falling apart.", "I'm so amazing and I'm so happy with myself."]
    sympathy = "I'm so sorry about your sister; losing her must hurt so much."
    *selfish, kind = embedding.score(own + [sympathy], [CONTEXT] * 3)
    for score in selfish:
        assert score.mechanisms["emotional_reaction"] == 0
        assert score.score < kind.score - 0.5
