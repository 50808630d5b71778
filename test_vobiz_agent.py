"""The Vobiz protocol and what a caller, Vobiz and an operator notice, as tests.

Each test runs the real server on a loopback port and drives it with the simulated Vobiz
from simulated_vobiz.py, which behaves as the project's protocol notes (from Vobiz's docs)
describe; the AI agent's providers are loopback stand-ins from there too.

The simulated Vobiz keeps one clock of 20 ms ticks per call. On every tick it
sends one `media` frame of the caller's audio (speech when the test has queued
some, quiet line noise otherwise) and plays one queued `playAudio` frame, as a
phone would hear it. Everything the tests assert is read off that timeline.
"""

from __future__ import annotations

import array
import base64
import dataclasses
import gc
import hashlib
import hmac
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import weakref
import xml.etree.ElementTree as ET
from contextlib import asynccontextmanager, suppress
from functools import partial
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import trio
import trio_websocket
import wsproto
import wsproto.events
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vobiz_agent
from simulated_vobiz import (
    CALL_LIMIT_S,
    CALL_UUID,
    HANG_UP,
    LOAD_ADMISSION_OFF,
    TICK,
    TRANSFER,
    OpenAIStandIn,
    Providers,
    Server,
    SimulatedVobiz,
    VobizApiStandIn,
    free_port,
    greeted,
    resemblance,
    speech,
    start_providers,
    start_server,
    tone,
    vobiz_call,
)
from vobiz_agent import audioop

HERE = os.path.dirname(os.path.abspath(__file__))


# ── The server under test ──


@pytest.fixture
async def server(nursery):
    return await start_server(nursery)


def call_tasks() -> list[str]:
    """Names of all tasks of any call still alive in this Trio run."""
    names = []
    todo = [trio.lowlevel.current_root_task()]
    while todo:
        task = todo.pop()
        names.append(task.name)
        todo.extend(child for nursery in task.child_nurseries for child in nursery.child_tasks)
    return [name for name in names if name.startswith("call ")]


# ── Answering: the <Stream> XML ──


def parse_answer(response: httpx.Response) -> ET.Element:
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/xml")
    root = ET.fromstring(response.content)
    assert root.tag == "Response"
    return root


@pytest.mark.parametrize("method", ["POST", "GET"])
async def test_answer_streams_the_call_to_our_websocket(server, method):
    fields = {"CallUUID": CALL_UUID, "From": "917983165036", "To": "07971442086", "Event": "StartApp"}
    if method == "POST":
        response = await server.post("/answer", data=fields)
    else:
        response = await server.get("/answer", params=fields)
    stream = parse_answer(response).find("Stream")
    host = server.url.removeprefix("http://")
    assert stream.text.startswith(f"ws://{host}/ws/{CALL_UUID}/")
    assert stream.attrib == {
        "bidirectional": "true", "audioTrack": "inbound", "keepCallAlive": "true",
        "contentType": "audio/x-mulaw;rate=8000", "statusCallbackUrl": f"{server.url}/stream-status",
        "statusCallbackMethod": "POST", "maxRetries": "3",
    }
    assert [child.tag for child in parse_answer(response)] == ["Stream", "Hangup"]


async def test_answer_honours_forwarded_headers_from_a_tunnel(server):
    response = await server.post("/answer", data={"CallUUID": CALL_UUID},
                                 headers={"X-Forwarded-Proto": "https", "X-Forwarded-Host": "abc.ngrok.app"})
    stream = parse_answer(response).find("Stream")
    assert stream.text.startswith(f"wss://abc.ngrok.app/ws/{CALL_UUID}/")
    assert stream.get("statusCallbackUrl") == "https://abc.ngrok.app/stream-status"


async def test_answer_uses_public_url_and_escapes_it(nursery):
    server = await start_server(nursery, public_url="https://calls.example.com/agent")
    response = await server.get("/answer", params={"CallUUID": CALL_UUID},
                                headers={"X-Forwarded-Host": "ignored.example"})
    stream = parse_answer(response).find("Stream")
    assert stream.text.startswith(f"wss://calls.example.com/agent/ws/{CALL_UUID}/")
    assert len(stream.text) < 120  # long stream URLs get truncated
    assert stream.get("statusCallbackUrl") == "https://calls.example.com/agent/stream-status"
    xml = vobiz_agent.stream_xml("wss://h/ws?a=1&b=2", "https://h/s", 3)
    assert b"a=1&amp;b=2" in xml and ET.fromstring(xml).find("Stream").text == "wss://h/ws?a=1&b=2"


async def test_hangup_posted_to_the_answer_url_opens_no_stream(server, caplog):
    caplog.set_level(logging.INFO, logger="vobiz_agent")
    response = await server.post("/answer", data={"CallUUID": CALL_UUID, "Event": "Hangup", "Duration": "11",
                                                  "HangupCause": "NORMAL_CLEARING", "HangupSource": "Caller"})
    root = parse_answer(response)
    assert list(root) == []
    assert any(CALL_UUID in r.message and "NORMAL_CLEARING" in r.message for r in caplog.records)


async def test_hangup_and_stream_status_webhooks_are_logged(server, caplog):
    caplog.set_level(logging.INFO, logger="vobiz_agent")
    hangup = await server.post("/hangup", data={
        "CallUUID": CALL_UUID, "Duration": "11", "HangupCause": "NORMAL_CLEARING",
        "HangupCauseName": "Normal Hangup", "HangupSource": "Caller", "Event": "Hangup"})
    status = await server.get("/stream-status", params={
        "CallUUID": CALL_UUID, "StreamID": "s-9", "Event": "DroppedStream",
        "Error": "connection disconnected with the remote service"})
    assert hangup.status_code == status.status_code == 200
    lines = [r.getMessage() for r in caplog.records]
    assert any("11 s" in line and "Normal Hangup" in line and "Caller" in line for line in lines)
    assert any("s-9" in line and "DroppedStream" in line and "disconnected" in line for line in lines)


async def test_health_counts_live_calls(server):
    health = (await server.get("/health")).json()
    assert (health["status"], health["calls"]) == ("ok", 0)
    async with vobiz_call(server.url) as vobiz:
        await vobiz.until_tick(2)
        health = (await server.get("/health")).json()
        assert (health["status"], health["calls"]) == ("ok", 1)


# ── The conversation ──


async def test_caller_hears_greeting_then_their_own_words(server):
    words, other = speech(1.2, seed=1), speech(1.2, seed=2)
    async with vobiz_call(server.url) as vobiz:
        end_of_greeting = await greeted(vobiz)
        greeting = vobiz.agent_audio(0, end_of_greeting)
        assert audioop.rms(greeting, 2) > 500  # a chime you can hear
        first = vobiz.say(words)
        said_until = first + len(words) // 320
        await vobiz.until(lambda: any(n.startswith("echo") for n in vobiz.played_names))
        echo = vobiz.agent_audio(said_until, vobiz.tick)
    assert resemblance(echo, words) > 0.9
    assert resemblance(echo, other) < 0.5
    # Sent in real time, not in a burst (the echo is 60 frames): Vobiz never held more than the
    # player's lead, which grows from 80 ms up to LEAD_MAX_S while the server's loop wakes late.
    assert vobiz.max_queue <= vobiz_agent.Player.LEAD_MAX_S / vobiz_agent.FRAME_SECONDS + 2
    checkpoints = [m["name"] for _, m in vobiz.events if m["event"] == "checkpoint"]
    assert vobiz.played_names == checkpoints  # one per utterance, each acked after it played


async def test_l16_caller_audio_and_the_flat_start_shape(server):
    words = speech(1.0, seed=3, rate=16000)
    async with vobiz_call(server.url, start_shape="flat", media_format=("audio/x-l16", 16000)) as vobiz:
        await greeted(vobiz)
        first = vobiz.say(words)
        await vobiz.until(lambda: any(n.startswith("echo") for n in vobiz.played_names))
        echo = vobiz.agent_audio(first, vobiz.tick)
    narrowband, _ = audioop.ratecv(words, 2, 1, 16000, 8000, None)  # what a phone can carry of it
    assert resemblance(echo, narrowband) > 0.8
    assert resemblance(echo, speech(1.0, seed=4)) < 0.5


async def test_barge_in_stops_the_agent_and_holds_new_audio_until_cleared(server):
    long_words, interruption = speech(3.0, seed=5), speech(0.5, seed=6)
    async with vobiz_call(server.url, cleared_delay=0.9) as vobiz:
        await greeted(vobiz)
        said = vobiz.say(long_words)
        echo_starts = said + len(long_words) // 320
        await vobiz.until(lambda: len(vobiz.agent_ticks(echo_starts)) >= 25)  # half a second of echo heard
        onset = vobiz.say(interruption)
        await vobiz.until(lambda: "echo-3" in vobiz.played_names)  # the reply to the interruption
    cleared_at = vobiz.event_ticks("clearAudio")[0]
    frames_after_onset = [t for t in vobiz.agent_ticks(onset) if t <= cleared_at]
    assert len(frames_after_onset) <= 20  # detection (~10 frames) plus the small lead, not the rest of 3 s
    assert vobiz.agent_ticks(cleared_at + 1)[0] > cleared_at + 40  # flushed, then quiet until clearedAudio
    assert vobiz.audio_while_clearing == 0  # the next reply waited for clearedAudio
    assert "echo-2" not in vobiz.played_names  # the interrupted reply's checkpoint was voided
    reply = vobiz.agent_audio(cleared_at + 1, vobiz.tick)
    assert resemblance(reply, interruption) > 0.8  # and then the agent answered the interruption


