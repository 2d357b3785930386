"""``moe-empathy demo`` and ``chat`` on a saved tiny model."""

import io
import json

from moe_empathy.cli import chat, main


def test_demo_writes_transcript_and_plot(saved_model, tmp_path):
    assert main(["demo", "--model", str(saved_model), "--out", str(tmp_path / "demo"), "--max-new-tokens", "3"]) == 0
    data = json.loads((tmp_path / "demo" / "demo.json").read_text())
    turns = data["dialogues"]["tech_support_to_thesis_loss"]
    assert len(turns) == 4 and all(abs(sum(t["gate"].values()) - 1) < 1e-5 for t in turns)
    assert (tmp_path / "demo" / "gate_over_turns.png").stat().st_size > 0
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == ["demo.json", "gate_over_turns.png"]  # no staging files left


def test_the_default_model_comes_from_the_environment_variable(saved_model, tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_EMPATHY_CHECKPOINT", str(saved_model))
    assert main(["demo", "--out", str(tmp_path / "demo"), "--max-new-tokens", "2"]) == 0
    assert json.loads((tmp_path / "demo" / "demo.json").read_text())["model"] == str(saved_model)


def test_chat_shows_the_gate_for_each_reply(saved_model, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("hello there\nmy cat died\n\n"))
    assert main(["chat", "--model", str(saved_model), "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("gate, turn") == 2 and "gate, turn 1" in out
    assert all(name in out for name in ("low", "medium", "high"))


def test_ctrl_c_during_a_reply_keeps_the_conversation_and_goes_on(saved_model, monkeypatch, capsys):
    real_reply = chat.reply
    seen = []

    def reply(model, tokenizer, messages, max_new_tokens):
        seen.append([m["content"] for m in messages])
        if len(seen) == 2:
            raise KeyboardInterrupt  # Ctrl-C while the second reply is generated
        return real_reply(model, tokenizer, messages, max_new_tokens)

    monkeypatch.setattr(chat, "reply", reply)
    monkeypatch.setattr("sys.stdin", io.StringIO("hello there\nmy cat died\nare you there?\n"))
    assert main(["chat", "--model", str(saved_model), "--max-new-tokens", "3"]) == 0  # ends at end of input (Ctrl-D)
    out = capsys.readouterr().out
    assert "reply abandoned" in out and "Traceback" not in out
    assert seen[1] == [seen[0][0], seen[2][1], "my cat died"]
    assert seen[2] == [seen[0][0], seen[2][1], "are you there?"]  # the abandoned message is dropped, the rest kept
    assert out.count("gate, turn") == 2 and "gate, turn 1" in out


def test_ctrl_c_at_the_prompt_ends_the_chat(saved_model, monkeypatch):
    class CtrlC:
        def readline(self, *args):
            raise KeyboardInterrupt

    monkeypatch.setattr("sys.stdin", CtrlC())
    assert main(["chat", "--model", str(saved_model), "--max-new-tokens", "3"]) == 0


def test_info_without_model_lists_the_stack(capsys):
    assert main(["info", "--no-model"]) == 0
    assert "transformers" in capsys.readouterr().out


def test_info_summarises_a_model(saved_model, capsys):
    assert main(["info", "--model", str(saved_model)]) == 0
    out = capsys.readouterr().out
    assert "low, medium, high" in out and "trainable of" in out
