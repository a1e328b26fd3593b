"""Harmony through openai-harmony: the vocabulary, rendering, channel parsing, and a real round trip
on tiny-gpt-oss (render → generate → reasoning and content split)."""

from __future__ import annotations

import hashlib
import json

import pytest

from shared.contract import ChatMessage, JobRequest
from shared.harmony import HarmonyChat
from shared.registry import model_spec
from shared.settings import Settings
from shared.vocab import VOCAB_FILE, VOCAB_SHA256, ranks_file
from workers.output import OutputText
from workers.runtime import ModelRuntime
from workers.tiny_model import CONVERSATIONS, STOP_TOKEN_IDS


@pytest.fixture(scope="module")
def chat() -> HarmonyChat:
    return HarmonyChat(Settings().vocab_dir())


@pytest.fixture(scope="module")
def tiny(prepared_models) -> ModelRuntime:  # type: ignore[no-untyped-def]
    return ModelRuntime.load(model_spec("tiny-gpt-oss"), prepared_models)


def ask(question: str, **params: object) -> JobRequest:
    return JobRequest(messages=[ChatMessage(role="user", content=question)], temperature=0, **params)


def test_ranks_file_rebuilds_tiktoken_lines() -> None:
    source = "export default " + json.dumps({"bpe_ranks": "! 0 IQ== Ig==\n! 5 Iw==\n", "pat_str": ""}) + ";"
    assert ranks_file(source) == b"IQ== 0\nIg== 1\nIw== 5\n"


def test_provisioned_vocab_is_openais_file() -> None:
    content = (Settings().vocab_dir() / VOCAB_FILE).read_bytes()
    assert hashlib.sha256(content).hexdigest() == VOCAB_SHA256


def test_render_carries_effort_and_developer_instructions(chat: HarmonyChat) -> None:
    request = JobRequest(
        messages=[
            ChatMessage(role="system", content="Answer in French."),
            ChatMessage(role="user", content="Hi"),
        ],
        reasoning_effort="high",
    )
    text = chat.decode(chat.render(request))
    assert text.startswith("<|start|>system<|message|>") and "Reasoning: high" in text
    assert "<|start|>developer<|message|># Instructions\n\nAnswer in French.<|end|>" in text
    assert text.endswith("<|start|>user<|message|>Hi<|end|><|start|>assistant")
    assert sorted(chat.stop_token_ids()) == STOP_TOKEN_IDS  # <|return|> and <|call|>, not <|end|>


def test_earlier_answers_go_back_as_final_messages(chat: HarmonyChat) -> None:
    turns = [("user", "2+2?"), ("assistant", "4"), ("user", "And 3+3?")]
    request = JobRequest(messages=[ChatMessage(role=r, content=c) for r, c in turns])  # type: ignore[arg-type]
    assert "<|start|>assistant<|channel|>final<|message|>4<|end|>" in chat.decode(chat.render(request))


def test_parser_splits_channels_as_tokens_stream(chat: HarmonyChat) -> None:
    ids = chat.encode(
        "<|channel|>analysis<|message|>Think.<|end|><|start|>assistant<|channel|>final<|message|>Done.<|return|>"
    )
    parser = chat.parser()
    deltas = [d for d in (parser.feed(t) for t in ids) if d is not None]
    assert [d.channel for d in deltas] == ["analysis"] * len(deltas[:-2]) + ["final"] * 2 or deltas
    assert {d.channel for d in deltas} == {"analysis", "final"}
    assert parser.reasoning == "Think." and parser.content == "Done." and parser.valid


def test_broken_output_becomes_final_text(chat: HarmonyChat) -> None:
    parser = chat.parser()
    for token in chat.encode("<|channel|>final<|message|>Hi<|end|>Hello there"):  # no header after <|end|>
        parser.feed(token)
    parser.finish()
    assert not parser.valid and parser.content == "HiHello there"


def test_stop_strings_cut_final_and_hold_back_a_possible_start() -> None:
    output = OutputText(["STOP"])
    assert output.add("analysis", "no STOP here") == [("analysis", "no STOP here")]  # not the final channel
    assert output.add("final", "abcST") == [("final", "ab")]  # "cST" could begin "STOP"
    assert output.add("final", "OPxyz") == [("final", "c")]
    assert output.stopped and output.text("final") == "abc" and output.flush() == []


def test_round_trip_on_tiny_gpt_oss(tiny: ModelRuntime) -> None:
    question, analysis, final = CONVERSATIONS[0]
    pieces: list[tuple[str, str]] = []
    generation = tiny.generate(ask(question, max_tokens=80), None, lambda c, t: pieces.append((c, t)))
    assert generation.reasoning == analysis
    assert generation.text == final
    assert generation.finish_reason == "stop" and generation.token_ids[-1] == 200002  # <|return|>
    assert "".join(t for c, t in pieces if c == "analysis") == analysis
    assert "".join(t for c, t in pieces if c == "final") == final
    channels = [c for c, _ in pieces]
    assert channels == sorted(channels)  # every analysis piece before the first final one


def test_every_reasoning_effort_answers(tiny: ModelRuntime) -> None:
    question, analysis, final = CONVERSATIONS[1]
    for effort in ("low", "medium", "high"):
        generation = tiny.generate(ask(question, max_tokens=80, reasoning_effort=effort))
        assert (generation.reasoning, generation.text) == (analysis, final)


def test_stop_string_on_real_output(tiny: ModelRuntime) -> None:
    question, _, final = CONVERSATIONS[0]
    generation = tiny.generate(ask(question, max_tokens=80, stop=["Paris"]))
    assert generation.text == final[: final.index("Paris")] and generation.finish_reason == "stop"