async def test_new_audio_goes_out_after_a_second_when_clearedaudio_never_comes(server, caplog):
    caplog.set_level(logging.WARNING, logger="vobiz_agent")
    long_words, interruption = speech(2.0, seed=8), speech(0.4, seed=9)
    async with vobiz_call(server.url, answers_clear=False) as vobiz:
        await greeted(vobiz)
        said = vobiz.say(long_words)
        await vobiz.until(lambda: len(vobiz.agent_ticks(said + len(long_words) // 320)) >= 10)
        vobiz.say(interruption)
        await vobiz.until(lambda: vobiz.event_ticks("clearAudio"))
        cleared_at = vobiz.event_ticks("clearAudio")[0]
        await vobiz.until(lambda: len(vobiz.played_names) >= 2)
    reply = vobiz.agent_audio(cleared_at + 1, vobiz.tick)
    assert resemblance(reply, interruption) > 0.8
    assert any("no clearedAudio" in r.getMessage() for r in caplog.records)


async def test_a_click_does_not_interrupt_the_agent(server):
    words = speech(2.0, seed=10)
    click = tone(1000, 0.06, 8000, amplitude=12000)
    async with vobiz_call(server.url) as vobiz:
        await greeted(vobiz)
        said = vobiz.say(words)
        echo_starts = said + len(words) // 320
        await vobiz.until(lambda: len(vobiz.agent_ticks(echo_starts)) >= 10)
        vobiz.say(click)
        await vobiz.until(lambda: len(vobiz.played_names) >= 2)
    assert vobiz.event_ticks("clearAudio") == []
    assert resemblance(vobiz.agent_audio(echo_starts, vobiz.tick), words) > 0.9


async def test_two_calls_at_once_each_hear_their_own_words(server):
    words_a, words_b = speech(1.0, seed=11), speech(1.0, seed=12)
    async with vobiz_call(server.url, call_id="call-a", stream_id="sa") as a, \
            vobiz_call(server.url, call_id="call-b", stream_id="sb") as b:
        await greeted(a)
        await greeted(b)
        said_a, said_b = a.say(words_a), b.say(words_b)
        await a.until(lambda: len(a.played_names) >= 2)
        await b.until(lambda: len(b.played_names) >= 2)
        echo_a, echo_b = a.agent_audio(said_a, a.tick), b.agent_audio(said_b, b.tick)
        assert (await server.get("/health")).json()["calls"] == 2
    assert resemblance(echo_a, words_a) > 0.9 and resemblance(echo_a, words_b) < 0.5
    assert resemblance(echo_b, words_b) > 0.9 and resemblance(echo_b, words_a) < 0.5


# ── Ending a call ──


@pytest.mark.parametrize("how", ["close", "vanish"])
async def test_hanging_up_ends_every_task_of_the_call(server, how):
    async with vobiz_call(server.url) as vobiz:
        await vobiz.until(lambda: len(vobiz.heard) >= 5)  # mid-greeting: the player is busy
        assert len(call_tasks()) >= 2
        if how == "vanish":  # the peer's TCP connection drops without a WebSocket close
            await vobiz.ws._stream.aclose()
    await server.app.switchboard.wait_until_empty()
    assert call_tasks() == []
    assert (await server.get("/health")).json()["calls"] == 0


@pytest.mark.parametrize("agent, how", [("echo", "close"), ("echo", "vanish"), ("ai", "close")])
async def test_a_call_is_freed_when_it_ends_not_at_the_collectors_next_full_pass(nursery, agent, how):
    """What the operator's RSS shows: a call's objects (its player, ears, transcript, buffers) go when it
    ends. Left in a reference cycle, they would wait for Python's next full collection, hundreds of calls on."""
    server = (await start_providers(nursery, ["Hello."])).server if agent == "ai" else await start_server(nursery)
    freed = trio.Event()
    gc.disable()  # only reference counting frees anything now
    try:
        async with vobiz_call(server.url) as vobiz:
            await vobiz.until(lambda: len(vobiz.heard) >= 5)
            weakref.finalize(next(iter(server.app.switchboard.calls)), freed.set)
            if how == "vanish":
                await vobiz.ws._stream.aclose()
        with trio.fail_after(5):
            await freed.wait()
    finally:
        gc.enable()


async def test_a_stop_frame_ends_the_call_and_dtmf_is_logged(server, caplog):
    caplog.set_level(logging.INFO, logger="vobiz_agent")
    async with vobiz_call(server.url) as vobiz:
        await vobiz.until_tick(3)
        await vobiz.ws.send_message(json.dumps({"event": "dtmf", "dtmf": {"digit": "5"}}))
        await vobiz.stop_stream()  # the stop frame of older docs: Vobiz ends the stream itself
        await vobiz.closed.wait()  # the server closed the socket
    await server.app.switchboard.wait_until_empty()
    lines = [r.getMessage() for r in caplog.records if CALL_UUID in r.getMessage()]
    assert any("pressed 5" in line for line in lines)
    assert any("ended by stop frame" in line for line in lines)


# ── Bad input: logged once, ignored, and nobody else notices ──


def media_frame(payload: str) -> str:
    return json.dumps({"event": "media", "streamId": "sa", "media": {"payload": payload}})


BAD_FRAMES = [
    ("{\"event\": \"media\", ", "not JSON"),
    ("[\"media\"]", "not an object"),
    (json.dumps({"event": "mark", "name": "x"}), "unknown event 'mark'"),
    (media_frame("not*base64!"), "not base64"),
    (media_frame(base64.b64encode(b"\x01" * 161).decode()), "not whole samples"),
    (json.dumps({"event": "media", "streamId": "sa"}), "no media.payload"),
    (json.dumps({"event": "playedStream"}), "no name"),
    (json.dumps({"event": "start", "start": {"callId": "call-a", "streamId": "other"}}), "second start"),
    (media_frame("A" * 70_000), "over 65536"),
]


async def test_bad_frames_are_logged_and_ignored_without_disturbing_anyone(server, caplog):
    caplog.set_level(logging.WARNING, logger="vobiz_agent")
    words_a, words_b = speech(1.0, seed=13), speech(1.0, seed=14)

    def warnings_about(call: str) -> list[str]:
        return [r.getMessage() for r in caplog.records if call in r.getMessage()]

    early = [media_frame(base64.b64encode(b"\0" * 320).decode())]
    async with vobiz_call(server.url, call_id="call-b", stream_id="sb") as b, \
            vobiz_call(server.url, call_id="call-a", stream_id="sa", before_start=early,
                       media_format=("audio/x-l16", 8000)) as a:
        assert any("media before start" in r.getMessage() for r in caplog.records)
        for frame, complaint in BAD_FRAMES:
            before = len(warnings_about("call-a"))
            await a.ws.send_message(frame)
            await a.until(lambda count=before: len(warnings_about("call-a")) > count)
            assert complaint in warnings_about("call-a")[-1]
        await greeted(a)
        await greeted(b)
        said_a, said_b = a.say(words_a), b.say(words_b)
        await a.until(lambda: len(a.played_names) >= 2)
        await b.until(lambda: len(b.played_names) >= 2)
        echo_a, echo_b = a.agent_audio(said_a, a.tick), b.agent_audio(said_b, b.tick)
    assert resemblance(echo_a, words_a) > 0.9  # call A went on
    assert resemblance(echo_b, words_b) > 0.9  # and call B never noticed
    assert warnings_about("call-b") == []


async def test_a_message_over_the_hard_limit_closes_that_socket_alone(server, caplog):
    """Over 1 MiB, Hypercorn stops reading the message and closes with 1009 (a bigger
    message is never buffered); a raw wsproto client, because one that blocks sending
    the giant message could not also read the close."""
    caplog.set_level(logging.INFO, logger="vobiz_agent")
    giant = SimulatedVobiz(call_id="giant")
    url = urlsplit(await giant.answer(server.url))
    async with vobiz_call(server.url, call_id="bystander", stream_id="sb") as bystander:
        await greeted(bystander)
        stream = await trio.open_tcp_stream(url.hostname, url.port)
        client = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
        await stream.send_all(client.send(wsproto.events.Request(host=url.netloc, target=url.path)))
        async def next_event():
            while True:
                for event in client.events():
                    return event
                client.receive_data(await stream.receive_some())

        assert isinstance(await next_event(), wsproto.events.AcceptConnection)
        await stream.send_all(client.send(wsproto.events.Message(json.dumps(giant.start_frame()))))
        payload = "A" * (vobiz_agent.MAX_MESSAGE_BYTES + 1)
        async with trio.open_nursery() as sending:
            sending.start_soon(stream.send_all, client.send(wsproto.events.Message(media_frame(payload))))
            closed = await next_event()
            sending.cancel_scope.cancel()  # the server stopped reading: the rest can't go
        assert isinstance(closed, wsproto.events.CloseConnection) and closed.code == 1009
        await stream.aclose()
        while len(server.app.switchboard) > 1:  # the giant call ends; the bystander's goes on
            await bystander.until_tick(bystander.tick + 1)
        said = bystander.say(speech(0.8, seed=31))
        await bystander.until(lambda: len(bystander.played_names) >= 2)
        assert resemblance(bystander.agent_audio(said, bystander.tick), speech(0.8, seed=31)) > 0.9
    await server.app.switchboard.wait_until_empty()
    ended = [r.getMessage() for r in caplog.records if "giant" in r.getMessage() and "ended" in r.getMessage()]
    assert len(ended) == 1
    assert all(record.levelno < logging.ERROR for record in caplog.records)


# ── The audio chain ──


def chain(pcm: bytes, rate: int, chunks: list[int] | None = None) -> list[bytes]:
    encoder = vobiz_agent.FrameEncoder(rate)
    frames, start = [], 0
    for size in chunks or [len(pcm)]:
        frames += encoder.encode(pcm[start : start + size])
        start += size
    return frames + encoder.encode(pcm[start:]) + encoder.flush()


def level_db(frequency: float, rate: int = 24000) -> float:
    """Level of a tone after the whole chain, relative to the same tone before it."""
    heard = audioop.ulaw2lin(b"".join(chain(tone(frequency, 1.0, rate), rate)), 2)
    settled = heard[2 * 800 :]  # skip the filter's start-up
    return 20 * math.log10(max(audioop.rms(settled, 2), 1) / (10000 / math.sqrt(2)))


def test_speech_becomes_exact_160_byte_frames_padded_with_silence():
    frames = chain(tone(440, 1.0, 24000)[: 2 * 12_345], 24000)
    assert all(len(frame) == 160 for frame in frames)
    assert len(frames) == math.ceil(12_345 / 3 / 160)
    assert frames[-1].endswith(b"\xff" * 10)


def test_the_same_sound_whether_it_arrives_whole_or_in_odd_chunks():
    pcm = speech(1.0, seed=15, rate=24000)
    rng = random.Random(3)
    sizes = [rng.randint(1, 2001) for _ in range(60)]  # odd sizes split samples in half
    assert chain(pcm, 24000, sizes) == chain(pcm, 24000)


def test_the_filter_keeps_the_telephone_band_and_rejects_aliases():
    for frequency in (300, 500, 1000, 2000, 3000, 3400):
        assert abs(level_db(frequency)) <= 1.0, frequency
    for frequency in (5000, 6000, 8000, 11000):  # would fold to 3000, 2000, 0 and 3000 Hz
        assert level_db(frequency) <= -40.0, frequency


def test_16khz_speech_is_filtered_too():
    assert abs(level_db(1000, rate=16000)) <= 1.0
    assert level_db(5000, rate=16000) <= -40.0


# ── Starting the program ──


@pytest.mark.parametrize("variable, value", [
    ("PORT", "abc"), ("PORT", "70000"), ("PUBLIC_URL", "abc.ngrok.app"), ("LOG_LEVEL", "LOUD"),
])
async def test_a_bad_setting_stops_the_program_with_one_clear_line(variable, value):
    env = {**os.environ, variable: value}
    result = await trio.run_process([sys.executable, "vobiz_agent.py"], env=env, check=False,
                                    capture_stdout=True, capture_stderr=True, cwd=HERE)
    assert result.returncode != 0
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and variable in lines[0] and value in lines[0] and "e.g." in lines[0]


async def test_the_command_line_serves_and_prints_the_answer_url(nursery):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PUBLIC_URL": "https://abc.ngrok.app"}
    process = await nursery.start(partial(
        trio.run_process, [sys.executable, "vobiz_agent.py", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=HERE, check=False))
    output = b""
    async for chunk in process.stdout:
        output += chunk
        if b"Hangup URL" in output:
            break
    assert b"Answer URL" in output and b"https://abc.ngrok.app/answer" in output
    async for chunk in process.stderr:  # hypercorn says when it is listening
        if b"Running on" in chunk:
            break
    async with httpx.AsyncClient() as client:
        health = await client.get(f"http://127.0.0.1:{port}/health")
    assert (health.json()["status"], health.json()["calls"]) == ("ok", 0)
    process.send_signal(signal.SIGINT)
    assert await process.wait() == 0


# ── The AI agent, against loopback stand-ins for Deepgram and OpenAI ──


def heard_sentence(vobiz: SimulatedVobiz, openai: OpenAIStandIn, text: str, start: int = 0) -> float:
    """How much of what the caller heard (from `start`) sounds like the TTS voice saying `text`."""
    return resemblance(vobiz.agent_audio(start, vobiz.tick), openai.voice_8k(text))


async def the_caller_hears_the_apology(vobiz: SimulatedVobiz, ai: Providers, seed: int) -> None:
    """After the greeting the caller says something, and what they hear back is the LLM apology."""
    await greeted(vobiz)
    said = vobiz.say(speech(0.8, seed=seed))
    await vobiz.until(lambda: len(vobiz.played_names) >= 2)
    assert heard_sentence(vobiz, ai.openai, vobiz_agent.LLM_APOLOGY, start=said) > 0.9


async def test_ai_conversation_greets_and_answers_three_turns_in_order(nursery, caplog):
    caplog.set_level(logging.INFO, logger="vobiz_agent")
    ai = await start_providers(nursery, ["What time is it?", "Tell me a joke.", "Thanks, bye."])
    ai.openai.replies = [["It is ", "noon."], ["Why did the ", "chicken cross? ", "To get ", "across."],
                         ["Goodbye!"]]
    answers = [["It is noon."], ["Why did the chicken cross?", "To get across."], ["Goodbye!"]]
    async with vobiz_call(ai.server.url) as vobiz:
        await greeted(vobiz)
        assert heard_sentence(vobiz, ai.openai, "Hello, how can I help?") > 0.9
        for turn, sentences in enumerate(answers):
            said, played = vobiz.say(speech(1.0, seed=20 + turn)), len(vobiz.played_names)
            await vobiz.until(lambda: len(vobiz.played_names) >= played + len(sentences))  # noqa: B023
            for sentence in sentences:
                assert heard_sentence(vobiz, ai.openai, sentence, start=said) > 0.9, sentence
    assert ai.spoken_texts() == ["Hello, how can I help?", "It is noon.", "Why did the chicken cross?",
                                 "To get across.", "Goodbye!"]
    assert ai.user_messages(2) == ["What time is it?", "Tell me a joke.", "Thanks, bye."]
    assert ai.assistant_messages(2) == ["Hello, how can I help?", "It is noon.",
                                        "Why did the chicken cross? To get across."]
    request = ai.openai.chat_requests[0]
    assert request["body"]["stream"] is True and request["body"]["model"] == "gpt-4o-mini"
    assert request["headers"]["authorization"] == "Bearer sk-secret"
    assert ai.openai.tts_requests[0]["body"]["response_format"] == "pcm"
    # What Deepgram was asked for, and how.
    connection = ai.deepgram.connections[0]
    assert connection["headers"]["authorization"] == "Token dg-secret"
    assert connection["query"] == {
        "model": "nova-3", "language": "en", "encoding": "mulaw", "sample_rate": "8000", "channels": "1",
        "interim_results": "true", "endpointing": "300", "utterance_end_ms": "1000", "vad_events": "true",
        "smart_format": "true"}
    await ai.server.app.switchboard.wait_until_empty()
    assert ai.deepgram.close_streams == 1  # the call told Deepgram it was done
    latency = [r for r in caplog.records if "latency" in r.getMessage()]
    assert [r.fields["turn"] for r in latency] == [1, 2, 3]
    assert all(r.fields["first_frame_heard"] >= r.fields["stt_final"] > 0 for r in latency)


async def test_the_first_sentence_is_heard_while_the_llm_is_still_writing(nursery):
    ai = await start_providers(nursery, ["Tell me about trains."])
    tokens = ["Sure, ", "trains ", "are ", "great."] + [f" word{i}" for i in range(30)] + ["."]
    ai.openai.replies = [tokens]
    ai.openai.token_interval = 0.1  # three seconds of writing
    async with vobiz_call(ai.server.url) as vobiz:
        await greeted(vobiz)
        said = vobiz.say(speech(1.0, seed=30))
        await vobiz.until(lambda: "sentence-2" in vobiz.played_names)  # "Sure," has been heard whole
        assert ("chat", 0) not in ai.openai.completed  # while the LLM is still writing
        assert heard_sentence(vobiz, ai.openai, "Sure,", start=said) > 0.9
        assert ai.spoken_texts()[1] == "Sure,"


async def test_barge_in_closes_the_llm_and_tts_streams_and_history_keeps_what_was_heard(nursery):
    ai = await start_providers(nursery, ["Tell me a story.", "Stop, please."])
    ai.openai.replies = [["Once upon a time, ", "there was a very long story that went on and on. ",
                          "It had many parts. ", "And it kept going for a very long while."],
                         ["Okay, I will stop."]]
    async with vobiz_call(ai.server.url, cleared_delay=0.05) as vobiz:
        await greeted(vobiz)
        ai.openai.token_interval = 1.0  # the LLM is still writing when the caller interrupts,
        ai.openai.tts_interval = 0.2  # and the second sentence's audio still streaming
        vobiz.say(speech(1.0, seed=31))
        await vobiz.until(lambda: "sentence-2" in vobiz.played_names)  # "Once upon a time," was heard
        vobiz.say(speech(0.8, seed=32))
        await vobiz.until(lambda: vobiz.event_ticks("clearAudio"))
        await vobiz.until(lambda: len(ai.openai.chat_requests) == 2)
        await ai.openai.wait_until(lambda: ("chat", 0) in ai.openai.disconnects)
    assert ("chat", 0) in ai.openai.disconnects  # the LLM stream was closed by the agent
    assert any(kind == "tts" for kind, _ in ai.openai.disconnects)  # and a TTS stream
    assert ai.assistant_messages(1)[-1] == "Once upon a time, [the caller interrupted]"
    assert ai.user_messages(1) == ["Tell me a story.", "Stop, please."]


async def test_a_cough_does_not_interrupt_the_agent(nursery):
    ai = await start_providers(nursery, ["Tell me something.", ""])  # a cough has no words
    ai.openai.replies = [["Here is a long answer that goes on for a while, so there is time to cough."]]
    async with vobiz_call(ai.server.url) as vobiz:
        await greeted(vobiz)
        said = vobiz.say(speech(1.0, seed=33))
        await vobiz.until(lambda: len(vobiz.agent_ticks(said + 50)) >= 10)
        vobiz.say(tone(300, 0.12, 8000, amplitude=9000))
        await vobiz.until(lambda: len(vobiz.played_names) >= 2)
    assert vobiz.event_ticks("clearAudio") == []
    assert len(ai.openai.chat_requests) == 1


async def test_a_pause_mid_sentence_is_one_turn_not_two(nursery):
    ai = await start_providers(nursery, ["I would like to", "book a table for two."])
    ai.openai.replies = [["This reply must never be heard."], ["A table for two it is."]]
    ai.openai.first_token_delay = 0.6  # the caller goes on before any reply could be heard
    async with vobiz_call(ai.server.url) as vobiz:
        await greeted(vobiz)
        said = vobiz.say(speech(0.8, seed=34) + bytes(2 * 8000 * 45 // 100) + speech(1.0, seed=35))
        await vobiz.until(lambda: len(vobiz.played_names) >= 2)
    assert ai.user_messages(1) == ["I would like to book a table for two."]
    assert ai.assistant_messages(1) == ["Hello, how can I help?"]
    assert "This reply must never be heard." not in ai.spoken_texts()
    assert heard_sentence(vobiz, ai.openai, "A table for two it is.", start=said) > 0.9


@pytest.mark.parametrize("failure", ["error", "timeout"])
async def test_when_the_llm_fails_the_caller_hears_an_apology_and_the_call_goes_on(nursery, failure, caplog):
    ai = await start_providers(nursery, ["Hello?", "Hello again?"], openai_timeout_s=0.5)
    if failure == "error":
        ai.openai.chat_status = 500
    else:
        ai.openai.chat_hang = True
    ai.openai.replies = [["Now I can answer."]]
    async with vobiz_call(ai.server.url) as vobiz:
        await the_caller_hears_the_apology(vobiz, ai, seed=36)
        ai.openai.chat_status, ai.openai.chat_hang = 200, False
        said = vobiz.say(speech(0.8, seed=37))
        await vobiz.until(lambda: len(vobiz.played_names) >= 3)
        assert heard_sentence(vobiz, ai.openai, "Now I can answer.", start=said) > 0.9
    assert any("LLM" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


async def test_when_the_voice_fails_the_caller_hears_a_trouble_tone(nursery, caplog):
    ai = await start_providers(nursery, ["Hello?", "Hello again?"])
    ai.openai.replies = [["You should not hear these words."], ["Now you can hear me."]]
    async with vobiz_call(ai.server.url) as vobiz:
        await greeted(vobiz)
        ai.openai.tts_status = 500
        said = vobiz.say(speech(0.8, seed=38))
        await vobiz.until(lambda: len(vobiz.played_names) >= 2)
        tone_8k, _ = audioop.ratecv(vobiz_agent.trouble_tone(), 2, 1, 24000, 8000, None)
        assert resemblance(vobiz.agent_audio(said, vobiz.tick), tone_8k) > 0.8
        ai.openai.tts_status = 200
        said = vobiz.say(speech(0.8, seed=39))
        await vobiz.until(lambda: len(vobiz.played_names) >= 3)
        assert heard_sentence(vobiz, ai.openai, "Now you can hear me.", start=said) > 0.9
    assert any("TTS: HTTP 500" in r.getMessage() for r in caplog.records)


async def test_deepgram_refusing_at_first_is_retried(nursery, caplog):
    caplog.set_level(logging.INFO, logger="vobiz_agent")
    ai = await start_providers(nursery, ["Are you there?"], deepgram_options={"refuse": 2})
    ai.openai.replies = [["Yes I am here."]]
    async with vobiz_call(ai.server.url) as vobiz:
        await greeted(vobiz)
        await ai.deepgram.wait_until(lambda: ai.deepgram.attempts >= 3)
        said = vobiz.say(speech(0.8, seed=40))
        await vobiz.until(lambda: len(vobiz.played_names) >= 2)
        assert heard_sentence(vobiz, ai.openai, "Yes I am here.", start=said) > 0.9
    lines = [r.getMessage() for r in caplog.records]
    assert any("speech-to-text is down (refused with HTTP 401)" in line for line in lines)
    assert any("speech-to-text connected after 2 failed attempts" in line for line in lines)


async def test_deepgram_staying_down_gets_the_caller_an_apology(nursery):
    ai = await start_providers(nursery, deepgram_options={"refuse": 1000})
    async with vobiz_call(ai.server.url) as vobiz:
        await greeted(vobiz)
        said = vobiz.tick
        await vobiz.until(lambda: len(vobiz.played_names) >= 2)
        assert heard_sentence(vobiz, ai.openai, vobiz_agent.EARS_APOLOGY, start=said) > 0.9
    assert ai.spoken_texts() == ["Hello, how can I help?", vobiz_agent.EARS_APOLOGY]


async def test_deepgram_dropping_mid_call_is_reconnected(nursery, caplog):
    ai = await start_providers(nursery, ["Can you still hear me?"], deepgram_options={"drop_after_s": 1.0})
    ai.openai.replies = [["Loud and clear."]]
    async with vobiz_call(ai.server.url) as vobiz:
        await greeted(vobiz)
        await ai.deepgram.wait_until(lambda: len(ai.deepgram.connections) >= 2)
        said = vobiz.say(speech(0.8, seed=41))
        await vobiz.until(lambda: len(vobiz.played_names) >= 2)
        assert heard_sentence(vobiz, ai.openai, "Loud and clear.", start=said) > 0.9
    assert any("speech-to-text is down" in r.getMessage() for r in caplog.records)


def test_llm_text_is_cut_where_speech_can_start():
    async def pieces(tokens):
        async def stream():
            for token in tokens:
                yield token
        return [piece async for piece in vobiz_agent.speakable_pieces(stream())]

    assert trio.run(pieces, ["Sure", ", I can ", "help. Dr. Smith is in ", "today. ", "Bye"]) == \
        ["Sure,", "I can help. Dr. Smith is in today.", "Bye"]
    assert trio.run(pieces, ["Dr. Who? ", "Yes."]) == ["Dr. Who?", "Yes."]


@pytest.mark.parametrize("present, missing", [("DEEPGRAM_API_KEY", "OPENAI_API_KEY"),
                                              ("OPENAI_API_KEY", "DEEPGRAM_API_KEY")])
async def test_one_provider_key_alone_stops_the_program(present, missing):
    env = {key: value for key, value in os.environ.items() if not key.endswith("_API_KEY")}
    result = await trio.run_process([sys.executable, "vobiz_agent.py"], env={**env, present: "k"},
                                    check=False, capture_stdout=True, capture_stderr=True, cwd=HERE)
    lines = result.stderr.decode().strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1 and missing in lines[0]


def test_json_log_lines_carry_a_turns_latency_as_fields():
    record = logging.LogRecord("vobiz_agent", logging.INFO, __file__, 1, "call %s: turn %d latency",
                               ("c-1", 2), None)
    record.fields = {"call": "c-1", "turn": 2, "stt_final": 310, "first_frame_heard": 790}
    line = json.loads(vobiz_agent.JsonLogFormatter().format(record))
    assert line["message"] == "call c-1: turn 2 latency" and line["level"] == "INFO"
    assert line["stt_final"] == 310 and line["first_frame_heard"] == 790



# ── Trust: signed webhooks and signed media URLs ──


def vobiz_signs(token: str, url: str, nonce: str, version: int) -> dict[str, str]:
    """The headers Vobiz adds to a webhook, computed here independently of the server."""
    message = f"{url}.{nonce}" if version == 3 else f"{url}{nonce}"
    signature = base64.b64encode(hmac.new(token.encode(), message.encode(), hashlib.sha256).digest()).decode()
    return {f"X-Vobiz-Signature-V{version}": signature, f"X-Vobiz-Signature-V{version}-Nonce": nonce}


async def test_webhook_signatures_are_checked_and_replays_refused(nursery, caplog):
    server = await start_server(nursery, public_url="https://calls.example.com", vobiz_auth_token="secret-token",
                                vobiz_verify_signatures="when-signed")
    url = "https://calls.example.com/hangup"  # what Vobiz signed: the public URL, without the query
    fields = {"CallUUID": CALL_UUID, "Event": "Hangup"}
    signed = vobiz_signs("secret-token", url, "11111111111111111111", 3)
    assert (await server.post("/hangup?retry=1", data=fields, headers=signed)).status_code == 200
    assert (await server.post("/hangup", data=fields, headers=signed)).status_code == 403  # replayed
    forged = vobiz_signs("guessed-token", url, "22222222222222222222", 3)
    assert (await server.post("/hangup", data=fields, headers=forged)).status_code == 403
    v2 = vobiz_signs("secret-token", url, "33333333333333333333", 2)
    assert (await server.post("/hangup", data=fields, headers=v2)).status_code == 200
    answer = vobiz_signs("secret-token", "https://calls.example.com/answer", "44444444444444444444", 3)
    assert (await server.post("/answer", data={"CallUUID": CALL_UUID}, headers=answer)).status_code == 200
    # Vobiz sends no signature when the callback has no credentials: accepted unless required.
    assert (await server.post("/hangup", data=fields)).status_code == 200
    refusals = [r.getMessage() for r in caplog.records if "refused a POST" in r.getMessage()]
    assert any("replayed nonce" in line for line in refusals) and any("no V3 signature matches" in line for line in refusals)
    assert not any("secret-token" in r.getMessage() or signed["X-Vobiz-Signature-V3"] in r.getMessage()
                   for r in caplog.records)  # no secrets in the logs


async def test_unsigned_webhooks_are_refused_when_signatures_are_required(nursery):
    server = await start_server(nursery, public_url="https://calls.example.com",
                                vobiz_auth_token="secret-token", vobiz_verify_signatures="required")
    assert (await server.post("/answer", data={"CallUUID": CALL_UUID})).status_code == 403
    signed = vobiz_signs("secret-token", "https://calls.example.com/answer", "55555555555555555555", 3)
    assert (await server.post("/answer", data={"CallUUID": CALL_UUID}, headers=signed)).status_code == 200
    metrics = (await server.get("/metrics")).text
    assert 'vobiz_agent_calls_refused_total{reason="signature"} 1.0' in metrics


async def media_url(server: Server, call_id: str = CALL_UUID) -> str:
    response = await server.post("/answer", data={"CallUUID": call_id})
    return ET.fromstring(response.content).find("Stream").text


async def refused_status(url: str) -> int | None:
    try:
        async with trio_websocket.open_websocket_url(url):
            return None
    except trio_websocket.ConnectionRejected as rejected:
        return rejected.status_code


async def test_media_urls_are_capabilities_for_one_call(nursery):
    server = await start_server(nursery, stream_secret=b"shared-secret", stream_secret_generated=False)
    good = await media_url(server)
    base, call_id, token = good.rsplit("/", 2)
    assert call_id == CALL_UUID and len(token) < 40
    assert await refused_status(f"{base}/{call_id}/{token[:-2]}xx") == 403  # tampered
    other = (await media_url(server, "another-call")).rsplit("/", 1)[1]
    assert await refused_status(f"{base}/{CALL_UUID}/{other}") == 403  # issued for another call
    long_ago = int(time.time()) - vobiz_agent.Settings().max_call_s - vobiz_agent.STREAM_URL_MARGIN_S - 1
    expired = vobiz_agent.StreamToken(b"shared-secret").issue(CALL_UUID, long_ago, "AAAAAAAA")
    assert await refused_status(f"{base}/{CALL_UUID}/{expired}") == 403  # older than any call can be
    assert await refused_status(good) is None
    metrics = (await server.get("/metrics")).text
    assert 'vobiz_agent_calls_refused_total{reason="token"} 3.0' in metrics


async def test_a_start_for_another_call_closes_the_socket(server, caplog):
    url = await media_url(server)
    async with trio_websocket.open_websocket_url(url) as ws:
        await ws.send_message(json.dumps(SimulatedVobiz(call_id="someone-else").start_frame()))
        with pytest.raises(trio_websocket.ConnectionClosed):
            await ws.get_message()  # no greeting: the server closes instead
    assert any("not the call this URL was issued for" in r.getMessage() for r in caplog.records)


# ── Operations ──


async def test_over_max_calls_the_caller_hears_that_we_are_busy(nursery):
    server = await start_server(nursery, max_calls=1)
    async with vobiz_call(server.url, call_id="first") as first:
        await first.until_tick(2)
        response = await server.post("/answer", data={"CallUUID": "second"})
    second = SimulatedVobiz(call_id="second")
    assert second.run_xml(ET.fromstring(response.content)) is None
    assert second.state == "rejected" and second.hangup_reason == "busy" and not second.billed
    assert 'vobiz_agent_calls_refused_total{reason="busy"} 1.0' in (await server.get("/metrics")).text


async def test_a_silent_socket_is_ended_after_the_idle_timeout(nursery, caplog):
    server = await start_server(nursery, idle_timeout_s=1.0)
    async with trio_websocket.open_websocket_url(await media_url(server)) as ws:
        await ws.send_message(json.dumps(SimulatedVobiz().start_frame()))  # and then nothing at all
        with pytest.raises(trio_websocket.ConnectionClosed):
            while True:
                await ws.get_message()
    await server.app.switchboard.wait_until_empty()
    assert any("no media from Vobiz for 1 s" in r.getMessage() for r in caplog.records)
    assert 'vobiz_agent_calls_total{ended="idle timeout"} 1.0' in (await server.get("/metrics")).text


async def test_a_reconnect_continues_the_conversation_and_the_agent_ends_it(nursery):
    server = await start_server(nursery, offline_max_turns=2)
    async with vobiz_call(server.url) as vobiz:
        await greeted(vobiz)
        vobiz.say(speech(0.8, seed=81))
        await vobiz.until(lambda: len(vobiz.played_names) >= 2)  # turn 1 answered
        before = len(vobiz.played_names)
        await vobiz.drop()  # a network blip: Vobiz reconnects, as maxRetries allows
        await vobiz.until(lambda: len(vobiz.streams) == 2)
        said = vobiz.say(speech(0.8, seed=82))
        await vobiz.closed.wait()  # turn 2 was the last: echo, goodbye, stop
    assert vobiz.streams == ["stream-1", "stream-1-retry1"] and vobiz.refused == []
    assert [name.split("-")[0] for name in vobiz.played_names[before:]] == ["echo", "goodbye"]  # not greeted again
    assert resemblance(vobiz.agent_audio(said, vobiz.tick), speech(0.8, seed=82)) > 0.9
    assert vobiz.event_ticks("stop") and vobiz.hangup_reason == "Hangup after Stream" and not vobiz.call_open
    metrics = (await server.get("/metrics")).text
    assert 'vobiz_agent_calls_total{ended="agent"} 1.0' in metrics
    assert 'vobiz_agent_calls_total{ended="hang-up"} 1.0' in metrics
    assert "vobiz_agent_turns_total 2.0" in metrics
    assert "vobiz_agent_turn_latency_seconds_count 2.0" in metrics


class ProcessLog:
    """A server process's stderr, read as it comes (a full pipe would stall the server)."""

    def __init__(self) -> None:
        self.text = ""
        self._grew = trio.Event()

    async def read(self, stream) -> None:
        async for chunk in stream:
            self.text += chunk.decode(errors="replace")
            self._grew.set()
            self._grew = trio.Event()

    async def until(self, predicate) -> str:
        with trio.fail_after(20):
            while not predicate(self.text):
                await self._grew.wait()
        return self.text


# The same for a server process: the tests' other processes share its cores.
LOAD_ADMISSION_OFF_ENV = {name.upper(): str(value) for name, value in LOAD_ADMISSION_OFF.items()}


async def start_process(nursery, port: int, *args: str, **env: str):
    process = await nursery.start(partial(
        trio.run_process, [sys.executable, "vobiz_agent.py", "--host", "127.0.0.1", "--port", str(port), *args],
        env={**os.environ, **LOAD_ADMISSION_OFF_ENV, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        cwd=HERE, check=False))
    process_log = ProcessLog()
    nursery.start_soon(process_log.read, process.stderr)
    await process_log.until(lambda text: "Running on" in text)  # Hypercorn: listening
    return process, process_log


async def test_sigterm_drains_live_calls_and_refuses_new_ones(nursery):
    port = free_port()
    process, _ = await start_process(nursery, port, DRAIN_TIMEOUT_S="20")
    server = Server(None, f"http://127.0.0.1:{port}")
    async with vobiz_call(server.url) as vobiz:
        await greeted(vobiz)
        process.send_signal(signal.SIGTERM)
        health = await server.get("/health")
        while health.status_code == 200:  # the signal takes a moment to arrive
            await vobiz.until_tick(vobiz.tick + 1)
            health = await server.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "draining"
        busy = ET.fromstring((await server.post("/answer", data={"CallUUID": "late"})).content)
        assert [(child.tag, child.get("reason")) for child in busy] == [("Hangup", "busy")]
        process.send_signal(signal.SIGINT)  # a second signal (Ctrl-C) must not cut the drain short
        said = vobiz.say(speech(0.8, seed=83))  # the live call goes on
        await vobiz.until(lambda: len(vobiz.played_names) >= 2)
        assert resemblance(vobiz.agent_audio(said, vobiz.tick), speech(0.8, seed=83)) > 0.9
    assert await process.wait() == 0  # the last call hung up: the process is done


async def test_at_the_drain_deadline_calls_get_a_goodbye_and_a_stop(nursery):
    port = free_port()
    process, _ = await start_process(nursery, port, DRAIN_TIMEOUT_S="0.5")
    async with vobiz_call(f"http://127.0.0.1:{port}") as vobiz:
        await greeted(vobiz)
        process.send_signal(signal.SIGTERM)
        await vobiz.closed.wait()
    assert vobiz.played_names[-1].startswith("goodbye") and vobiz.event_ticks("stop")
    assert await process.wait() == 0


# ── Outbound calls through the Vobiz REST API ──


async def place_call(api_url: str, *args: str) -> tuple[int, str, str]:
    env = {**os.environ, "VOBIZ_AUTH_ID": "MA_TEST", "VOBIZ_AUTH_TOKEN": "tok", "VOBIZ_API_URL": api_url,
           "PUBLIC_URL": "https://abc.ngrok.app"}
    result = await trio.run_process([sys.executable, "vobiz_agent.py", "call", *args], env=env, check=False,
                                    capture_stdout=True, capture_stderr=True, cwd=HERE)
    return result.returncode, result.stdout.decode().strip(), result.stderr.decode().strip()


@pytest.mark.parametrize("status, complaint", [(201, None), (200, None), (401, "VOBIZ_AUTH_ID"),
                                               (402, "balance"), (429, "rate limiting"), (500, "HTTP 500")])
async def test_the_call_command_asks_vobiz_to_place_a_call(nursery, status, complaint):
    api = VobizApiStandIn(status)
    api_url = await nursery.start(api.serve)
    code, out, err = await place_call(api_url, "--to", "+919876543210", "--from", "918071387423")
    if complaint is None:
        assert (code, out) == (0, "0e516b32-req")
    else:
        assert code == 1 and complaint in err and len(err.splitlines()) == 1
    request = api.requests[0]
    assert request["auth_id"] == "MA_TEST"
    assert request["headers"]["X-Auth-Id"] == "MA_TEST" and request["headers"]["X-Auth-Token"] == "tok"
    assert request["body"] == {"from": "918071387423", "to": "+919876543210",
                               "answer_url": "https://abc.ngrok.app/answer", "answer_method": "POST",
                               "hangup_url": "https://abc.ngrok.app/hangup", "hangup_method": "POST",
                               "ring_url": "https://abc.ngrok.app/ring", "ring_method": "POST"}


async def test_the_call_command_says_clearly_when_vobiz_cannot_be_reached():
    code, _, err = await place_call(f"http://127.0.0.1:{free_port()}/api/v1", "--to", "+91", "--from", "1")
    assert code == 1 and "could not reach" in err and len(err.splitlines()) == 1


async def test_the_call_command_names_what_is_missing_with_an_example_of_it(monkeypatch):
    monkeypatch.delenv("VOBIZ_FROM", raising=False)
    code, _, err = await place_call("http://127.0.0.1:9/api/v1", "--to", "+919876543210")
    assert code == 1 and len(err.splitlines()) == 1
    assert "--from (or VOBIZ_FROM) is needed to place a call, e.g. --from 918071387423" in err



async def test_the_ai_agent_hangs_up_when_the_caller_says_goodbye(nursery):
    ai = await start_providers(nursery, ["That's all, goodbye."])
    ai.openai.replies = [["Goodbye ", "and take care!", HANG_UP]]
    async with vobiz_call(ai.server.url) as vobiz:
        await greeted(vobiz)
        said = vobiz.say(speech(0.8, seed=84))
        await vobiz.closed.wait()  # the agent ended the call
        assert heard_sentence(vobiz, ai.openai, "Goodbye and take care!", start=said) > 0.9
    assert vobiz.event_ticks("stop")
    assert [tool["function"]["name"] for tool in ai.openai.chat_requests[0]["body"]["tools"]] == ["hang_up"]
    assert ai.spoken_texts() == ["Hello, how can I help?", "Goodbye and take care!"]  # no extra farewell


# ── Property: no sequence of junk frames harms the call that gets it, or any other ──

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                          max_size=3),
                           max_leaves=8)
events = st.sampled_from(["start", "media", "playedStream", "clearedAudio", "dtmf", "mark", "", "MEDIA"])
payloads = st.one_of(st.binary(max_size=400).map(lambda b: base64.b64encode(b).decode()),
                     st.text(max_size=40), json_values)
frame_shapes = st.one_of(
    st.text(max_size=60),  # not JSON at all
    json_values.map(json.dumps),  # JSON, but any shape
    st.builds(lambda event, payload, name: json.dumps({"event": event, "media": {"payload": payload},
                                                       "name": name, "start": {"callId": name}}),
              events, payloads, json_values),
)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(junk=st.lists(frame_shapes, min_size=1, max_size=25))
async def test_junk_frames_never_crash_a_call_or_disturb_another(caplog, junk):
    async with trio.open_nursery() as nursery:  # a server per example: hypothesis runs many
        server = await start_server(nursery)
        async with vobiz_call(server.url, call_id="victim", stream_id="sv") as victim, \
                vobiz_call(server.url, call_id="bystander", stream_id="sb") as bystander:
            for frame in junk:
                await victim.ws.send_message(frame)
            await greeted(bystander)
            chime = audioop.ratecv(vobiz_agent.chime((660.0, 880.0)), 2, 1, 24000, 8000, None)[0]
            assert resemblance(bystander.agent_audio(0, bystander.tick), chime) > 0.9  # its greeting, whole
            assert bystander.event_ticks("clearAudio") == []
            assert not victim.closed.is_set()
            assert (await server.get("/health")).json()["calls"] == 2
        nursery.cancel_scope.cancel()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]



async def test_the_offline_agent_says_goodbye_to_a_silent_line(nursery, caplog):
    caplog.set_level(logging.INFO, logger="vobiz_agent")
    server = await start_server(nursery, silence_timeout_s=1.0)
    async with vobiz_call(server.url) as vobiz:  # the caller never says a word
        await vobiz.closed.wait()
    assert [name.split("-")[0] for name in vobiz.played_names] == ["greeting", "goodbye"]
    assert vobiz.event_ticks("stop")
    assert any("ended by silence" in r.getMessage() for r in caplog.records)


# ── Signatures that work on every account, and the verification mode (issue 9) ──


def signed_by(token: str, url: str, nonce: str, version: int, header: str = "V") -> dict[str, str]:
    """One signature header as Vobiz sends it: header "V" (X-Vobiz-Signature-V3) or "MA"
    (-MA-V3, keyed with the parent account's token; it shares the V3 nonce header)."""
    signature = vobiz_signs(token, url, nonce, version)[f"X-Vobiz-Signature-V{version}"]
    name = f"X-Vobiz-Signature-{'MA-' if header == 'MA' else ''}V{version}"
    return {name: signature, f"X-Vobiz-Signature-V{version}-Nonce": nonce}


async def test_sub_account_calls_pass_with_the_parent_token_and_rotated_signature_lists(nursery):
    """Fails before issue 9: the MA headers and comma-separated lists were not read (403)."""
    server = await start_server(nursery, public_url="https://calls.example.com", vobiz_auth_token="sub-token",
                                vobiz_parent_auth_token="main-token", vobiz_verify_signatures="required")
    url, fields = "https://calls.example.com/hangup", {"CallUUID": CALL_UUID, "Event": "Hangup"}

    async def status(headers: dict[str, str]) -> int:
        return (await server.post("/hangup", data=fields, headers=headers)).status_code

    # A number on the sub-account: V3 with the sub-account's token, MA-V3 with the main one.
    assert await status({**signed_by("sub-token", url, "10000000000000000001", 3),
                         **signed_by("main-token", url, "10000000000000000001", 3, "MA")}) == 200
    # Only the parent's signature is right (we hold another sub-account's token too): still ours.
    assert await status({**signed_by("someone-else", url, "10000000000000000002", 3),
                         **signed_by("main-token", url, "10000000000000000002", 3, "MA")}) == 200
    assert await status(signed_by("main-token", url, "10000000000000000003", 2, "MA")) == 200  # MA-V2
    assert await status(signed_by("sub-token", url, "10000000000000000004", 3, "MA")) == 403  # wrong key for MA
    # Token rotation: a comma-separated list, one of them right.
    old = signed_by("old-token", url, "10000000000000000005", 3)["X-Vobiz-Signature-V3"]
    rotated = signed_by("sub-token", url, "10000000000000000005", 3)
    rotated["X-Vobiz-Signature-V3"] = f"{old}, {rotated['X-Vobiz-Signature-V3']}"
    assert await status(rotated) == 200
    wrong = signed_by("old-token", url, "10000000000000000006", 3)
    wrong["X-Vobiz-Signature-V3"] += "," + signed_by("other", url, "10000000000000000006", 3)["X-Vobiz-Signature-V3"]
    assert await status(wrong) == 403
    # A main account: no parent token set, the MA headers are checked with the account's own.
    main = await start_server(nursery, public_url="https://calls.example.com", vobiz_auth_token="main-token",
                              vobiz_verify_signatures="required")
    response = await main.post("/hangup", data=fields, headers=signed_by("main-token", url, "1" * 20, 3, "MA"))
    assert response.status_code == 200


async def test_a_signature_mismatch_says_which_url_was_checked_and_no_secret(nursery, caplog):
    """Fails before issue 9: the line said only "wrong V3 signature"."""
    caplog.set_level(logging.WARNING, logger="vobiz_agent")
    server = await start_server(nursery, public_url="https://calls.example.com", vobiz_auth_token="secret-token",
                                vobiz_verify_signatures="when-signed")
    # The console's Answer URL is another host than PUBLIC_URL: Vobiz signed that one.
    signed = signed_by("secret-token", "https://old-tunnel.example.com/answer", "20000000000000000001", 3)
    response = await server.post("/answer?x=1", data={"CallUUID": CALL_UUID}, headers=signed)
    assert response.status_code == 403
    [line] = [r.getMessage() for r in caplog.records if "refused a POST /answer" in r.getMessage()]
    assert "https://calls.example.com/answer" in line and "V3" in line
    assert "secret-token" not in line and signed["X-Vobiz-Signature-V3"] not in line


async def test_verification_is_an_explicit_mode_and_the_banner_says_it(nursery):
    """Fails before issue 9: VOBIZ_AUTH_TOKEN alone turned verification on; there was no mode."""
    from_env = vobiz_agent.Settings.from_env
    assert from_env({"VOBIZ_AUTH_TOKEN": "tok"}).vobiz_verify_signatures == "off"  # set for outbound calls
    assert from_env({"VOBIZ_AUTH_TOKEN": "tok", "VOBIZ_REQUIRE_SIGNATURE": "true"}).vobiz_verify_signatures \
        == "required"  # the old spelling
    assert from_env({"VOBIZ_PARENT_AUTH_TOKEN": "t", "VOBIZ_VERIFY_SIGNATURES": "When-Signed"}) \
        .vobiz_verify_signatures == "when-signed"
    for env in ({"VOBIZ_VERIFY_SIGNATURES": "required"}, {"VOBIZ_VERIFY_SIGNATURES": "sometimes",
                                                          "VOBIZ_AUTH_TOKEN": "t"}):
        with pytest.raises(vobiz_agent.SettingsError, match="VOBIZ_VERIFY_SIGNATURES"):
            from_env(env)
    # Off: a token for outbound calls, and a webhook signed with another token still passes.
    server = await start_server(nursery, public_url="https://calls.example.com", vobiz_auth_token="tok")
    forged = signed_by("guess", "https://calls.example.com/answer", "30000000000000000001", 3)
    assert (await server.post("/answer", data={"CallUUID": CALL_UUID}, headers=forged)).status_code == 200
    off = vobiz_agent.banner(from_env({"VOBIZ_AUTH_TOKEN": "tok"}))
    assert "signatures: off" in off and "answer anyone" in off
    required = vobiz_agent.banner(from_env({"VOBIZ_AUTH_TOKEN": "tok",
                                            "VOBIZ_VERIFY_SIGNATURES": "required"}))
    assert "signatures: required" in required and "anyone" not in required


# ── Outbound options: time limit, machine detection, ring and fallback URLs (issue 9) ──


async def test_the_call_command_passes_the_make_call_options(nursery, caplog):
    """Fails before issue 9: `call` had no --time-limit/--machine-detection/--ring-url/--fallback-url."""
    api = VobizApiStandIn(201)
    api_url = await nursery.start(api.serve)
    code, out, err = await place_call(api_url, "--to", "+919876543210", "--from", "918071387423",
                                      "--time-limit", "600", "--machine-detection", "hangup",
                                      "--fallback-url", "https://backup.example.com/answer")
    assert (code, out) == (0, "0e516b32-req"), err
    body = api.requests[0]["body"]
    assert body["time_limit"] == 600 and body["machine_detection"] == "hangup"
    assert (body["ring_url"], body["ring_method"]) == ("https://abc.ngrok.app/ring", "POST")  # ours
    assert (body["fallback_url"], body["fallback_method"]) == ("https://backup.example.com/answer", "POST")
    code, _, err = await place_call(api_url, "--to", "+91", "--from", "1", "--machine-detection", "maybe")
    assert code == 2 and "machine-detection" in err
    code, _, err = await place_call(api_url, "--to", "+91", "--from", "1", "--time-limit", "0")
    assert code == 2 and "--time-limit" in err
    assert len(api.requests) == 1  # a bad option places no call
    # Our ring URL is served (signed like the other webhooks) and logged.
    caplog.set_level(logging.INFO, logger="vobiz_agent")
    server = await start_server(nursery)
    ringing = await server.post("/ring", data={"CallUUID": "0e516b32-req", "To": "+919876543210",
                                               "Event": "Ring", "CallStatus": "ringing"})
    assert ringing.status_code == 200
    assert any("0e516b32-req: ringing +919876543210" in r.getMessage() for r in caplog.records)


# ── Recording (issue 9) ──


async def test_record_calls_records_the_whole_call_and_logs_where_the_recording_is(nursery, caplog):
    """Fails before issue 9: no <Record> in the answer, and no /recording to tell."""
    caplog.set_level(logging.INFO, logger="vobiz_agent")
    server = await start_server(nursery, record_calls=True)
    async with vobiz_call(server.url) as vobiz:
        await greeted(vobiz)  # the call itself is as before: greeted, answered
    assert [child.tag for child in vobiz.answer_xml][:2] == ["Record", "Stream"]  # recording starts first
    record = vobiz.answer_xml.find("Record")
    assert (record.get("recordSession"), record.get("redirect")) == ("true", "false")
    assert record.get("callbackUrl") == f"{server.url}/recording" and record.get("callbackMethod") == "POST"
    assert vobiz.recording_response.status_code == 200
    assert list(ET.fromstring(vobiz.recording_response.content)) == []  # nothing for the call to do
    assert any(CALL_UUID in r.getMessage() and "Recording/rec-5b1e.mp3" in r.getMessage() and "12 s" in
               r.getMessage() for r in caplog.records)
    plain = await start_server(nursery)
    assert parse_answer(await plain.post("/answer", data={"CallUUID": CALL_UUID})).find("Record") is None
    assert vobiz_agent.Settings.from_env({"RECORD_CALLS": "true"}).record_calls


# ── Keypad: digits to the model, tones from the echo agent (issue 9) ──


def goertzel(pcm: bytes, frequency: float, rate: int = 8000) -> float:
    """The power of one frequency in 16-bit PCM (the Goertzel filter, as DTMF decoders use)."""
    samples = array.array("h", pcm)
    coefficient = 2 * math.cos(2 * math.pi * frequency / rate)
    previous = before = 0.0
    for sample in samples:
        previous, before = sample + coefficient * previous - before, previous
    return previous * previous + before * before - coefficient * previous * before


DTMF_LOW, DTMF_HIGH = (697, 770, 852, 941), (1209, 1336, 1477, 1633)


def keys_heard(pcm: bytes) -> tuple[int, int]:
    """The strongest row and column frequency: the key a DTMF decoder would read."""
    return (max(DTMF_LOW, key=lambda f: goertzel(pcm, f)), max(DTMF_HIGH, key=lambda f: goertzel(pcm, f)))


async def test_the_echo_agent_answers_each_key_with_its_tone_pair(server, caplog):
    """Fails before issue 9: a key press was only logged; the caller heard nothing."""
    caplog.set_level(logging.INFO, logger="vobiz_agent")
    expected = {"5": (770, 1336), "9": (852, 1477), "#": (941, 1477), "1": (697, 1209)}
    shapes = {"5": "vendor", "9": "plivo", "#": "flat", "1": "vendor"}
    async with vobiz_call(server.url) as vobiz:
        await greeted(vobiz)
        for number, key in enumerate(expected, start=1):
            pressed_at = vobiz.tick
            await vobiz.press(key, shapes[key])
            await vobiz.until(lambda n=number: sum(name.startswith("keypad") for name in vobiz.played_names) >= n)
            tone_heard = vobiz.agent_audio(pressed_at, vobiz.tick)
            assert audioop.rms(tone_heard, 2) > 500, key
            row, column = keys_heard(tone_heard)
            assert (row, column) == expected[key], key
            others = [f for f in DTMF_LOW + DTMF_HIGH if f not in expected[key]]
            assert min(goertzel(tone_heard, row), goertzel(tone_heard, column)) > \
                30 * max(goertzel(tone_heard, f) for f in others), key  # a clean pair, ~15 dB over the rest
        await vobiz.ws.send_message(json.dumps({"event": "dtmf", "dtmf": {"digit": "X"}}))
        await vobiz.until(lambda: any("not a key" in r.getMessage() for r in caplog.records))
    assert sum(name.startswith("keypad") for name in vobiz.played_names) == 4


async def test_the_ai_agent_gets_the_keys_pressed_as_one_user_turn(nursery):
    """Fails before issue 9: digits never reached the model."""
    ai = await start_providers(nursery, [])
    ai.openai.replies = [["You chose one two three."], ["Four two it is."]]
    async with vobiz_call(ai.server.url) as vobiz:
        await greeted(vobiz)
        for key in "123":  # then a pause: the keys go to the model as one turn
            await vobiz.press(key)
        await ai.openai.wait_until(lambda: len(ai.openai.chat_requests) >= 1)
        await vobiz.until(lambda: len(vobiz.played_names) >= 2)
        for key, shape in (("4", "plivo"), ("2", "flat"), ("#", "vendor")):  # '#' ends them at once
            await vobiz.press(key, shape)
        await ai.openai.wait_until(lambda: len(ai.openai.chat_requests) >= 2)
    assert ai.user_messages(0) == ["[the caller pressed 1 2 3]"]
    assert ai.user_messages(1) == ["[the caller pressed 1 2 3]", "[the caller pressed 4 2]"]
    assert ai.assistant_messages(1)[-1] == "You chose one two three."


# ── Transfer to a person, through the Vobiz REST API (issue 9) ──


async def transfer_server(nursery, transfer_status: int = 202, **settings):
    api = VobizApiStandIn(transfer_status=transfer_status)
    api_url = await nursery.start(api.serve)
    server = await start_server(nursery, vobiz_api_url=api_url, vobiz_auth_id="MA_TEST", vobiz_auth_token="tok",
                                transfer_number="+919000000001", **settings)
    return api, server


async def test_pressing_0_hands_the_caller_to_a_person(nursery, caplog):
    """Fails before issue 9: 0 was only logged; there was no transfer and no /transfer."""
    caplog.set_level(logging.INFO, logger="vobiz_agent")
    api, server = await transfer_server(nursery)
    async with vobiz_call(server.url) as vobiz:
        api.streams[CALL_UUID] = vobiz
        await greeted(vobiz)
        await vobiz.press("0")
        await vobiz.closed.wait()  # Vobiz moved the call to the <Dial>: our stream is over
    [transfer] = api.transfers
    assert transfer["path"] == f"/api/v1/Account/MA_TEST/Call/{CALL_UUID}/"
    assert transfer["headers"]["X-Auth-Id"] == "MA_TEST" and transfer["headers"]["X-Auth-Token"] == "tok"
    assert transfer["body"] == {"legs": "aleg", "aleg_url": f"{server.url}/transfer", "aleg_method": "POST"}
    assert transfer["played_before"][-1].startswith("transfer")  # the caller heard it coming first
    assert [child.tag for child in transfer["xml"]] == ["Dial"]
    dial = transfer["xml"].find("Dial")
    assert dial.get("callerId") == "07971442086"  # our number on the call
    assert [number.text for number in dial.findall("Number")] == ["+919000000001"]
    await server.app.switchboard.wait_until_empty()
    metrics = (await server.get("/metrics")).text
    assert 'vobiz_agent_transfers_total{outcome="ok"} 1.0' in metrics
    assert 'vobiz_agent_calls_total{ended="transfer"} 1.0' in metrics
    assert any("Vobiz is moving the call to a person" in r.getMessage() for r in caplog.records)
    with pytest.raises(vobiz_agent.SettingsError, match="TRANSFER_NUMBER.*VOBIZ_AUTH_ID"):
        vobiz_agent.Settings.from_env({"TRANSFER_NUMBER": "+919000000001"})  # a transfer needs the API


async def test_when_vobiz_refuses_the_transfer_the_caller_hears_an_apology_and_talks_on(nursery, caplog):
    """Fails before issue 9: no transfer was ever attempted."""
    caplog.set_level(logging.INFO, logger="vobiz_agent")
    api, server = await transfer_server(nursery, transfer_status=404)
    words = speech(0.8, seed=95)
    async with vobiz_call(server.url) as vobiz:
        api.streams[CALL_UUID] = vobiz
        await greeted(vobiz)
        await vobiz.press("0")
        await vobiz.until(lambda: any(name.startswith("apology") for name in vobiz.played_names))
        said = vobiz.say(words)  # and the call goes on
        await vobiz.until(lambda: any(name.startswith("echo") for name in vobiz.played_names))
        assert resemblance(vobiz.agent_audio(said, vobiz.tick), words) > 0.9
    assert len(api.transfers) == 1 and not vobiz.event_ticks("stop")
    assert [name.split("-")[0] for name in vobiz.played_names] == ["greeting", "transfer", "apology", "echo"]
    assert 'vobiz_agent_transfers_total{outcome="failed"} 1.0' in (await server.get("/metrics")).text
    assert any("transfer failed (Vobiz answered HTTP 404" in r.getMessage() for r in caplog.records)
    # /transfer is a webhook like the others: signed when signatures are required.
    _, strict = await transfer_server(nursery, vobiz_verify_signatures="required")
    assert (await strict.post("/transfer", data={"CallUUID": CALL_UUID})).status_code == 403


async def test_the_model_can_transfer_the_call_when_a_transfer_number_is_set(nursery):
    """Fails before issue 9: the model was offered no transfer_call tool."""
    api = VobizApiStandIn()
    api_url = await nursery.start(api.serve)
    ai = await start_providers(nursery, ["Can I talk to a person?"], vobiz_api_url=api_url, vobiz_auth_id="MA_TEST",
                               vobiz_auth_token="tok", transfer_number="+919000000001")
    ai.openai.replies = [[TRANSFER]]
    async with vobiz_call(ai.server.url) as vobiz:
        api.streams[CALL_UUID] = vobiz
        await greeted(vobiz)
        vobiz.say(speech(0.8, seed=96))
        await vobiz.closed.wait()
    tools = [tool["function"]["name"] for tool in ai.openai.chat_requests[0]["body"]["tools"]]
    assert tools == ["hang_up", "transfer_call"]
    assert ai.spoken_texts() == ["Hello, how can I help?", vobiz_agent.TRANSFER_LINE]  # no "empty reply" apology
    assert api.transfers[0]["body"]["aleg_url"] == f"{ai.server.url}/transfer"
    assert api.transfers[0]["xml"].find("Dial/Number").text == "+919000000001"


# ── A transcript per call (issue 9) ──


def transcript_of(caplog, call_id: str = CALL_UUID) -> logging.LogRecord:
    [record] = [r for r in caplog.records if getattr(r, "fields", {}).get("transcript") is not None
                and r.fields["call"] == call_id]
    return record


def shape(entry: dict) -> tuple:
    """A transcript entry, short: (label, heard) for the agent, (kind, digits or text) for the caller."""
    if entry.get("event"):
        return (entry["event"], entry["outcome"].split(":")[0])
    if entry["who"] == "agent":
        return (entry["label"], entry["heard"])
    return ("caller", entry["kind"], entry.get("digits") or entry.get("text") or "speech")


async def test_the_call_ends_with_one_transcript_record_of_everything_said(nursery, caplog):
    """Fails before issue 9: no transcript was logged."""
    caplog.set_level(logging.INFO, logger="vobiz_agent")
    api, server = await transfer_server(nursery, transfer_status=404)
    long_words, interruption = speech(3.0, seed=97), speech(0.5, seed=98)
    async with vobiz_call(server.url) as vobiz:
        api.streams[CALL_UUID] = vobiz
        await greeted(vobiz)
        said = vobiz.say(long_words)
        await vobiz.until(lambda: len(vobiz.agent_ticks(said + len(long_words) // 320)) >= 25)
        vobiz.say(interruption)  # cuts the first echo off
        await vobiz.until(lambda: "echo-3" in vobiz.played_names)
        await vobiz.press("5")
        await vobiz.until(lambda: any(name.startswith("keypad") for name in vobiz.played_names))
        await vobiz.press("0")  # a transfer Vobiz refuses
        await vobiz.until(lambda: any(name.startswith("apology") for name in vobiz.played_names))
    await server.app.switchboard.wait_until_empty()
    record = transcript_of(caplog)
    entries = record.fields["transcript"]
    assert [shape(entry) for entry in entries] == [
        ("greeting", "heard"), ("caller", "speech", "speech"), ("echo", "cut off"), ("caller", "speech", "speech"),
        ("echo", "heard"), ("caller", "digits", "5"), ("keypad", "heard"), ("caller", "digits", "0"),
        ("transfer", "heard"), ("transfer", "failed"), ("apology", "heard")]
    assert abs(entries[1]["seconds"] - 3.0) < 0.5 and abs(entries[3]["seconds"] - 0.5) < 0.5
    assert record.fields["ended_by"] == "hang-up" and record.fields["seconds"] > 3
    line = json.loads(vobiz_agent.JsonLogFormatter().format(record))  # LOG_FORMAT=json: one object
    assert line["transcript"] == entries and line["call"] == CALL_UUID
    assert "caller pressed 5" in line["message"] and "transfer failed" in line["message"]


async def test_the_ai_agents_transcript_has_the_words_and_no_secrets(nursery, caplog):
    """Fails before issue 9: no transcript was logged."""
    caplog.set_level(logging.INFO, logger="vobiz_agent")
    ai = await start_providers(nursery, ["What's the weather like?", "Thanks, goodbye."])
    ai.openai.replies = [["It is sunny today."], ["Bye now.", HANG_UP]]
    async with vobiz_call(ai.server.url) as vobiz:
        await greeted(vobiz)
        vobiz.say(speech(0.8, seed=99))
        await vobiz.until(lambda: len(vobiz.played_names) >= 2)
        vobiz.say(speech(0.8, seed=100))
        await vobiz.closed.wait()  # the agent hung up
    await ai.server.app.switchboard.wait_until_empty()
    record = transcript_of(caplog)
    said = [(entry["who"], entry["text"], entry.get("heard")) for entry in record.fields["transcript"]]
    assert said == [("agent", "Hello, how can I help?", "heard"), ("caller", "What's the weather like?", None),
                    ("agent", "It is sunny today.", "heard"), ("caller", "Thanks, goodbye.", None),
                    ("agent", "Bye now.", "heard")]
    assert record.fields["ended_by"] == "agent"
    text = vobiz_agent.JsonLogFormatter().format(record)
    assert "sk-secret" not in text and "dg-secret" not in text and "payload" not in text
    assert '"It is sunny today." (heard)' in record.getMessage()


async def test_keys_typed_in_a_quick_run_are_all_echoed_in_order(server, caplog):
    """Fails before issue 9: no key was echoed."""
    caplog.set_level(logging.WARNING, logger="vobiz_agent")
    keys = "147*2580"
    async with vobiz_call(server.url) as vobiz:
        await greeted(vobiz)
        pressed_at = vobiz.tick + 1  # the greeting's last frame played at vobiz.tick
        for key in keys:  # faster than the tones play: none may be lost
            await vobiz.press(key)
        await vobiz.until(lambda: sum(name.startswith("keypad") for name in vobiz.played_names) >= len(keys))
        heard = vobiz.agent_audio(pressed_at, vobiz.tick)
    tone_ticks = [t for t in range(pressed_at, vobiz.tick) if audioop.rms(vobiz.agent_audio(t, t + 1), 2) > 500]
    runs, current = [], [tone_ticks[0]]
    for tick in tone_ticks[1:]:  # each tone is a run of loud ticks; the 60 ms gaps split them
        if tick == current[-1] + 1:
            current.append(tick)
        else:
            runs.append(current)
            current = [tick]
    runs.append(current)
    decoded = [keys_heard(vobiz.agent_audio(run[1], run[-1])) for run in runs]
    columns = {1209: "147*", 1336: "2580", 1477: "369#", 1633: "ABCD"}
    rows = {697: "123A", 770: "456B", 852: "789C", 941: "*0#D"}
    assert "".join((set(rows[row]) & set(columns[column])).pop() for row, column in decoded) == keys
    assert not any("dropped" in r.getMessage() for r in caplog.records)
    assert audioop.rms(heard, 2) > 1000


# ── The browser softphone (issue 13) ──
#
# /phone is a page that plays the part of Vobiz. The test drives Debian's Chromium headless
# through the DevTools protocol (over trio-websocket, so no selenium), with a fake microphone
# fed from a WAV of espeak-ng speech, against the real server with the offline echo agent.
# The page writes every protocol event to its console; the test waits on those lines.

CHROMIUM, ESPEAK, SOX = shutil.which("chromium"), shutil.which("espeak-ng"), shutil.which("sox")
SCREENSHOT = os.environ.get("PHONE_SCREENSHOT")  # e.g. PHONE_SCREENSHOT=phone.png: refresh README's picture


async def test_the_phone_page_is_served_and_its_calls_are_counted_against_the_limits(nursery):
    server = await start_server(nursery, max_calls=1)
    page = await server.get("/phone")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert b"getUserMedia" in page.content and b"audioWorklet" in page.content
    answer = (await server.post("/phone/call")).json()
    assert answer["mediaUrl"].startswith(server.url.replace("http", "ws") + f"/ws/{answer['callId']}/")
    async with vobiz_call(server.url, url=answer["mediaUrl"], call_id=answer["callId"]) as vobiz:
        await greeted(vobiz)  # the page's URL is an ordinary media URL: the same Call answers it
        busy = await server.post("/phone/call")
        assert busy.status_code == 503 and busy.json() == {"error": "busy"}
    assert 'vobiz_agent_calls_refused_total{reason="busy"} 1.0' in (await server.get("/metrics")).text


async def test_the_phone_is_off_for_the_ai_agent_on_a_public_address_unless_asked_for():
    keys = {"DEEPGRAM_API_KEY": "dg", "OPENAI_API_KEY": "sk"}
    public_ai = vobiz_agent.Settings.from_env({**keys, "HOST": "0.0.0.0"})
    assert not public_ai.serves_phone
    assert "PHONE=true turns it on" in vobiz_agent.banner(public_ai)
    assert vobiz_agent.Settings.from_env({**keys, "HOST": "127.0.0.1"}).serves_phone
    assert vobiz_agent.Settings.from_env({"HOST": "0.0.0.0"}).serves_phone  # the offline agent
    assert not vobiz_agent.Settings.from_env({"PHONE": "false"}).serves_phone
    asked = vobiz_agent.Settings.from_env({**keys, "PHONE": "true", "HOST": "0.0.0.0", "PORT": "5001"})
    text = vobiz_agent.banner(asked)
    assert "http://localhost:5001/phone" in text and "spend your provider budget" in text
    app = vobiz_agent.create_app(public_ai)
    assert "/phone" not in {rule.rule for rule in app.url_map.iter_rules()}
    with pytest.raises(vobiz_agent.SettingsError, match="PHONE"):
        vobiz_agent.Settings.from_env({"PHONE": "maybe"})


def caller_wav(folder, *phrases: tuple[float, str]) -> tuple[str, list[float]]:
    """The fake microphone: each phrase (quiet for that many seconds, then espeak-ng saying
    it), then 4 s of quiet, as 16-bit PCM (Chromium plays silence, without an error, from
    any other WAV). Returns the path and each phrase's length in seconds."""
    parts, lengths = [], []
    for number, (quiet_s, text) in enumerate(phrases):
        said, padded = str(folder / f"said-{number}.wav"), str(folder / f"padded-{number}.wav")
        subprocess.run([ESPEAK, "-v", "en", "-s", "160", "-w", str(folder / "espeak.wav"), text], check=True)
        # espeak-ng ends with a quarter second of silence: cut it (and any before), so the
        # phrase's length is the speech's.
        subprocess.run([SOX, str(folder / "espeak.wav"), said, "silence", "1", "0.01", "0.1%", "reverse",
                        "silence", "1", "0.01", "0.1%", "reverse"], check=True)
        lengths.append(float(subprocess.run([SOX, "--i", "-D", said], check=True, capture_output=True,
                                            text=True).stdout))
        subprocess.run([SOX, said, padded, "pad", str(quiet_s), "0"], check=True)
        parts.append(padded)
    path = str(folder / "caller.wav")
    subprocess.run([SOX, *parts, "-b", "16", "-e", "signed-integer", "-c", "1", "-r", "48000", path, "pad", "0", "4"],
                   check=True)
    return path, lengths


class DevTools:
    """Chromium's DevTools protocol on one WebSocket: commands and their replies, the page's
    console lines (in order) for the test to wait on, and every WebSocket message it sent."""

    def __init__(self, ws):
        self.ws, self.next_id = ws, 0
        self.replies: dict[int, dict] = {}
        self.console: list[str] = []
        self.sent: list[tuple[float, dict]] = []  # (when, message) for each frame the page sent the agent
        self._changed = trio.Event()

    async def run(self) -> None:
        with suppress(trio_websocket.ConnectionClosed):
            while True:
                message = json.loads(await self.ws.get_message())
                if "id" in message:
                    self.replies[message["id"]] = message
                elif message.get("method") == "Runtime.consoleAPICalled":
                    self.console.append(" ".join(str(arg.get("value", "")) for arg in message["params"]["args"]))
                elif message.get("method") == "Network.webSocketFrameSent":
                    params = message["params"]
                    self.sent.append((params["timestamp"], json.loads(params["response"]["payloadData"])))
                self._changed.set()
                self._changed = trio.Event()

    async def until(self, condition):
        while not (found := condition()):
            await self._changed.wait()
        return found

    async def send(self, method: str, session: str | None = None, **params) -> dict:
        self.next_id += 1
        number = self.next_id
        await self.ws.send_message(json.dumps({"id": number, "method": method, "params": params,
                                               **({"sessionId": session} if session else {})}))
        reply = await self.until(lambda: self.replies.pop(number, None))
        assert "error" not in reply, reply
        return reply["result"]

    async def logged(self, pattern: str) -> re.Match:
        """Wait for a console line matching `pattern`."""
        return await self.until(lambda: next(filter(None, (re.search(pattern, line) for line in self.console)), None))


@asynccontextmanager
async def chromium(folder, fake_microphone: str | None = None):
    """Headless Chromium, with a fake microphone playing that WAV; yields (DevTools, session of one page)."""
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={folder / 'profile'}", "--use-fake-ui-for-media-stream",
               "--use-fake-device-for-media-stream", "--autoplay-policy=no-user-gesture-required",
               "--window-size=860,760", "--remote-debugging-port=0", "about:blank"]
    if fake_microphone:
        command.insert(-1, f"--use-file-for-fake-audio-capture={fake_microphone}%noloop")
    async with trio.open_nursery() as nursery:
        browser = await nursery.start(partial(trio.run_process, command, stdout=subprocess.DEVNULL,
                                              stderr=subprocess.PIPE, check=False))
        output, found = b"", None
        async for chunk in browser.stderr:  # Chromium says where its DevTools socket listens
            output += chunk
            if found := re.search(rb"DevTools listening on (ws://\S+)", output):
                break
        assert found, f"chromium did not start: {output[-800:].decode(errors='replace')}"
        nursery.start_soon(drain, browser.stderr)  # a full pipe would stall the browser
        async with trio_websocket.open_websocket_url(found[1].decode(), max_message_size=2**24) as ws:
            devtools = DevTools(ws)
            nursery.start_soon(devtools.run)
            target = await devtools.send("Target.createTarget", url="about:blank")
            session = (await devtools.send("Target.attachToTarget", targetId=target["targetId"],
                                           flatten=True))["sessionId"]
            await devtools.send("Runtime.enable", session)
            await devtools.send("Network.enable", session)
            yield devtools, session
            await ws.send_message(json.dumps({"id": 0, "method": "Browser.close"}))  # no reply: it closes
        with trio.fail_after(10):
            await browser.wait()
        nursery.cancel_scope.cancel()


async def drain(stream) -> None:
    async for _ in stream:
        pass


async def open_page(devtools: DevTools, page: str, url: str) -> None:
    await devtools.send("Page.navigate", page, url=url)
    await devtools.send("Runtime.evaluate", page, awaitPromise=True, expression=(
        "new Promise(ready => document.readyState === 'complete' ? ready() : onload = ready)"))


async def click(devtools: DevTools, page: str, selector: str) -> None:
    await devtools.send("Runtime.evaluate", page, userGesture=True,
                        expression=f"document.querySelector({json.dumps(selector)}).click()")


async def call_from_the_page(devtools: DevTools, page: str, url: str) -> dict[str, re.Match]:
    """Open the page, click Call, wait for the conversation to happen, press 5, hang up."""
    await open_page(devtools, page, url)
    await click(devtools, page, "#call")
    seen = {"rate": await devtools.logged(r"microphone at (\d+) Hz"),
            "greeting": await devtools.logged(r"→ playedStream greeting-1 \(played ([\d.]+) s at (-\d+) dBFS"),
            "clear": await devtools.logged(r"← clearAudio"),
            "cleared": await devtools.logged(r"→ clearedAudio"),
            "echo": await devtools.logged(r"→ playedStream (echo-\d+) \(played ([\d.]+) s at (-\d+) dBFS")}
    await click(devtools, page, "#keypad button:nth-child(5)")  # the keypad's 5
    await devtools.logged(r"→ dtmf 5")
    seen["screenshot"] = await devtools.send("Page.captureScreenshot", page, format="png")
    await click(devtools, page, "#hangup")
    await devtools.logged(r"hung up")
    return seen


@pytest.mark.skipif(not (CHROMIUM and ESPEAK and SOX), reason="the browser softphone test needs Debian's "
                    "chromium, espeak-ng and sox (apt-get install chromium espeak-ng sox)")
async def test_a_call_from_the_browser_softphone(nursery, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="vobiz_agent")
    server = await start_server(nursery)
    # The second phrase starts while the echo of the first is playing: a barge-in. (It starts
    # with words, not "Stop,": a word under 0.2 s before a pause is not speech to the ears.)
    wav, (_, second_s) = caller_wav(tmp_path, (1.5, "Hello agent, this is a call from the browser."),
                                    (1.3, "Sorry to interrupt you, I have something else to say."))
    with trio.fail_after(25):
        async with chromium(tmp_path, wav) as (devtools, page):
            try:
                seen = await call_from_the_page(devtools, page, server.url + "/phone")
            finally:
                print("the page's console:", *devtools.console, sep="\n")  # pytest shows it if the test fails
            await server.app.switchboard.wait_until_empty()  # Hang up closed the socket: the call ended
    picture = base64.b64decode(seen["screenshot"]["data"])
    assert picture.startswith(b"\x89PNG")
    (tmp_path / "phone.png").write_bytes(picture)
    if SCREENSHOT:
        Path(SCREENSHOT).write_bytes(picture)
    # The page played the greeting: the whole chime (0.48 s), loud enough to hear.
    greeting = seen["greeting"]
    assert float(greeting[1]) == pytest.approx(0.48, abs=0.03) and int(greeting[2]) > -30
    # The caller's words reached the server as turns; the second interrupted the echo of the first.
    metrics = (await server.get("/metrics")).text
    assert "vobiz_agent_turns_total 2.0" in metrics and "vobiz_agent_barge_ins_total 1.0" in metrics
    assert 'vobiz_agent_calls_total{ended="hang-up"} 1.0' in metrics
    server_log = [r.getMessage() for r in caplog.records]
    assert any("barge-in: the caller spoke over the agent" in line for line in server_log)
    # The page played the echo of the second phrase, all of it (with the ears' 0.1 s before the
    # speech and 0.1 s after): the server heard every word said over the agent.
    _, name, seconds, level = seen["echo"].group(0, 1, 2, 3)
    assert name == "echo-3" and float(seconds) == pytest.approx(second_s + 0.2, abs=0.15) and int(level) > -35
    # Every checkpoint the server sent was acknowledged once its audio had played; the cut echo
    # (echo-2) never got its checkpoint, and the page answered clearAudio.
    console = devtools.console
    checkpoints = [line.split()[-1] for line in console if line.startswith("← checkpoint")]
    acked = [line.split()[2] for line in console if line.startswith("→ playedStream")]
    assert checkpoints == acked == ["greeting-1", "echo-3"]
    assert console.index(seen["cleared"].string) == console.index(seen["clear"].string) + 1
    # Each turn's latency: the echo agent waits for 600 ms of quiet, then answers at once.
    latencies = [int(line.split()[2]) for line in console if re.match(r"turn \d+: \d+ ms", line)]
    assert len(latencies) == 2 and all(550 < ms < 1500 for ms in latencies)
    assert any("caller pressed 5" in line for line in server_log)
    assert not [line for line in server_log if "bad frame" in line]
    assert_sent_like_vobiz(devtools.sent)


def assert_sent_like_vobiz(sent: list[tuple[float, dict]]) -> None:
    """What the page sent, read off the wire: Vobiz's shapes, and exact 160-byte frames every 20 ms."""
    (_, start), *rest = sent
    assert start["event"] == "start" and start["sequenceNumber"] == 0
    stream_id = start["start"]["streamId"]
    assert start["start"]["callId"] and start["start"]["mediaFormat"] == {"encoding": "audio/x-mulaw",
                                                                          "sampleRate": 8000}
    media = [(when, message) for when, message in rest if message["event"] == "media"]
    assert [m["sequenceNumber"] for _, m in media] == [m["media"]["chunk"] for _, m in media] == list(
        range(1, len(media) + 1))
    assert {len(base64.b64decode(m["media"]["payload"])) for _, m in media} == {160}
    assert {(m["streamId"], m["media"]["track"]) for _, m in media} == {(stream_id, "inbound")}
    # Paced by the audio clock: over the whole call, one frame per 20 ms (the frames of each
    # 128-sample audio block leave together, so single gaps vary by a few milliseconds).
    assert (media[-1][0] - media[0][0]) / (len(media) - 1) == pytest.approx(0.020, abs=0.0005)
    others = [message for _, message in rest if message["event"] != "media"]
    assert [m["event"] for m in others] == ["playedStream", "clearedAudio", "playedStream", "dtmf"]
    assert others[0] == {"event": "playedStream", "name": "greeting-1"}
    assert others[1] == {"sequenceNumber": 0, "event": "clearedAudio", "streamId": stream_id}
    assert others[3] == {"event": "dtmf", "dtmf": {"digit": "5"}}



@pytest.mark.skipif(not (CHROMIUM and ESPEAK and SOX), reason="the browser softphone test needs Debian's "
                    "chromium, espeak-ng and sox (apt-get install chromium espeak-ng sox)")
async def test_the_page_plays_the_whole_echo_then_the_goodbye_and_closes_on_stop(nursery, tmp_path):
    server = await start_server(nursery, silence_timeout_s=3.0)  # then quiet: the agent says goodbye
    wav, (said_s,) = caller_wav(tmp_path, (0.8, "One phrase, said in a quiet room."))
    with trio.fail_after(20):
        async with chromium(tmp_path, wav) as (devtools, page):
            await open_page(devtools, page, server.url + "/phone")
            await click(devtools, page, "#call")
            echo = await devtools.logged(r"→ playedStream echo-2 \(played ([\d.]+) s at (-\d+) dBFS")
            await devtools.logged(r"hung up")
    await server.app.switchboard.wait_until_empty()
    # The server heard the whole phrase, and the page played all of it back (with the ears'
    # 0.1 s before the speech and 0.1 s after).
    assert float(echo[1]) == pytest.approx(said_s + 0.2, abs=0.15) and int(echo[2]) > -35
    console = [line for line in devtools.console if not line.startswith("← playAudio")]
    assert console[-5:] == ["← checkpoint goodbye-3", console[-4], "← stop", "socket closed (1000)", "hung up"]
    assert console[-4].startswith("→ playedStream goodbye-3")  # played to the end before the stop
    assert 'vobiz_agent_calls_total{ended="silence"} 1.0' in (await server.get("/metrics")).text

# The microphone worklet, fed tones in an OfflineAudioContext at each rate: what it sends,
# decoded from μ-law in the page. One second of tone must be 50 frames of 160 bytes, at the
# tone's level and frequency (zero crossings), and a tone above 4 kHz must not fold into the band.
RESAMPLE_IN_THE_PAGE = """
async function resampled(rate, frequency) {
  const context = new OfflineAudioContext(1, rate, rate);
  const code = new Blob([document.getElementById("worklets").textContent], {type: "text/javascript"});
  await context.audioWorklet.addModule(URL.createObjectURL(code));
  const microphone = new AudioWorkletNode(context, "microphone", {numberOfOutputs: 0});
  const tone = new OscillatorNode(context, {frequency});
  tone.connect(new GainNode(context, {gain: 0.5})).connect(microphone);
  tone.start();
  const frames = [];
  microphone.port.onmessage = ({data}) => frames.push(data.frame);
  await context.startRendering();
  while (frames.length < 50) await new Promise(soon => setTimeout(soon, 10));  // messages still on their way
  const samples = frames.slice(5).flatMap(frame => Array.from(frame, byte => ULAW[byte]));  // after the filter's start
  let crossings = 0;
  for (let i = 1; i < samples.length; i++) crossings += (samples[i - 1] < 0) !== (samples[i] < 0);
  const rms = Math.sqrt(samples.reduce((sum, x) => sum + x * x, 0) / samples.length);
  return {frames: frames.length, sizes: [...new Set(frames.map(frame => frame.length))],
          db: 20 * Math.log10(rms), hz: crossings / 2 / (samples.length / 8000)};
}
"""


@pytest.mark.skipif(not CHROMIUM, reason="the softphone's resampler test needs Debian's chromium")
async def test_the_page_sends_8khz_from_any_rate_without_aliasing(nursery, tmp_path):
    server = await start_server(nursery)
    with trio.fail_after(20):
        async with chromium(tmp_path) as (devtools, page):
            await open_page(devtools, page, server.url + "/phone")
            await devtools.send("Runtime.evaluate", page, expression=RESAMPLE_IN_THE_PAGE)
            results = {}
            for rate in (16000, 22050, 44100, 48000, 96000):
                for frequency in (1000, 5500):
                    reply = await devtools.send("Runtime.evaluate", page, awaitPromise=True, returnByValue=True,
                                                expression=f"resampled({rate}, {frequency})")
                    assert "exceptionDetails" not in reply, reply
                    results[rate, frequency] = reply["result"]["value"]
    for (rate, frequency), found in results.items():
        assert found["frames"] == 50 and found["sizes"] == [160], (rate, found)  # 1 s = 50 × 20 ms
        if frequency == 1000:  # passed at its level (a sine at half scale: -9 dBFS) and pitch
            assert found["db"] == pytest.approx(-9.0, abs=1.0) and found["hz"] == pytest.approx(1000, abs=10), rate
        else:  # 5.5 kHz would fold to 2.5 kHz at full strength without the low-pass
            assert found["db"] < -45, (rate, found)




# ── Reconnects, the end of every call, busy without billing (issue 9) ──


async def test_a_drop_beyond_max_retries_ends_the_call(nursery):
    server = await start_server(nursery, stream_max_retries=1)
    async with vobiz_call(server.url) as vobiz:
        await greeted(vobiz)
        await vobiz.drop()  # the first drop is retried ...
        await vobiz.until(lambda: len(vobiz.streams) == 2)
        await vobiz.until_tick(vobiz.tick + 5)
        await vobiz.drop()  # ... the second is one too many
        await vobiz.closed.wait()
    assert vobiz.streams == ["stream-1", "stream-1-retry1"]
    assert vobiz.hangup_reason == "Hangup after Stream" and not vobiz.call_open  # no dead air


async def test_a_refused_socket_is_retried_and_then_the_call_hangs_up(nursery):
    server = await start_server(nursery)
    vobiz = SimulatedVobiz()
    url = await vobiz.answer(server.url)
    vobiz.url = url[:-2] + ("AA" if not url.endswith("AA") else "BB")  # a URL this server will refuse
    with trio.fail_after(CALL_LIMIT_S):
        await nursery.start(vobiz.run)
        await vobiz.closed.wait()
    assert vobiz.refused == [403] * 4  # the first attempt and three retries (STREAM_MAX_RETRIES)
    assert vobiz.hangup_reason == "Hangup after Stream" and not vobiz.call_open


async def test_a_reconnect_to_another_process_after_a_minute_apologises_and_goes_on(nursery, caplog):
    caplog.set_level(logging.INFO, logger="vobiz_agent")
    shared = {"stream_secret": b"shared-secret", "stream_secret_generated": False}
    first = await start_server(nursery, **shared)
    other = await start_server(nursery, **shared)  # no memory of the call: only STREAM_SECRET in common
    url = await media_url(first)
    issued = int(time.time()) - 120  # the same URL, as /answer made it two minutes ago
    token = vobiz_agent.StreamToken(b"shared-secret").issue(CALL_UUID, issued, "AAAAAAAA")
    late = url.replace(first.url.removeprefix("http://"), other.url.removeprefix("http://")).rsplit("/", 1)[0]
    words = speech(0.8, seed=85)
    async with vobiz_call(other.url, url=f"{late}/{token}", stream_id="stream-1-retry1") as vobiz:
        await vobiz.until(lambda: vobiz.played_names)
        said = vobiz.say(words)
        await vobiz.until(lambda: len(vobiz.played_names) >= 2)
    assert [name.split("-")[0] for name in vobiz.played_names] == ["sorry", "echo"]  # not the greeting
    sorry = audioop.ratecv(vobiz_agent.chime((660.0, 660.0)), 2, 1, 24000, 8000, None)[0]
    assert resemblance(vobiz.agent_audio(0, said), sorry) > 0.9
    assert resemblance(vobiz.agent_audio(said, vobiz.tick), words) > 0.9
    assert any("the caller hears we were cut off" in r.getMessage() for r in caplog.records)


async def test_the_ai_agent_says_sorry_we_were_cut_off_through_its_voice(nursery):
    ai = await start_providers(nursery, stream_secret=b"shared-secret", stream_secret_generated=False)
    issued = int(time.time()) - 120
    token = vobiz_agent.StreamToken(b"shared-secret").issue(CALL_UUID, issued, "AAAAAAAA")
    url = f"{ai.server.url.replace('http', 'ws', 1)}/ws/{CALL_UUID}/{token}"
    async with vobiz_call(ai.server.url, url=url) as vobiz:
        await vobiz.until(lambda: vobiz.played_names)
        assert heard_sentence(vobiz, ai.openai, vobiz_agent.CUT_OFF) > 0.9
    assert ai.spoken_texts() == [vobiz_agent.CUT_OFF]


async def test_every_call_ends_at_max_call_s_with_a_goodbye(nursery, caplog):
    caplog.set_level(logging.INFO, logger="vobiz_agent")
    # The limit counts from the answer in whole seconds, so it comes 3 to 4 s in: after the
    # echo (done about 2.5 s in) whichever way the second falls.
    server = await start_server(nursery, max_call_s=4.0)
    async with vobiz_call(server.url) as vobiz:
        await greeted(vobiz)
        vobiz.say(speech(0.4, seed=86))  # a caller who talks does not stop the clock
        await vobiz.closed.wait()
    assert [name.split("-")[0] for name in vobiz.played_names] == ["greeting", "echo", "goodbye"]
    assert vobiz.event_ticks("stop") and vobiz.hangup_reason == "Hangup after Stream"
    # The limit counts from the answer (in whole seconds), then the goodbye plays.
    assert 3.0 <= vobiz.event_ticks("stop")[0] * TICK <= 5.5
    assert any("MAX_CALL_S" in r.getMessage() for r in caplog.records)
    assert 'vobiz_agent_calls_total{ended="time limit"} 1.0' in (await server.get("/metrics")).text


async def test_the_ai_agent_too_says_goodbye_to_a_silent_line(nursery):
    ai = await start_providers(nursery, silence_timeout_s=1.0)
    async with vobiz_call(ai.server.url) as vobiz:  # the caller never says a word
        await vobiz.closed.wait()
    assert ai.spoken_texts() == ["Hello, how can I help?", vobiz_agent.FAREWELL]
    assert heard_sentence(vobiz, ai.openai, vobiz_agent.FAREWELL, start=vobiz.event_ticks("checkpoint")[0]) > 0.9
    assert vobiz.event_ticks("stop") and vobiz.hangup_reason == "Hangup after Stream"


def test_old_setting_name_for_the_silence_timeout_still_works():
    assert vobiz_agent.Settings.from_env({"OFFLINE_SILENCE_S": "7"}).silence_timeout_s == 7
    assert vobiz_agent.Settings.from_env({"SILENCE_TIMEOUT_S": "9"}).silence_timeout_s == 9
    assert vobiz_agent.Settings.from_env({"STREAM_MAX_RETRIES": "0"}).stream_max_retries == 0
    with pytest.raises(vobiz_agent.SettingsError, match="STREAM_MAX_RETRIES"):
        vobiz_agent.Settings.from_env({"STREAM_MAX_RETRIES": "11"})


# ── Hostile and broken peers (issue 11) ──


async def test_one_media_url_is_one_live_socket(nursery):
    server = await start_server(nursery)
    async with vobiz_call(server.url) as vobiz:
        await greeted(vobiz)
        statuses = []

        async def intrude() -> None:
            statuses.append(await refused_status(vobiz.url))

        async with trio.open_nursery() as intruders:  # 20 more sockets on the same URL, at once
            for _ in range(20):
                intruders.start_soon(intrude)
        assert statuses == [409] * 20  # refused before accept: no call, no slot, no provider stream
        assert (await server.get("/health")).json()["calls"] == 1
        await vobiz.drop()  # after it closes, the same URL may reconnect (Vobiz maxRetries)
        await vobiz.until(lambda: len(vobiz.streams) == 2)
        await vobiz.until(lambda: len(server.app.switchboard) == 1)
    metrics = (await server.get("/metrics")).text
    assert 'vobiz_agent_calls_refused_total{reason="already connected"} 20.0' in metrics


async def test_a_second_answer_for_a_live_call_gets_busy_and_no_way_in(nursery, caplog):
    ai = await start_providers(nursery, ["My account PIN is 4321."])
    async with vobiz_call(ai.server.url) as victim:
        await greeted(victim)
        victim.say(speech(1.0, seed=87))
        await victim.until(lambda: len(ai.openai.chat_requests) == 1 and len(victim.played_names) >= 2)
        intruder = SimulatedVobiz()  # knows the victim's CallUUID
        assert await intruder.answer(ai.server.url) is None
        assert intruder.state == "rejected" and intruder.hangup_reason == "busy"
    again = SimulatedVobiz()  # the conversation is resumable for a while: still no way in
    assert await again.answer(ai.server.url) is None and again.state == "rejected"
    assert len(ai.openai.chat_requests) == 1  # nobody else's turn reached the model with the victim's words
    assert sum("a second answer for a call that is live or resumable" in r.getMessage()
               for r in caplog.records) == 2


async def junk_socket(url: str, frames, every_s: float) -> float:
    """Send `frames` (then one '{}' per `every_s`) until the server closes; how long it took."""
    began = trio.current_time()
    with trio.fail_after(10):
        async with trio_websocket.open_websocket_url(url) as ws:
            for frame in frames:
                await ws.send_message(frame)
            with suppress(trio_websocket.ConnectionClosed):
                while True:
                    await ws.send_message("{}")
                    with trio.move_on_after(every_s):
                        await ws.get_message()
    return trio.current_time() - began


async def test_junk_keeps_no_slot_and_a_socket_must_start_soon(nursery, caplog):
    server = await start_server(nursery, idle_timeout_s=1.0)
    start = json.dumps(SimulatedVobiz().start_frame())
    async with trio.open_nursery() as junk:
        junk.start_soon(junk_socket, await media_url(server), [start], 0.2)  # start, then only junk
        junk.start_soon(junk_socket, await media_url(server, "no-start"), [], 0.2)  # junk, never a start
    await server.app.switchboard.wait_until_empty()
    lines = [r.getMessage() for r in caplog.records]
    assert any("no media from Vobiz for 1 s" in line for line in lines)
    assert any("no valid start frame in time" in line for line in lines)
    metrics = (await server.get("/metrics")).text
    assert 'ended="idle timeout"' in metrics and 'ended="no start"' in metrics


async def test_max_calls_counts_answers_and_holds_at_the_socket_too(nursery, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="vobiz_agent")
    monkeypatch.setattr(vobiz_agent.Switchboard, "SOCKET_WAIT_S", 1.0)
    shared = {"stream_secret": b"shared-secret", "stream_secret_generated": False}
    server = await start_server(nursery, max_calls=2, **shared)
    other = await start_server(nursery, **shared)
    await media_url(server, "a")
    await media_url(server, "b")  # two answers, no socket yet: both count
    burst = SimulatedVobiz(call_id="c")
    assert await burst.answer(server.url) is None and burst.state == "rejected"
    await trio.sleep(1.2)  # a socket that never comes frees its slot (SOCKET_WAIT_S)
    async with vobiz_call(server.url, call_id="c") as first, vobiz_call(server.url, call_id="d") as second:
        await greeted(first)
        await greeted(second)
        elsewhere = (await media_url(other, "e")).replace(other.url.removeprefix("http://"),
                                                          server.url.removeprefix("http://"))
        assert await refused_status(elsewhere) == 503  # answered by another process: this one is full
    assert any("no media socket came here: slot released" in r.getMessage() for r in caplog.records)
    assert "vobiz_agent_answers_without_socket_total 2.0" in (await server.get("/metrics")).text


async def test_unfinished_request_bodies_are_closed_at_the_read_timeout(nursery):
    server = await start_server(nursery, http_read_timeout_s=1.0)
    host, port = urlsplit(server.url).hostname, urlsplit(server.url).port
    streams = []
    for _ in range(40):
        stream = await trio.open_tcp_stream(host, port)
        await stream.send_all(b"POST /answer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n"
                              b"Content-Type: application/x-www-form-urlencoded\r\n\r\nCallUUID=")
        streams.append(stream)

    async def closed_by_server(stream) -> None:
        while await stream.receive_some():  # a 408, maybe, then the end of the connection
            pass

    with trio.fail_after(6):  # the read timeout is 1 s; without one they stay open for good
        async with trio.open_nursery() as waiting:
            for stream in streams:
                waiting.start_soon(closed_by_server, stream)
    for stream in streams:
        await stream.aclose()
    assert (await server.get("/health")).status_code == 200


async def test_oversized_webhook_bodies_are_refused(server):
    big = await server.post("/answer", content=b"CallUUID=x&pad=" + b"a" * 15_000_000,
                            headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert big.status_code == 413
    assert (await server.post("/hangup", data={"CallUUID": CALL_UUID, "pad": "a" * 9000})).status_code == 413
    assert (await server.post("/answer", data={"CallUUID": CALL_UUID})).status_code == 200


CRASHING_FRAMES = [
    ("[" * 1000 + "]" * 1000, "more than 32 objects and arrays"),
    ('{"event": "media", "media": {"payload": "AAAA", "chunk": Infinity}}', "Infinity is not a number"),
    ('{"event": "media", "media": {"payload": "AAAA", "chunk": 1e999}}', "out of range"),
    (('{"event": "start", "start": {"callId": "call-a", "streamId": "s2", "mediaFormat": '
      '{"encoding": "audio/x-l16", "sampleRate": NaN}}}'), "NaN is not a number"),
    ('{"event": "media", "media": {"payload": "AAAA", "chunk": ' + "9" * 5000 + "}}", "not JSON"),
    (b"", "binary"),
    (b"\x00\xff", "binary"),
    ("", "empty"),
]


def errors_counted(metrics: vobiz_agent.Metrics) -> float:
    """vobiz_agent_errors_total over all its kinds, read from the app's Prometheus registry."""
    return sum(sample.value for family in metrics.registry.collect() for sample in family.samples
               if sample.name == "vobiz_agent_errors_total")


async def test_frames_that_used_to_crash_a_call_are_bad_frames(server, caplog):
    caplog.set_level(logging.WARNING, logger="vobiz_agent")
    for frame, complaint in CRASHING_FRAMES:  # each alone: the log says what was wrong with it
        with pytest.raises(vobiz_agent.BadFrame, match=complaint):
            vobiz_agent.parse_frame(frame)
    async with vobiz_call(server.url, call_id="call-a", stream_id="sa") as vobiz:
        for frame, _ in CRASHING_FRAMES:  # all of them, on a live call
            await vobiz.ws.send_message(frame)
        metrics = server.app.switchboard.metrics
        await vobiz.until(lambda: errors_counted(metrics) >= len(CRASHING_FRAMES))
        await greeted(vobiz)
        said = vobiz.say(speech(0.8, seed=88))
        await vobiz.until(lambda: len(vobiz.played_names) >= 2)
        assert resemblance(vobiz.agent_audio(said, vobiz.tick), speech(0.8, seed=88)) > 0.9  # the call went on
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


@pytest.mark.parametrize("path", [
    f"/ws/{CALL_UUID}/%C2%B2%C2%B2%C2%B2.AAAAAAAA.x",  # superscript two: str.isdigit() says yes
    f"/ws/{CALL_UUID}/%D9%A1%D9%A2%D9%A3.AAAAAAAA.x",  # Arabic-Indic digits
    f"/ws/{CALL_UUID}/{'9' * 5000}.AAAAAAAA.x",
    "/ws/abc%0A2026-12-01%2000:00:00%20INFO%20vobiz_agent:%20forged/%C2%B2.AAAAAAAA.x",  # a line in the path
    f"/ws/{CALL_UUID}/1.%0Aforged.x",
])
async def test_crafted_tokens_get_403_and_write_no_forged_line(server, caplog, path):
    caplog.set_level(logging.INFO)
    assert await refused_status(server.url.replace("http", "ws", 1) + path) == 403
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not [r for r in caplog.records if "\n" in r.getMessage()]  # one line each, nothing forged


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith("VmRSS")).split()[1]) / 1024


def fuzzed_frame(rng: random.Random, call_id: str) -> str | bytes:
    """A frame as a broken or hostile peer might send it: valid ones bent out of shape."""
    weird = [math.inf, -math.inf, math.nan, 1e308, -1, 0, 2**70, "", "x" * 300, None, True, [], {}, [[[[]]]]]
    shapes = [
        lambda: {"event": "media", "media": {"payload": base64.b64encode(rng.randbytes(rng.choice([160, 161, 0, 7])))
                                              .decode(), "chunk": rng.choice(weird)}},
        lambda: {"event": "start", "start": {"callId": rng.choice([call_id, "other", 5]), "streamId": "s",
                                             "mediaFormat": {"encoding": rng.choice(["audio/x-l16", 7, None]),
                                                             "sampleRate": rng.choice(weird + [8000, 16000])}}},
        lambda: {"event": rng.choice(["playedStream", "clearedAudio", "dtmf", "mark", "", None]),
                 "name": rng.choice(weird), "dtmf": {"digit": rng.choice(weird + ["5"])}},
    ]
    kind = rng.random()
    if kind < 0.15:
        return rng.randbytes(rng.randint(0, 40))  # binary, empty included
    if kind < 0.25:
        return rng.choice(["", "{", "[" * rng.randint(1, 3000), "null", '"x"', "\u2028\n", "{}" * 50])
    text = json.dumps(rng.choice(shapes)(), allow_nan=True)
    if kind < 0.4:  # cut or spliced
        cut = rng.randint(0, len(text))
        text = text[:cut] + rng.choice(["", "1e999", "NaN", "]]]]", "\u2028", '"'])
    return text


async def test_a_fuzz_of_ten_thousand_frames_leaks_no_socket_and_no_memory(nursery, caplog):
    caplog.set_level(logging.WARNING)
    server = await start_server(nursery)
    rng = random.Random(11)

    async def fuzz_round(n: int, frames: int) -> None:
        async with trio.open_nursery() as sockets:
            for i in range(4):
                sockets.start_soon(fuzz_one, f"fuzz-{n}-{i}", frames)

    async def fuzz_one(call_id: str, frames: int) -> None:
        async with trio_websocket.open_websocket_url(await media_url(server, call_id)) as ws:
            await ws.send_message(json.dumps(SimulatedVobiz(call_id=call_id).start_frame()))
            for _ in range(frames):
                await ws.send_message(fuzzed_frame(rng, call_id))

    await fuzz_round(0, 100)  # warm up: the first calls allocate what every call reuses
    await server.app.switchboard.wait_until_empty()
    fds, rss = open_fds(), rss_mb()
    for n in range(1, 6):  # 5 rounds × 4 sockets × 500 frames = 10,000 frames
        await fuzz_round(n, 500)
    await server.app.switchboard.wait_until_empty()
    gc_collect = __import__("gc").collect
    gc_collect()
    after_fds, after_rss = open_fds(), rss_mb()
    print(f"\nfuzz of 10,000 frames: fds {fds} → {after_fds}, RSS {rss:.1f} → {after_rss:.1f} MB")
    assert after_fds <= fds  # no socket survives its call
    assert after_rss - rss < 8  # flat: no memory survives a bad frame (allocator noise aside)
    assert call_tasks() == []
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


class StalledPeer:
    """A media socket whose peer keeps sending caller audio but never reads: a tiny
    receive buffer, raw TCP and wsproto, so nothing on our side drains it."""

    def __init__(self, url: str):
        self.url = urlsplit(url)
        self.client = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)

    async def connect(self) -> None:
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: sets the window
        await sock.connect((self.url.hostname, self.url.port))
        self.stream = trio.SocketStream(sock)
        await self.stream.send_all(self.client.send(wsproto.events.Request(host=self.url.netloc,
                                                                           target=self.url.path)))
        while not any(isinstance(event, wsproto.events.AcceptConnection) for event in self.client.events()):
            self.client.receive_data(await self.stream.receive_some(1024))
        await self.send(json.dumps(SimulatedVobiz(call_id=self.url.path.split("/")[2]).start_frame()))

    async def send(self, text: str) -> None:
        await self.stream.send_all(self.client.send(wsproto.events.Message(text)))

    async def talk_without_listening(self, talk: bool = True) -> None:
        """Caller audio every 20 ms (so no idle timeout is what ends it), and not one byte read."""
        # Quiet while greeted, then a turn and a pause for its echo, again and again.
        words = audioop.lin2ulaw(bytes(16000) + (speech(1.5, seed=89) if talk else bytes(24000)) + bytes(40000), 2)
        with suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            for tick in range(100_000):
                chunk = words[(tick * 160) % (len(words) - 160):][:160]
                await self.send(media_frame(base64.b64encode(chunk).decode()))
                await trio.sleep(TICK)


async def test_a_peer_that_stops_reading_is_dropped_and_two_sigterms_still_exit_0(nursery):
    port = free_port()
    process, process_log = await start_process(nursery, port, DRAIN_TIMEOUT_S="1")
    server = Server(None, f"http://127.0.0.1:{port}")
    peer = StalledPeer(await media_url(server))
    await peer.connect()
    nursery.start_soon(peer.talk_without_listening)
    with trio.fail_after(15):  # its sends stall at once: the greeting alone is more than 4 KiB
        while (await server.get("/health")).json()["calls"]:
            await trio.sleep(0.2)  # polling what an operator polls
    began = trio.current_time()
    # A second stalled call, then SIGTERM twice: the drain must still end, and end well.
    second = StalledPeer(await media_url(server, "second-stalled"))
    await second.connect()
    nursery.start_soon(second.talk_without_listening, False)  # its goodbye goes unread: no ack, ever
    await process_log.until(lambda text: "second-stalled: stream" in text)
    process.send_signal(signal.SIGTERM)
    await process_log.until(lambda text: "draining" in text)
    process.send_signal(signal.SIGTERM)
    with trio.fail_after(1 + 5 + 2 + 3 + vobiz_agent.SEND_TIMEOUT_S + 3):  # drain, goodbye, Hypercorn, the kernel
        assert await process.wait() == 0
    print(f"\nstalled peer: slot freed, then drained in {trio.current_time() - began:.1f} s")
    assert "Traceback" not in process_log.text


async def test_an_fd_shortage_is_logged_once_per_burst_not_per_connection(nursery):
    port = free_port()
    process = await nursery.start(partial(
        trio.run_process, [sys.executable, "vobiz_agent.py", "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=HERE, check=False,
        preexec_fn=lambda: __import__("resource").setrlimit(__import__("resource").RLIMIT_NOFILE, (48, 48))))
    process_log = ProcessLog()
    nursery.start_soon(process_log.read, process.stderr)
    await process_log.until(lambda text: "Running on" in text)
    held = []
    for _ in range(80):  # more connections than descriptors: accept() fails with EMFILE
        held.append(await trio.open_tcp_stream("127.0.0.1", port))
    await trio.sleep(1.0)  # a second of EMFILE: trio's accept loop retries ten times a second
    for stream in held:
        await stream.aclose()
    server = Server(None, f"http://127.0.0.1:{port}")
    with trio.fail_after(15):
        while True:
            with suppress(httpx.HTTPError):
                if (await server.get("/health", timeout=2)).status_code == 200:
                    break
            await trio.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    assert await process.wait() == 0
    assert process_log.text.count("cannot accept connections: EMFILE") == 1
    assert "ulimit -n" in process_log.text and "Traceback" not in process_log.text


async def test_health_and_banner_say_loudly_when_anyone_can_spend_the_budget(nursery):
    ai = await start_providers(nursery)
    health = (await ai.server.get("/health")).json()
    assert "anyone who can reach /answer can spend your provider budget" in health["warning"]
    settings = ai.server.app.switchboard.settings
    assert "WARNING: webhook verification is off" in vobiz_agent.banner(settings)
    signed = await start_providers(nursery, vobiz_auth_token="secret-token", vobiz_verify_signatures="required")
    assert "warning" not in (await signed.server.get("/health")).json()
    offline = await start_server(nursery)
    assert "warning" not in (await offline.get("/health")).json()


async def test_a_reconnect_after_a_half_open_drop_replaces_the_dead_socket(nursery, caplog):
    server = await start_server(nursery)
    async with vobiz_call(server.url) as vobiz:
        await greeted(vobiz)
        await vobiz.drop(half_open=True)  # no FIN reaches the server: its old socket just goes quiet
        await vobiz.until(lambda: len(vobiz.streams) == 2)
        said = vobiz.say(speech(0.8, seed=90))
        await vobiz.until(lambda: len(vobiz.played_names) >= 2)
        assert resemblance(vobiz.agent_audio(said, vobiz.tick), speech(0.8, seed=90)) > 0.9  # it goes on
        assert len(server.app.switchboard) == 1
    assert vobiz.refused in ([], [409])  # a retry that came within a second of the last media waited
    assert any("a reconnect came: ending the call" in r.getMessage() for r in caplog.records)


# ── Replicas behind a load balancer, /metrics, .env (issue 10) ──


async def test_a_draining_replica_sends_new_calls_elsewhere_and_keeps_its_own(nursery):
    server = await start_server(nursery, drain_timeout_s=20, stream_secret=b"shared", stream_secret_generated=False)
    async with vobiz_call(server.url) as vobiz:
        await greeted(vobiz)
        # A new call answered by another replica (same STREAM_SECRET) whose socket lands here.
        other = await start_server(nursery, stream_secret=b"shared", stream_secret_generated=False)
        new_call = (await media_url(other, "new-call")).replace(other.url[len("http"):], server.url[len("http"):])
        nursery.start_soon(server.app.switchboard.drain)  # SIGTERM
        await vobiz.until(lambda: server.app.switchboard.draining)
        answer = await server.post("/answer", data={"CallUUID": "later-call"})
        assert answer.status_code == 503  # a balancer tries another replica, Vobiz retries
        busy = ET.fromstring(answer.content)  # and if Vobiz reads it: a busy tone, unanswered, unbilled
        assert [(child.tag, child.get("reason")) for child in busy] == [("Hangup", "busy")]
        assert await refused_status(new_call) == 503  # nginx passes the socket to the next replica
        said = vobiz.say(speech(0.8, seed=101))  # the live call goes on
        await vobiz.until(lambda: len(vobiz.played_names) >= 2)
        assert resemblance(vobiz.agent_audio(said, vobiz.tick), speech(0.8, seed=101)) > 0.9
        url = vobiz.url
    async with vobiz_call(server.url, url=url, stream_id="stream-2") as again:  # its reconnect is taken
        said = again.say(speech(0.8, seed=102))
        await again.until(lambda: len(again.played_names) >= 1)
    assert not any(name.startswith("greeting") for name in again.played_names)
    metrics = (await server.get("/metrics")).text
    assert 'vobiz_agent_calls_refused_total{reason="draining"} 2.0' in metrics


async def test_metrics_parse_as_prometheus_text_and_each_app_keeps_its_own(nursery):
    from prometheus_client.parser import text_string_to_metric_families

    first, second = await start_server(nursery), await start_server(nursery)
    async with vobiz_call(first.url) as vobiz:
        await greeted(vobiz)
        live = {sample.name: sample.value for family in text_string_to_metric_families(
            (await first.get("/metrics")).text) for sample in family.samples}
    assert live["vobiz_agent_calls_live"] == 1 and live["vobiz_agent_draining"] == 0
    await first.app.switchboard.wait_until_empty()
    assert 'vobiz_agent_calls_total{ended="hang-up"} 1.0' in (await first.get("/metrics")).text
    other = (await second.get("/metrics")).text
    assert "vobiz_agent_calls_total" not in other and "vobiz_agent_calls_live 0.0" in other


async def run_in(directory, *args: str, **env: str) -> tuple[int, str]:
    """vobiz_agent.py started in another working directory; ends it with SIGTERM once it serves."""
    environment = {key: value for key, value in os.environ.items() if key not in ("PORT", "MAX_CALLS")}
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            process = await nursery.start(partial(
                trio.run_process, [sys.executable, os.path.join(HERE, "vobiz_agent.py"), "--host", "127.0.0.1",
                                   *args], env={**environment, **env}, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE, cwd=directory, check=False))
            process_log = ProcessLog()
            nursery.start_soon(process_log.read, process.stderr)
            await process_log.until(lambda text: "Running on" in text or "vobiz-agent: " in text)
            if "Running on" in process_log.text:  # else it stopped with one line saying why
                process.send_signal(signal.SIGTERM)
            code = await process.wait()
    return code, process_log.text


async def test_a_dot_env_file_in_the_working_directory_is_read_and_set_variables_win(tmp_path):
    port = free_port()
    (tmp_path / ".env").write_text(f"# a developer's settings\nPORT={port}\nMAX_CALLS=many\n")
    code, text = await run_in(tmp_path)
    assert code == 1 and "MAX_CALLS='many' is not a number" in text  # read from .env
    code, text = await run_in(tmp_path, MAX_CALLS="3")
    assert code == 0 and f"Running on http://127.0.0.1:{port}" in text  # PORT from .env, MAX_CALLS from us


def readme_settings() -> list[tuple[str, str, str]]:
    """README's configuration table: (variable, default, meaning), backticks dropped from the default."""
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as readme:
        text = readme.read().split("## Configuration", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip("|").split(" | ") for line in text.splitlines() if line.startswith("| `")]
    return [(name.split("`")[1], default.strip("`"), meaning.strip()) for name, default, meaning in rows]


def test_the_readme_configuration_table_is_the_settings_table():
    assert readme_settings() == [(setting.variable, setting.shown_default(), setting.help)
                                 for setting in vobiz_agent.SETTINGS]
    fields = {each.name for each in dataclasses.fields(vobiz_agent.Settings)}
    assert {setting.field for setting in vobiz_agent.SETTINGS} == fields - {"stream_secret_generated"}


async def test_help_lists_every_variable_with_its_default():
    result = await trio.run_process([sys.executable, "vobiz_agent.py", "--help"], capture_stdout=True, cwd=HERE)
    lines = result.stdout.decode().splitlines()
    for variable, default, _ in readme_settings():
        assert any(line.split()[:1] == [variable] and line.rstrip().endswith(default) for line in lines), variable


def test_env_example_names_only_real_settings():
    with open(os.path.join(HERE, ".env.example"), encoding="utf-8") as example:
        named = re.findall(r"^(?:# )?([A-Z_]+)=", example.read(), re.MULTILINE)  # set or commented out
    assert len(named) > 10 and set(named) <= {setting.variable for setting in vobiz_agent.SETTINGS}


# ── Real provider streams, replayed (issue 8) ──
# The stand-ins replay recordings kept in fixtures/ (their sources: fixtures/SOURCES.md).
# Every test asserts what the caller hears (the TTS requests' inputs are what is spoken),
# what the operator reads (one clear log line, never a traceback) and that the call goes on.

FIXTURES = os.path.join(HERE, "fixtures")


def recording(*path: str) -> bytes:
    with open(os.path.join(FIXTURES, *path), "rb") as file:
        return file.read()


def recorded_lines(*path: str) -> list[str]:
    return recording(*path).decode("utf-8").splitlines()


def no_traceback(caplog) -> bool:
    return "Traceback" not in caplog.text and not any(r.exc_info for r in caplog.records)


async def a_turn_is_answered(vobiz: SimulatedVobiz, ai: Providers, reply: str, seed: int) -> None:
    """The caller speaks again and hears `reply` (one piece: no comma or sentence end inside)."""
    said = vobiz.say(speech(0.8, seed=seed))
    await vobiz.until(lambda: heard_sentence(vobiz, ai.openai, reply, start=said) > 0.9)


REASONING_STREAMS = [  # (recording, the first words the caller must hear, words they must never hear)
    ("vercel-mistral-reasoning.sse", "2 + 2 = 4", "The user is asking"),
    ("mistral-magistral-thinking-parts.sse", "To cross the street safely,", "Okay, the user is asking"),
    ("hf-router-together-deepseek-r1-think.sse", "Crossing the street safely", "Okay, the user asked"),
    ("deepseek-reasoner-reasoning-content.sse", "Hello there!", "Hmm, the user just said"),
    ("openrouter-reasoning-comments.sse", "2 + 2 = 4", "This is a simple arithmetic"),
]


@pytest.mark.parametrize("name, first_words, reasoning", REASONING_STREAMS)
async def test_reasoning_is_never_spoken_whatever_shape_the_provider_streams_it_in(
        nursery, caplog, name, first_words, reasoning):
    ai = await start_providers(nursery, ["How do I cross the street?", "Thanks."])
    data = recording("openai", name)
    ai.openai.recordings = [data]
    ai.openai.replay_pieces = (1,) if len(data) < 8000 else (7, 61, 997)  # small ones: one byte at a time
    ai.openai.replies = [["Anything else?"]]
    async with vobiz_call(ai.server.url) as vobiz:
        await greeted(vobiz)
        vobiz.say(speech(0.8, seed=90))
        await vobiz.until(lambda: len(vobiz.played_names) >= 2)  # the first piece of the answer played
        await a_turn_is_answered(vobiz, ai, "Anything else?", seed=91)  # talks over it if it is long
    spoken = ai.spoken_texts()
    assert spoken[1].startswith(first_words), spoken
    assert not any(reasoning in text or "think>" in text for text in spoken), spoken
    assert vobiz_agent.LLM_APOLOGY not in spoken
    assert no_traceback(caplog)


async def test_think_tags_split_across_chunks_are_not_spoken(nursery, caplog):
    # The shape Ollama and vLLM stream for R1/QwQ-style models, the tags cut at odd places.
    ai = await start_providers(nursery, ["Tell me a joke."])
    ai.openai.replies = [["<th", "ink>\nThe user wants a joke. A short", " one.</thi", "nk", ">\n\n",
                          "Why did the chicken cross the road? To get to the other side."]]
    async with vobiz_call(ai.server.url) as vobiz:
        await greeted(vobiz)
        said = vobiz.say(speech(0.8, seed=92))
        await vobiz.until(lambda: len(vobiz.played_names) >= 3)
        assert heard_sentence(vobiz, ai.openai, "To get to the other side.", start=said) > 0.9
    assert ai.spoken_texts() == ["Hello, how can I help?", "Why did the chicken cross the road?",
                                 "To get to the other side."]
    assert no_traceback(caplog)


@pytest.mark.parametrize("name, message", [
    ("openrouter-error-in-chunk.sse", "Token limit reached"),  # an `error` object inside a chunk
    ("groq-event-error.sse", "Tool choice is required, but model did not call a tool"),  # `event: error`
])
async def test_an_error_sent_inside_the_stream_is_logged_and_the_caller_hears_an_apology(
        nursery, caplog, name, message):
    ai = await start_providers(nursery, ["Hello?", "Hello again?"])
    ai.openai.recordings = [recording("openai", name)]
    ai.openai.replay_pieces = (5, 3)
    ai.openai.replies = [["Now I can answer."]]
    async with vobiz_call(ai.server.url) as vobiz:
        await the_caller_hears_the_apology(vobiz, ai, seed=93)
        await a_turn_is_answered(vobiz, ai, "Now I can answer.", seed=94)
    assert ai.spoken_texts() == ["Hello, how can I help?", vobiz_agent.LLM_APOLOGY, "Now I can answer."]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert [line for line in warnings if "LLM" in line and message in line], warnings
    assert not any("the reply was empty" in line for line in warnings)
    assert no_traceback(caplog)


@pytest.mark.parametrize("name, tool", [
    ("openai-gpt-4o-mini-tool-call-only.sse", b"get_capital"),  # arguments spread over six chunks
    ("vercel-groq-tool-call.sse", b"weather"),  # the whole call in one chunk
])
async def test_a_reply_that_is_only_a_hang_up_call_still_says_goodbye(nursery, caplog, name, tool):
    ai = await start_providers(nursery, ["That's all, bye."])
    # The recorded call, renamed to our tool: the only change to the recorded bytes.
    ai.openai.recordings = [recording("openai", name).replace(b'"' + tool + b'"', b'"hang_up"')]
    ai.openai.replay_pieces = (3, 11)
    async with vobiz_call(ai.server.url) as vobiz:
        await greeted(vobiz)
        said = vobiz.say(speech(0.8, seed=95))
        await vobiz.closed.wait()  # the agent ended the call
    assert len(ai.spoken_texts()) == 2, ai.spoken_texts()  # the greeting, then one goodbye
    assert ai.spoken_texts()[1] == vobiz_agent.GOODBYE
    assert heard_sentence(vobiz, ai.openai, vobiz_agent.GOODBYE, start=said) > 0.9
    stop = vobiz.event_ticks("stop")
    assert stop and max(vobiz.agent_ticks(said)) <= stop[0]  # every word played before the stop
    assert no_traceback(caplog)


async def test_a_goodbye_the_caller_talks_over_does_not_end_the_call_one_turn_late(nursery):
    ai = await start_providers(nursery, ["Bye for now.", "Wait, one more thing."])
    ai.openai.replies = [["Goodbye then, it was lovely to talk with you, and take good care of yourself.",
                          HANG_UP], ["Yes I am still listening."]]
    async with vobiz_call(ai.server.url) as vobiz:
        await greeted(vobiz)
        said = vobiz.say(speech(0.8, seed=96))
        await vobiz.until(lambda: len(vobiz.agent_ticks(said + 40)) >= 25)  # half a second of goodbye
        said = vobiz.say(speech(0.8, seed=97))  # the caller talks over it
        await vobiz.until(lambda: heard_sentence(vobiz, ai.openai, "Yes I am still listening.", said) > 0.9)
        await vobiz.until(lambda: any(name.startswith("sentence") for name in vobiz.played_names[2:]))
        await vobiz.until_tick(vobiz.tick + 40)  # a stop would follow the acknowledgement at once
        assert vobiz.event_ticks("stop") == []
        assert not vobiz.closed.is_set()


async def test_a_model_that_refuses_tools_is_asked_again_without_them_and_that_is_remembered(nursery, caplog):
    ai = await start_providers(nursery, ["Hi.", "Are you there?", "Hello again."])
    ai.openai.refuse_tools = (400, recording("ollama", "no-tools-400.json"))  # what Ollama answers
    ai.openai.replies = [["Hello there."], ["Still here."], ["A new call."]]
    async with vobiz_call(ai.server.url) as vobiz:
        await greeted(vobiz)
        await a_turn_is_answered(vobiz, ai, "Hello there.", seed=98)
        await a_turn_is_answered(vobiz, ai, "Still here.", seed=99)
    async with vobiz_call(ai.server.url, call_id="a-second-call", stream_id="stream-2") as vobiz:
        await greeted(vobiz)
        await a_turn_is_answered(vobiz, ai, "A new call.", seed=100)
    assert ["tools" in request["body"] for request in ai.openai.chat_requests] == [True, False, False, False]
    assert vobiz_agent.LLM_APOLOGY not in ai.spoken_texts()
    lines = [r.getMessage() for r in caplog.records if "does not support tools" in r.getMessage()]
    assert len(lines) == 1, lines  # one line for the process, naming the provider's reason
    assert no_traceback(caplog)


# The worst stream we could put together: every malformed shape we could think of, mixed with
# recorded chunks. Nothing in it may escape as an exception; the well-formed text is still spoken.
WORST_STREAM = b"".join([
    b": keep-alive comment\n\n",
    b"event: ping\ndata: {}\n\n",
    b"data: [1, 2, 3]\n\n", b'data: "a string"\n\n', b"data: null\n\n", b"data: 12\n\n",
    b"data: {not json\n\n", b"data:\n\n", b"no colon at all\n\n", b"id: 7\nretry: soon\n\n",
    b'data: {"choices": null}\n\n', b'data: {"choices": "abc"}\n\n', b'data: {"choices": [null, 3, "x"]}\n\n',
    b'data: {"choices": [{"delta": "hi"}]}\n\n', b'data: {"choices": [{"delta": {"content": 42}}]}\n\n',
    (b'data: {"choices": [{"index": 0, "delta": {"content": [null, 1, {"type": "text"}, {"type": "text",'
     b' "text": 5}, {"type": "thinking", "thinking": "secret"}, "raw"]}}]}\n\n'),
    b'data: {"choices": [{"delta": {"tool_calls": "x"}}]}\n\n',
    (b'data: {"choices": [{"delta": {"tool_calls": [null, 1, {"function": "x"},'
     b' {"function": {"name": 7}}]}}]}\n\n'),
    b'data: {"choices": [{"delta": {"reasoning_content": {"a": 1}, "reasoning": [1]}}]}\n\n',
    b'data: {"choices": [{"index": 1, "delta": {"content": "Another choice, never spoken. "}}]}\n\n',
    b'data: {"\xff\xfe": "not utf-8"}\n\n',
    b'data: {"nul": "\x00"}\n\n',
    b"data: " + b"[" * 100_000 + b"\n\n",  # nested too deep for the JSON parser's recursion
    b'data: {"choices": [{"index": 0, "delta": {"content": "It still "}}]}\n\n',
    b'data: {"choices": [{"index": 0, "delta": {"content": [{"type": "text", "text": "works."}]}}]}\n\n',
    b"data: [DONE]\n\n",
    b'data: {"choices": [{"index": 0, "delta": {"content": "After the end."}}]}\n\n',
])


async def test_no_provider_content_ever_escapes_a_call(nursery, caplog):
    ai = await start_providers(nursery, ["Hello?", "Still there?"])
    ai.openai.recordings = [WORST_STREAM]
    ai.openai.replay_pieces = (1, 2, 3, 5, 8, 13, 4096)
    ai.openai.replies = [["Yes I am."]]
    async with vobiz_call(ai.server.url) as vobiz:
        await greeted(vobiz)
        said = vobiz.say(speech(0.8, seed=101))
        await vobiz.until(lambda: len(vobiz.played_names) >= 2)
        assert heard_sentence(vobiz, ai.openai, "It still works.", start=said) > 0.9
        await a_turn_is_answered(vobiz, ai, "Yes I am.", seed=102)
    assert ai.spoken_texts() == ["Hello, how can I help?", "It still works.", "Yes I am."]
    assert no_traceback(caplog)


chunk_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["choices", "delta", "content", "index", "type", "text", "tool_calls", "function",
                         "name", "error", "message", "reasoning", "reasoning_content"]) | st.text(max_size=4),
        children, max_size=4),
    max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(value=chunk_values)
def test_a_chunk_of_any_shape_gives_text_or_a_provider_error(value):
    tools: set[str] = set()
    for data in (json.dumps(value), json.dumps({"choices": [{"index": 0, "delta": value}]}),
                 json.dumps({"choices": [{"index": 0, "delta": {"content": value, "tool_calls": value}}]})):
        try:
            text = vobiz_agent.ProviderAPI.chat_delta(data, tools)
        except vobiz_agent.ProviderError:
            continue
        assert isinstance(text, str)
    assert all(isinstance(name, str) for name in tools)


sse_lines = st.lists(st.one_of(
    st.text(max_size=30), st.sampled_from(["", ": ping", "event: error", "event: message", "data: [DONE]"]),
    chunk_values.map(lambda value: "data: " + json.dumps(value))), max_size=30)


@settings(max_examples=200, deadline=None)
@given(lines=sse_lines)
def test_any_lines_at_all_give_text_or_a_provider_error(lines):
    async def read() -> list[str]:
        async def stream():
            for line in lines:
                yield line
        texts = []
        try:
            async for data in vobiz_agent.ProviderAPI.server_sent_events(stream()):
                texts.append(vobiz_agent.ProviderAPI.chat_delta(data, set()))
        except vobiz_agent.ProviderError:
            pass
        return texts

    assert all(isinstance(text, str) for text in trio.run(read))


def test_only_the_first_choice_is_spoken():
    # A real chunk (gpt-4o-mini) with a second choice put in front of it, as `n=2` streams them.
    line = next(line for line in recorded_lines("openai", "openai-gpt-4o-mini-text.sse") if "London" in line)
    chunk = json.loads(line[len("data: "):])
    chunk["choices"].insert(0, {"index": 1, "delta": {"content": "Paris"}, "finish_reason": None})
    assert vobiz_agent.ProviderAPI.chat_delta(json.dumps(chunk), set()) == chunk["choices"][1]["delta"]["content"]


@pytest.mark.parametrize("line_end", [b"\n", b"\r\n", b"\r"])  # all three are SSE line ends
async def test_any_line_end_and_any_split_of_the_bytes_reads_the_same(nursery, caplog, line_end):
    ai = await start_providers(nursery, ["What is the capital of the UK?"])
    ai.openai.recordings = [recording("openai", "openai-gpt-4o-mini-text.sse").replace(b"\n", line_end)]
    ai.openai.replay_pieces = (1,)  # one byte at a time: every \r cut from its \n
    async with vobiz_call(ai.server.url) as vobiz:
        await greeted(vobiz)
        vobiz.say(speech(0.8, seed=108))
        await vobiz.until(lambda: len(vobiz.played_names) >= 2)
    assert ai.spoken_texts() == ["Hello, how can I help?", "The capital of the UK is London."]
    assert no_traceback(caplog)


def test_reasoning_in_content_is_cut_wherever_the_chunks_split_the_tags():
    # The DeepSeek-R1 answer (HF router → Together), its content re-cut into pieces of 1, 2, 3 … characters.
    lines = recorded_lines("openai", "hf-router-together-deepseek-r1-think.sse")
    chunks = [json.loads(line[len("data: "):]) for line in lines if line.startswith("data: {")]
    content = "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks)
    answer = content.split("</think>", 1)[1]

    async def spoken(pieces):
        async def tokens():
            for piece in pieces:
                yield piece
        return "".join([text async for text in vobiz_agent.ProviderAPI.without_reasoning(tokens())])

    for size in (1, 2, 3, 7, 8, 9):
        pieces = [content[i : i + size] for i in range(0, len(content), size)]
        assert trio.run(spoken, pieces) == answer.lstrip()
    assert trio.run(spoken, ["Just an answer, <think> in the middle stays."]) == \
        "Just an answer, <think> in the middle stays."
    assert trio.run(spoken, ["  <think>", "never closed"]) == ""


# ── Deepgram, as it really behaves (issue 8) ──


@pytest.mark.parametrize("code, reason", [(1011, "NET-0001"), (1008, "DATA-0000")])  # documented shapes
async def test_deepgram_closing_every_stream_gets_the_caller_an_apology(nursery, caplog, code, reason):
    ai = await start_providers(nursery, deepgram_options={"close_every": (code, reason, 0.1)})
    async with vobiz_call(ai.server.url) as vobiz:
        await greeted(vobiz)
        said = vobiz.tick
        with trio.fail_after(6):  # APOLOGY_AFTER_S of no usable connection, however many reconnects
            await vobiz.until(lambda: len(vobiz.played_names) >= 2)
        assert heard_sentence(vobiz, ai.openai, vobiz_agent.EARS_APOLOGY, start=said) > 0.9
        assert ai.deepgram.attempts <= 8  # backing off, not hammering
    lines = [r.getMessage() for r in caplog.records if "speech-to-text is down" in r.getMessage()]
    assert lines and all(f"{code} {reason}" in line for line in lines), lines
    assert no_traceback(caplog)


async def test_deepgram_error_messages_are_logged_and_metadata_is_not(nursery, caplog):
    metadata, error = recorded_lines("deepgram", "docs-metadata-and-error.jsonl")
    ai = await start_providers(nursery, ["Can you hear me?"],
                               deepgram_options={"replay": [(0.1, error), (0.2, metadata)]})
    ai.openai.replies = [["Yes I can hear you."]]
    async with vobiz_call(ai.server.url) as vobiz:
        await greeted(vobiz)
        await a_turn_is_answered(vobiz, ai, "Yes I can hear you.", seed=103)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    description = json.loads(error)["description"]
    assert [line for line in warnings if "speech-to-text error" in line and description in line], warnings
    assert not any("Metadata" in line or "not JSON" in line for line in warnings), warnings
    assert no_traceback(caplog)


async def test_a_final_that_never_comes_is_asked_for_with_finalize(nursery, caplog):
    # A noisy line: Deepgram's endpointing never fires, and no UtteranceEnd comes either.
    ai = await start_providers(nursery, ["Is anybody there?"],
                               deepgram_options={"endpointing_ms": 60_000, "utterance_end_ms": 60_000})
    ai.openai.replies = [["Yes I am here."]]
    async with vobiz_call(ai.server.url) as vobiz:
        await greeted(vobiz)
        said = vobiz.say(speech(0.8, seed=104))
        with trio.fail_after(6):
            await vobiz.until(lambda: heard_sentence(vobiz, ai.openai, "Yes I am here.", start=said) > 0.9)
    assert ai.deepgram.finalizes == 1
    assert ai.user_messages(0) == ["Is anybody there?"]
    finals = [m for _, m in ai.deepgram.messages if m.get("from_finalize")]
    assert finals and not any(m["speech_final"] for m in finals)  # from_finalize alone ended the turn
    assert no_traceback(caplog)


async def test_an_utterance_end_while_words_are_pending_does_not_split_the_turn(nursery, caplog):
    # Recorded nova-3 frames: a segment final, an interim for the next words, a (late) UtteranceEnd,
    # then the speech_final: one sentence, one turn. The timing is ours, the frames are Deepgram's.
    frames = recorded_lines("deepgram", "nova3-librivox-frames.jsonl")
    replay = [(1.0, frames[2]), (1.3, frames[3]), (1.5, frames[4]), (2.5, frames[5])]
    ai = await start_providers(nursery, deepgram_options={"replay": replay, "simulate": False})
    ai.openai.replies = [["Nice to meet you Rupert."]]
    async with vobiz_call(ai.server.url) as vobiz:
        await greeted(vobiz)
        said = vobiz.say(speech(2.4, seed=105))
        await vobiz.until(lambda: heard_sentence(vobiz, ai.openai, "Nice to meet you Rupert.", said) > 0.9)
    assert [ai.user_messages(n) for n in range(len(ai.openai.chat_requests))] == [
        ["My name was Rupert Pennace. I came of an old family and had plenty of money for my needs."]]
    assert no_traceback(caplog)


@pytest.mark.parametrize("replay, said", [
    ([(0.5, 0), (1.1, 1)], "Paris at a moment's notice."),  # nova-3: an interim, then speech_final
    ([(1.0, None)], "Ensure domestic tranquility."),  # a final from a mulaw 8 kHz stream
])
async def test_recorded_deepgram_results_end_a_turn(nursery, replay, said):
    frames = recorded_lines("deepgram", "nova3-librivox-frames.jsonl")
    mulaw_final = recording("deepgram", "deepgram-python-sdk-mulaw-8k-final.json").decode()
    replay = [(at, mulaw_final if line is None else frames[line]) for at, line in replay]
    ai = await start_providers(nursery, deepgram_options={"replay": replay, "simulate": False})
    ai.openai.replies = [["Got it."]]
    async with vobiz_call(ai.server.url) as vobiz:
        await greeted(vobiz)
        await a_turn_is_answered(vobiz, ai, "Got it.", seed=106)
    assert ai.user_messages(0) == [said]


# ── Speech-to-text never lags (issue 12, item 3) ──


async def test_audio_queued_for_deepgram_is_bounded_and_the_oldest_is_dropped(nursery, caplog):
    caplog.set_level(logging.INFO, logger="vobiz_agent")
    ai = await start_providers(nursery, ["Hello?"], deepgram_options={"refuse": 3})  # down for ~1.8 s
    ai.openai.replies = [["Hello!"]]
    async with vobiz_call(ai.server.url) as vobiz:
        await greeted(vobiz)
        await ai.deepgram.wait_until(lambda: ai.deepgram.attempts >= 4)
        await a_turn_is_answered(vobiz, ai, "Hello!", seed=107)
    await ai.server.app.switchboard.wait_until_empty()  # the call's last line is written
    accepted = [c for c in ai.deepgram.connections if c["accepted"]]
    # What reached Deepgram after the outage was at most the last few hundred ms, not seconds of it
    # (the old code sent 1.8 s). backlog_s is read off the wall clock at the stand-in, so it also
    # carries how late this machine ran the two ends: allow a quarter second of that.
    assert accepted[0]["backlog_s"] <= vobiz_agent.DeepgramEars.BUFFER_S + 0.25, accepted[0]["backlog_s"]
    lines = [r.getMessage() for r in caplog.records]
    behind = [line for line in lines if "dropping the oldest" in line]
    assert len(behind) == 1, behind  # once per burst
    end = next(line for line in lines if "ended by" in line)
    assert re.search(r"; \d+ frames dropped on the way to speech-to-text", end), end


# ── Pointing the brain and the mouth at different providers (issue 8) ──


async def test_the_voice_can_come_from_another_server_than_the_model(nursery):
    # Groq, Ollama, vLLM, LM Studio and OpenRouter have no /audio/speech that speaks pcm:
    # the model runs there, the voice comes from OpenAI (here: a second stand-in).
    voice = OpenAIStandIn()
    voice_url = await nursery.start(voice.serve)
    ai = await start_providers(nursery, ["Hello?"], tts_base_url=voice_url, tts_api_key="sk-voice")
    ai.openai.replies = [["Hello from the model."]]
    async with vobiz_call(ai.server.url) as vobiz:
        await greeted(vobiz)
        said = vobiz.say(speech(0.8, seed=109))
        await vobiz.until(lambda: heard_sentence(vobiz, voice, "Hello from the model.", said) > 0.9)
    assert ai.openai.tts_requests == [] and len(ai.openai.chat_requests) == 1
    assert [r["body"]["input"] for r in voice.tts_requests] == ["Hello, how can I help?", "Hello from the model."]
    assert voice.tts_requests[0]["headers"]["authorization"] == "Bearer sk-voice"
    assert voice.chat_requests == []


@pytest.mark.parametrize("variable, value", [("TTS_BASE_URL", "localhost:8000"), ("TTS_BASE_URL", "ftp://x")])
async def test_a_bad_voice_url_stops_the_program_with_one_clear_line(variable, value):
    env = {key: val for key, val in os.environ.items() if not key.endswith("_API_KEY")}
    result = await trio.run_process([sys.executable, "vobiz_agent.py"], check=False, capture_stderr=True,
                                    env={**env, "DEEPGRAM_API_KEY": "k", "OPENAI_API_KEY": "k", variable: value},
                                    cwd=HERE)
    lines = result.stderr.decode().strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1 and variable in lines[0], lines


async def test_junk_from_deepgram_never_breaks_a_call(nursery, caplog):
    # Our own junk, in the shapes a buggy proxy or a future API version might send.
    junk = ["[]", "null", '"Results"', "not json", "[" * 100_000, '{"type": "Results", "channel": 5}',
            '{"type": "Results", "channel": {"alternatives": "x"}}',
            ('{"type": "Results", "channel": {"alternatives": [{"transcript": ["a"], "words": 3}]}, '
             '"is_final": true, "speech_final": true}'),
            '{"type": "UtteranceEnd", "last_word_end": "soon"}', '{"type": "Error", "description": {"deep": 1}}',
            '{"type": "SpeechStarted", "timestamp": null}', '{"type": "Metadata", "duration": "long"}']
    ai = await start_providers(nursery, ["Are you still there?"],
                               deepgram_options={"replay": [(0.05 + i / 100, text) for i, text in enumerate(junk)]})
    ai.openai.replies = [["Yes I am still here."]]
    async with vobiz_call(ai.server.url) as vobiz:
        await greeted(vobiz)
        await a_turn_is_answered(vobiz, ai, "Yes I am still here.", seed=110)
    assert ai.user_messages(0) == ["Are you still there?"]
    assert no_traceback(caplog)


# ── Load: admission by measured load, a playout that rides out a busy loop (issue 12) ──


def hog_the_loop(seconds: float) -> None:
    """A real busy loop: nothing else in this process (server, simulator) runs meanwhile."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


async def health_until(server: Server, predicate, stall_s: float) -> dict:
    """Stall the loop for `stall_s` at a time until /health's load satisfies `predicate`."""
    with trio.fail_after(15):
        while not predicate((health := (await server.get("/health")).json())["load"]):
            hog_the_loop(stall_s)
            await trio.lowlevel.checkpoint()
    return health


@pytest.mark.parametrize("setting, stall_s, pause_s, reason, figure, over", [
    ({"load_max_lag_ms": 40}, 0.1, 0.0, "overloaded: event loop late", "event_loop_lag_ms", 40),
    ({"load_max_cpu": 0.3}, 0.03, 0.005, "overloaded: CPU", "cpu", 0.3),
])
async def test_over_the_load_threshold_new_calls_hear_busy_and_the_reason_is_counted(
        nursery, setting, stall_s, pause_s, reason, figure, over):
    server = await start_server(nursery, **setting)
    assert (await server.get("/health")).json()["load"]["refusing"] is None
    with trio.fail_after(15):
        while (await server.get("/health")).json()["load"]["refusing"] != reason:
            hog_the_loop(stall_s)  # busy most of the time: late timers, a core's worth of CPU
            await trio.sleep(pause_s)
        response = await server.post("/answer", data={"CallUUID": "one-too-many"})
    assert response.content == vobiz_agent.BUSY_XML
    metrics = (await server.get("/metrics")).text
    assert f'vobiz_agent_calls_refused_total{{reason="{reason}"}} 1' in metrics
    assert "vobiz_agent_event_loop_lag_seconds " in metrics and "vobiz_agent_cpu_share " in metrics
    health = (await server.get("/health")).json()
    assert health["status"] == "ok" and health["load"]["refusing"] == reason  # healthy, but taking no calls
    assert health["load"][figure] > over


async def test_a_burst_of_calls_is_admitted_only_as_fast_as_calls_can_start(nursery):
    # A burst of set-ups stalls the calls already live before the CPU figure shows it (the
    # bench's overload step: 140 calls in 2 s): beyond LOAD_MAX_STARTS_PER_S a second, busy.
    server = await start_server(nursery, load_max_starts_per_s=3)
    answers = [await server.post("/answer", data={"CallUUID": f"burst-{n}"}) for n in range(4)]
    assert [ET.fromstring(a.content).find("Stream") is not None for a in answers] == [True, True, True, False]
    assert answers[3].content == vobiz_agent.BUSY_XML  # a busy tone: unanswered, unbilled
    metrics = (await server.get("/metrics")).text
    assert 'vobiz_agent_calls_refused_total{reason="overloaded: calls starting"} 1.0' in metrics
    assert (await server.get("/health")).json()["load"]["refusing"] == "overloaded: calls starting"


async def test_the_lead_grows_while_the_loop_stalls_so_playout_has_no_gaps_then_shrinks(server):
    words = speech(4.0, seed=90)
    async with vobiz_call(server.url, limit_s=40) as vobiz:
        await greeted(vobiz)
        said = vobiz.say(words)
        await vobiz.until(lambda: len(vobiz.agent_ticks(said + 200)) >= 10)  # the echo is playing
        sent = len(vobiz.audio_arrivals)
        hog_the_loop(0.15)
        await vobiz.until(lambda: len(vobiz.audio_arrivals) > sent)
        first_stall_over = vobiz.audio_arrivals[sent]  # the first frame after it: a gap before it, maybe
        for _ in range(4):  # more stalls of the same size, while the echo goes on
            await trio.sleep(0.6)
            hog_the_loop(0.15)
        await vobiz.until(lambda: len(vobiz.played_names) >= 2)  # the echo ended
        said = vobiz.say(speech(3.0, seed=91))  # a second echo, on a loop that is on time again
        await vobiz.until(lambda: len(vobiz.played_names) >= 3)
    assert vobiz.underruns(since=first_stall_over) == 0  # the first stall alone may be heard
    grown = max(vobiz.queued(first_stall_over))
    assert grown >= 0.15  # the lead covered a stall of that size
    last_second = vobiz.queued(vobiz.audio_arrivals[-50])
    assert max(last_second) < grown - 0.06  # it shrank back (towards 80-120 ms)


async def test_barge_in_still_clears_at_once_with_a_grown_lead(server):
    long_words, interruption = speech(4.0, seed=92), speech(0.6, seed=93)
    async with vobiz_call(server.url) as vobiz:
        await greeted(vobiz)
        said = vobiz.say(long_words)
        await vobiz.until(lambda: len(vobiz.agent_ticks(said + 200)) >= 10)
        for _ in range(2):
            hog_the_loop(0.2)
            await trio.sleep(0.3)
        onset = vobiz.say(interruption)
        await vobiz.until(lambda: len(vobiz.played_names) >= 2 and vobiz.played_names[-1].startswith("echo"))
    cleared_at = vobiz.event_ticks("clearAudio")[0]
    grown = max(vobiz.queued(0, vobiz.audio_arrivals[vobiz.clears[0] - 1]))
    assert grown >= 0.2  # a lead of more than 200 ms was queued at Vobiz ...
    assert len([t for t in vobiz.agent_ticks(onset) if t <= cleared_at]) <= 20  # ... and flushed at detection
    assert vobiz.agent_ticks(cleared_at + 1)[0] > cleared_at + 5  # nothing of it played after clearAudio
    assert resemblance(vobiz.agent_audio(cleared_at + 1, vobiz.tick), interruption) > 0.8


# ── The simulated Vobiz follows the docs ──


def status_events(vobiz: SimulatedVobiz) -> list[str]:
    return [record["fields"]["Event"] for record in vobiz.callbacks if record["fields"].get("StreamID")]


@pytest.mark.parametrize("hangup_path", ["/hangup", "/answer"])  # no hangup URL: it defaults to the answer URL
async def test_every_callback_of_a_call_gets_200_and_the_hangup_frees_the_line_for_the_next(nursery, hangup_path):
    """Vobiz posts the stream's events to our statusCallbackUrl (§1.4) and Event=Hangup when the call is
    over (§1.3), to /answer when the application has no hangup URL (⚠ §1.1): each is answered 200
    (non-200s are retried), the Hangup opens no stream, and the next caller gets the one line."""
    server = await start_server(nursery, max_calls=1)
    words, interruption = speech(2.0, seed=201), speech(0.5, seed=202)
    async with vobiz_call(server.url, hangup_url=server.url + hangup_path) as vobiz:
        await greeted(vobiz)
        said = vobiz.say(words)
        await vobiz.until(lambda: len(vobiz.agent_ticks(said + 100)) >= 10)
        vobiz.say(interruption)  # a barge-in: clearAudio, clearedAudio
        await vobiz.until(lambda: len(vobiz.callbacks_of("ClearedAudio")) == 1)
        await vobiz.until(lambda: len(vobiz.played_names) >= 2)
    assert status_events(vobiz)[0] == "StartStream" and "PlayedStream" in status_events(vobiz)
    [hangup] = vobiz.callbacks_of("Hangup")
    assert hangup is vobiz.callbacks[-1] and hangup["url"] == server.url + hangup_path
    assert (hangup["fields"]["HangupSource"], hangup["fields"]["HangupCauseCode"]) == ("Caller", "4000")
    assert {record["status"] for record in vobiz.callbacks} == {200}
    await server.app.switchboard.wait_until_empty()
    async with vobiz_call(server.url, call_id="the-next-caller", stream_id="s2",
                          hangup_url=server.url + hangup_path) as following:
        assert following.state == "answered"  # not busy: the ended call holds no slot
        await greeted(following)
    assert {record["status"] for record in following.callbacks} == {200}
    assert len(server.app.switchboard) == 0


async def test_our_stop_ends_the_call_through_the_hangup_after_stream_not_end_of_xml(nursery, caplog):
    """Our `stop` with nothing after <Stream> would hang up as an error, 4010 "End Of XML Instructions"
    (§4.4); our <Hangup/> after it makes it a normal hang-up by the answer XML. Vobiz says so with
    StopStream and then the Hangup webhook (§1.3, §1.4), and our log tells the operator."""
    caplog.set_level(logging.INFO, logger="vobiz_agent")
    server = await start_server(nursery, silence_timeout_s=1.0)  # the agent says goodbye and stops
    async with vobiz_call(server.url, hangup_url=server.url + "/hangup") as vobiz:
        await vobiz.closed.wait()
    assert vobiz.event_ticks("stop") and vobiz.hangup_reason == "Hangup after Stream"
    assert status_events(vobiz)[-1] == "StopStream"
    [hangup] = vobiz.callbacks_of("Hangup")
    fields = hangup["fields"]
    assert (fields["HangupCauseCode"], fields["HangupSource"], hangup["status"]) == ("4000", "Answer XML", 200)
    assert any(CALL_UUID in r.getMessage() and "Normal Hangup" in r.getMessage() and "Answer XML" in r.getMessage()
               for r in caplog.records)


@pytest.mark.parametrize("agent", ["echo", "ai"])
async def test_vobiz_streams_what_our_stream_asks_for_and_takes_our_audio(nursery, agent):
    """Vobiz streams the caller in <Stream contentType> (its default is L16, §2.2), and takes playAudio
    only on a bidirectional stream (§4). We ask for μ-law and send μ-law 8 kHz in 20 ms frames (the
    notes' Decisions), a form Vobiz plays as it is (§4.1)."""
    ai = await start_providers(nursery, ["What's the time?"]) if agent == "ai" else None
    server = ai.server if ai else await start_server(nursery)
    async with vobiz_call(server.url) as vobiz:
        assert (vobiz.encoding, vobiz.rate, vobiz.bidirectional, vobiz.keep_call_alive) == (
            "audio/x-mulaw", 8000, True, True)
        await greeted(vobiz)
        said = vobiz.say(speech(0.8, seed=203))
        await vobiz.until(lambda: len(vobiz.played_names) >= 2)
    assert vobiz.agent_ticks(said) and set(vobiz.sent_formats) == {("audio/x-mulaw", 8000, 160)}


async def test_a_call_that_hangs_up_before_its_stream_connects_frees_its_slot(nursery):
    """The caller hangs up between our answer and Vobiz's socket: Event=Hangup is the end of the call
    on every path (§1.3), so the line is free for the next caller at once, not SOCKET_WAIT_S later."""
    server = await start_server(nursery, max_calls=1)
    gone = SimulatedVobiz(call_id="gone-before-the-stream", hangup_url=server.url + "/hangup")
    assert await gone.answer(server.url) is not None
    async with trio.open_nursery() as posting:
        posting.start_soon(gone.send_callbacks)
        await gone.hang_up()  # before any socket: Vobiz posts the Hangup, and that is all
        await gone.callbacks_sent.wait()
    assert [(record["fields"]["Event"], record["status"]) for record in gone.callbacks] == [("Hangup", 200)]
    async with vobiz_call(server.url, call_id="the-next-caller") as following:
        assert following.state == "answered"


async def test_the_media_socket_chooses_the_audio_fork_subprotocol_when_vobiz_offers_it(server):
    """Vobiz's upgrade is undocumented; a reference server accepts mod_audio_fork's `audio.drachtio.org`
    (§3). Offered, it is chosen (a client that offers one may insist on hearing it back); not offered,
    the socket opens without one (every other test)."""
    async with vobiz_call(server.url, subprotocols=["audio.drachtio.org"]) as vobiz:
        await greeted(vobiz)
        assert vobiz.ws.subprotocol == "audio.drachtio.org"
