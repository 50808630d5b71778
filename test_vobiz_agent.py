"""Tests for vobiz_agent: the real server on a loopback port, driven by a
simulated Vobiz that behaves as shared/vobiz-protocol.md describes.

The simulated Vobiz keeps one clock of 20 ms ticks per call. On every tick it
sends one `media` frame of the caller's audio (speech when the test has queued
some, quiet line noise otherwise) and plays one queued `playAudio` frame, as a
phone would hear it. Everything the tests assert is read off that timeline.
"""

from __future__ import annotations

import array
import base64
import hashlib
import hmac
import json
import logging
import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
import zlib
from collections import deque
from contextlib import asynccontextmanager
from functools import partial
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest
import trio
import trio_websocket
import wsproto
import wsproto.events
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vobiz_agent
from vobiz_agent import audioop

HERE = os.path.dirname(os.path.abspath(__file__))
TICK = 0.020
CALL_LIMIT_S = 20  # no test call is longer; this only stops a hung test
CALL_UUID = "12d86ccd-4ed9-45b3-9aac-c03512af8aa7"


# ── Caller speech, synthesized: voiced and speech-like, different per phrase ──


def speech(seconds: float, seed: int, rate: int = 8000) -> bytes:
    """A voiced, speech-like sound: harmonics of a gliding pitch, syllables with
    changing vowel colour and short dips between them. Each seed is a different
    'phrase', so correlation tells one phrase from another."""
    rng = random.Random(seed)
    pitch = rng.uniform(110, 190)
    samples = array.array("h")
    phase = 0.0
    t = 0
    total = int(seconds * rate)
    while t < total:
        length = int(rng.uniform(0.12, 0.26) * rate)
        weights = [rng.uniform(0.2, 1.0) / k for k in range(1, 13)]
        for i in range(min(length, total - t)):
            f0 = pitch * (1 + 0.12 * math.sin(2 * math.pi * 0.8 * (t + i) / rate + seed))
            phase += 2 * math.pi * f0 / rate
            envelope = math.sin(math.pi * i / length) ** 0.5
            value = sum(w * math.sin(k * phase) for k, w in enumerate(weights, start=1))
            samples.append(int(4500 * envelope * value))
        t += length
        gap = min(int(0.04 * rate), total - t)
        samples.extend([0] * gap)
        t += gap
    return samples.tobytes()


def tone(frequency: float, seconds: float, rate: int, amplitude: int = 10000) -> bytes:
    count = int(seconds * rate)
    return array.array(
        "h", (int(amplitude * math.sin(2 * math.pi * frequency * i / rate)) for i in range(count))
    ).tobytes()


def resemblance(heard: bytes, said: bytes) -> float:
    """The correlation (1.0 = a perfect copy, about 0 = unrelated) between a
    half-second probe from inside `said` and the best-matching stretch of
    `heard`, both 8 kHz PCM. audioop.findfit finds the stretch."""
    probe = said[len(said) // 4 : len(said) // 4 + 4000 * 2]
    heard = heard[len(heard) - len(heard.lstrip(b"\0")) & ~1 :]  # findfit can't start on pure silence
    if len(heard) < len(probe):
        return 0.0
    offset, _ = audioop.findfit(heard, probe)
    segment = heard[2 * offset : 2 * offset + len(probe)]
    gain = audioop.findfactor(segment, probe)  # its sign is a matter of offset for a pure tone
    return abs(gain) * audioop.rms(probe, 2) / max(audioop.rms(segment, 2), 1)


# ── The simulated Vobiz ──


class SimulatedVobiz:
    """One call as Vobiz makes it: answer webhook, WebSocket, 20 ms media, real-time playback."""

    def __init__(self, *, start_shape="nested", media_format=("audio/x-mulaw", 8000),
                 cleared_delay=0.0, answers_clear=True, call_id=CALL_UUID, stream_id="stream-1",
                 before_start=()):
        self.start_shape = start_shape
        self.before_start = before_start  # raw frames a misbehaving peer sends before `start`
        self.encoding, self.rate = media_format
        self.cleared_delay = cleared_delay
        self.answers_clear = answers_clear
        self.call_id, self.stream_id = call_id, stream_id
        self.tick = 0
        self.began = 0.0  # trio time of tick 0: tick t happens at began + t * TICK
        self.audio_arrivals: list[float] = []  # trio time each playAudio frame arrived
        self.utterance_ends: list[int] = []  # len(audio_arrivals) at each checkpoint (and clearAudio)
        self.clears: list[int] = []  # len(audio_arrivals) at each clearAudio
        self.to_say: deque[bytes] = deque()  # caller PCM, one 20 ms frame each
        self.said_ticks: list[int] = []  # ticks that carried caller speech
        self.queue: deque[bytes | str] = deque()  # playAudio frames and checkpoint names
        self.heard: dict[int, bytes] = {}  # tick → μ-law frame the caller heard
        self.events: list[tuple[int, dict]] = []  # every non-audio message from the agent
        self.played_names: list[str] = []
        self.max_queue = 0
        self.clearing = False
        self.audio_while_clearing = 0
        self.protocol_errors: list[str] = []
        self.closed = trio.Event()
        self._changed = trio.Event()
        noise = random.Random(7)
        self.noise = array.array("h", (noise.randint(-40, 40) for _ in range(8000 * 2))).tobytes()

    # What a test does with it.

    def say(self, pcm: bytes) -> int:
        """Queue caller speech (16-bit PCM at the call's rate); returns its first tick."""
        size = int(self.rate * TICK) * 2
        first = self.tick + len(self.to_say) + 1
        for i in range(0, len(pcm), size):
            self.to_say.append(pcm[i : i + size].ljust(size, b"\0"))
        return first

    async def until(self, condition) -> None:
        """Wait (on the simulated clock, not a timer) until condition() holds."""
        while not condition():
            changed = self._changed
            await changed.wait()

    async def until_tick(self, tick: int) -> None:
        await self.until(lambda: self.tick >= tick)

    def agent_ticks(self, start: int = 0) -> list[int]:
        return sorted(t for t in self.heard if t >= start)

    def agent_audio(self, start: int, end: int) -> bytes:
        """What the caller heard between two ticks, as 8 kHz PCM (silence where nothing played)."""
        frames = (self.heard.get(t, b"\xff" * 160) for t in range(start, end))
        return audioop.ulaw2lin(b"".join(frames), 2)

    def event_ticks(self, name: str) -> list[int]:
        return [tick for tick, message in self.events if message.get("event") == name]

    # Playout in real time, read off arrival times: what a phone hears even when this
    # process (the simulator too) was stalled and its tick clock had to catch up.

    JITTER_BUFFER_S = TICK  # playing an utterance starts this long after its first frame arrives

    def playout(self) -> list[tuple[float, float]]:
        """(arrived, seconds of audio queued ahead of it) for every agent frame. Utterances play
        back to back; one that finds the queue empty starts JITTER_BUFFER_S after its first
        frame arrives; clearAudio empties the queue. queued < 0: an underrun, the caller heard
        a gap before this frame, in the middle of an utterance."""
        starts, clears = {0, *self.utterance_ends}, set(self.clears)
        played_until, result = -math.inf, []
        for i, arrived in enumerate(self.audio_arrivals):
            if i in clears:
                played_until = -math.inf
            if i in starts and played_until < arrived:
                played_until = arrived + self.JITTER_BUFFER_S
            result.append((arrived, played_until - arrived))
            played_until = max(played_until, arrived) + TICK
        return result

    def underruns(self, since: float = 0.0) -> int:
        """Frames (arrived after `since`) that came after everything before them had played."""
        return sum(queued < 0 and arrived > since for arrived, queued in self.playout())

    def queued(self, start: float, end: float = math.inf) -> list[float]:
        """Seconds queued ahead of each frame that arrived between `start` and `end`."""
        return [queued for arrived, queued in self.playout() if start <= arrived <= end]

    # The wire.

    async def answer(self, base_url: str, method: str = "POST") -> str:
        fields = {"CallUUID": self.call_id, "From": "917983165036", "To": "07971442086",
                  "Direction": "inbound", "Event": "StartApp", "CallStatus": "ringing"}
        async with httpx.AsyncClient() as client:
            if method == "POST":
                response = await client.post(base_url + "/answer", data=fields)
            else:
                response = await client.get(base_url + "/answer", params=fields)
        stream = ET.fromstring(response.content).find("Stream")
        return stream.text.strip()

    def start_frame(self) -> dict:
        media_format = {"encoding": self.encoding, "sampleRate": self.rate}
        if self.start_shape == "flat":  # the older documented shape
            return {"event": "start", "streamId": self.stream_id, "callId": self.call_id,
                    "accountId": "MA_2210JXXN", "contentType": f"{self.encoding};rate={self.rate}"}
        return {"sequenceNumber": 0, "event": "start", "extra_headers": "{}",
                "start": {"callId": self.call_id, "streamId": self.stream_id, "accountId": "500025",
                          "tracks": ["inbound"], "mediaFormat": media_format}}

    async def run(self, ws, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self.ws = ws
        for frame in self.before_start:
            await ws.send_message(frame)
        await ws.send_message(json.dumps(self.start_frame()))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._receive, nursery)
            task_status.started()
            await self._clock()

    async def _clock(self) -> None:
        began = self.began = trio.current_time()
        while not self.closed.is_set():
            await trio.sleep_until(began + (self.tick + 1) * TICK)
            self.tick += 1
            try:
                await self._send_media()
                await self._play_one()
            except trio_websocket.ConnectionClosed:
                self.closed.set()
            self._notify()

    async def _send_media(self) -> None:
        if self.to_say:
            pcm = self.to_say.popleft()
            self.said_ticks.append(self.tick)
        else:
            size = int(self.rate * TICK) * 2
            start = (self.tick * size) % (len(self.noise) - size)
            pcm = self.noise[start : start + size]
        payload = audioop.lin2ulaw(pcm, 2) if self.encoding == "audio/x-mulaw" else pcm
        await self.ws.send_message(json.dumps({
            "sequenceNumber": self.tick, "streamId": self.stream_id, "event": "media",
            "media": {"track": "inbound", "timestamp": str(int(trio.current_time() * 1000)),
                      "chunk": self.tick, "payload": base64.b64encode(payload).decode()},
            "extra_headers": "{}"}))

    async def _play_one(self) -> None:
        """The phone plays one frame per tick; a checkpoint is acked once all before it played."""
        if self.queue and isinstance(self.queue[0], bytes):
            self.heard[self.tick] = self.queue.popleft()
        while self.queue and isinstance(self.queue[0], str):
            name = self.queue.popleft()
            self.played_names.append(name)
            await self.ws.send_message(json.dumps({"event": "playedStream", "name": name}))

    async def _receive(self, nursery) -> None:
        try:
            while True:
                message = json.loads(await self.ws.get_message())
                self._on_message(message, nursery)
                self._notify()
        except trio_websocket.ConnectionClosed:
            self.closed.set()
            self._notify()

    def _on_message(self, message: dict, nursery) -> None:
        event = message.get("event")
        if message.get("streamId") != self.stream_id:
            self.protocol_errors.append(f"{event} without our streamId: {message.get('streamId')!r}")
        if event == "playAudio":
            media = message["media"]
            frame = base64.b64decode(media["payload"])
            if (media["contentType"], media["sampleRate"], len(frame)) != ("audio/x-mulaw", 8000, 160):
                self.protocol_errors.append(f"bad playAudio {media['contentType']} {media['sampleRate']} {len(frame)}")
            self.audio_while_clearing += self.clearing
            self.queue.append(frame)
            self.audio_arrivals.append(trio.current_time())
            self.max_queue = max(self.max_queue, sum(isinstance(item, bytes) for item in self.queue))
            return
        self.events.append((self.tick, message))
        if event == "checkpoint":
            self.utterance_ends.append(len(self.audio_arrivals))
            self.queue.append(message["name"])
        elif event == "clearAudio":
            self.utterance_ends.append(len(self.audio_arrivals))  # what was cut short is one, too
            self.clears.append(len(self.audio_arrivals))
            self.queue.clear()  # queued audio and checkpoints are void: never played, never acked
            if self.answers_clear:
                self.clearing = True
                nursery.start_soon(self._cleared)
        elif event == "stop":
            nursery.start_soon(self.ws.aclose)
        else:
            self.protocol_errors.append(f"unexpected event {event!r}")

    async def _cleared(self) -> None:
        await trio.sleep(self.cleared_delay)  # Vobiz takes its time to flush
        self.clearing = False
        await self.ws.send_message(json.dumps({"sequenceNumber": 0, "event": "clearedAudio",
                                               "streamId": self.stream_id}))

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()


@asynccontextmanager
async def vobiz_call(base_url: str, limit_s: float = CALL_LIMIT_S, url: str | None = None, **options):
    """A call from answer to hang-up; leaving the block hangs up (closes the socket).
    With `url`, a reconnect: no answer webhook, straight to that media URL."""
    vobiz = SimulatedVobiz(**options)
    url = url or await vobiz.answer(base_url)
    vobiz.url = url
    with trio.fail_after(limit_s):  # a hung test fails instead of hanging CI
        async with trio_websocket.open_websocket_url(url) as ws, trio.open_nursery() as nursery:
            await nursery.start(vobiz.run, ws)
            yield vobiz
            nursery.cancel_scope.cancel()
    assert vobiz.protocol_errors == []


# ── The server under test ──


class Server:
    def __init__(self, app, url):
        self.app, self.url = app, url

    async def get(self, path: str, **kwargs) -> httpx.Response:
        async with httpx.AsyncClient() as client:
            return await client.get(self.url + path, **kwargs)

    async def post(self, path: str, **kwargs) -> httpx.Response:
        async with httpx.AsyncClient() as client:
            return await client.post(self.url + path, **kwargs)


# This process runs the simulated Vobiz and the stand-ins as well as the server: its CPU and
# event-loop lag are not the server's alone, so admission by load is off unless a test sets it.
LOAD_ADMISSION_OFF = {"load_max_lag_ms": 60_000, "load_max_cpu": 64.0, "load_max_behind_ms": 60_000}


async def start_server(nursery, **settings) -> Server:
    settings = vobiz_agent.Settings(host="127.0.0.1", port=0, **{**LOAD_ADMISSION_OFF, **settings})
    app = vobiz_agent.create_app(settings)
    urls = await nursery.start(partial(serve, app, vobiz_agent.hypercorn_config(settings)))
    return Server(app, urls[0])


@pytest.fixture
async def server(nursery):
    return await start_server(nursery)


async def greeted(vobiz: SimulatedVobiz) -> int:
    """Wait for the greeting to finish playing; returns the tick it ended."""
    await vobiz.until(lambda: any(name.startswith("greeting") for name in vobiz.played_names))
    return vobiz.tick


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
        "statusCallbackMethod": "POST",
    }


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
    xml = vobiz_agent.stream_xml("wss://h/ws?a=1&b=2", "https://h/s")
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
    # Sent in real time, not in a burst: Vobiz never held more than a few frames.
    assert vobiz.max_queue <= 10
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


async def test_a_stop_frame_ends_the_call_and_dtmf_is_logged(server, caplog):
    caplog.set_level(logging.INFO, logger="vobiz_agent")
    async with vobiz_call(server.url) as vobiz:
        await vobiz.until_tick(3)
        await vobiz.ws.send_message(json.dumps({"event": "dtmf", "dtmf": {"digit": "5"}}))
        await vobiz.ws.send_message(json.dumps({"event": "stop", "streamId": vobiz.stream_id}))
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


# ── Stand-ins for the providers: real loopback servers speaking their wire protocols ──


class _Watched:
    """Lets a test wait until the stand-in's records satisfy a condition."""

    def __init__(self) -> None:
        self._changed = trio.Event()

    def _notify(self) -> None:
        # Wake everyone waiting on this event, and arm a fresh one for the next change.
        self._changed.set()
        self._changed = trio.Event()

    async def wait_until(self, predicate) -> None:
        """Return as soon as predicate() is true; it is checked after every change."""
        while not predicate():
            await self._changed.wait()


# ─────────────────────────────────────────────────────────────────────────────
# Deepgram: wss://api.deepgram.com/v1/listen
# ─────────────────────────────────────────────────────────────────────────────


class _Utterance:
    """The caller's speech since the last final result."""

    def __init__(self, start: int):
        self.start = start  # audio clock (samples) at speech onset
        self.loud_end = start  # end of the last loud frame
        self.loud = 0  # samples of loud audio so far
        self.text: str | None = None  # the scripted transcript, once it has been "recognised"


class _Transcription:
    """One connection's transcription: 16-bit PCM frames in, Deepgram messages out.

    Time is the audio clock (samples received), never the wall clock, so what is
    sent when depends only on the audio the client sent."""

    def __init__(self, standin: DeepgramStandIn, rate: int, query: dict[str, str]):
        self.standin = standin
        self.rate = rate
        self.clock = 0  # samples received
        self.utterance: _Utterance | None = None
        self.word_end: int | None = None  # end of the last final word still owed an UtteranceEnd
        # As Deepgram does, send only the events the query asked for.
        self.vad_events = query.get("vad_events") == "true"
        self.interim_results = query.get("interim_results") == "true"
        self.utterance_end = "utterance_end_ms" in query

    def samples(self, ms: int) -> int:
        return self.rate * ms // 1000

    def quiet_since(self, samples: int) -> float:
        """Milliseconds of audio since `samples` on the clock."""
        return (self.clock - samples) * 1000 / self.rate

    def seconds(self, samples: int | None = None) -> float:
        return round((self.clock if samples is None else samples) / self.rate, 3)

    def feed(self, pcm: bytes) -> list[dict]:
        """One frame of audio: advance the clock and return the messages it causes."""
        standin, out = self.standin, []
        start = self.clock
        self.clock += len(pcm) // 2
        utterance = self.utterance
        if audioop.rms(pcm, 2) > standin.threshold:
            if utterance is None:
                utterance = self.utterance = _Utterance(start)
                if self.vad_events:
                    out.append({"type": "SpeechStarted", "channel": [0], "timestamp": self.seconds(start)})
            utterance.loud_end = self.clock
            utterance.loud += len(pcm) // 2
            # Enough speech to "recognise" a word: this utterance takes the next scripted transcript.
            if utterance.text is None and utterance.loud >= self.samples(standin.interim_after_ms):
                utterance.text = standin._next_transcript()
                if self.interim_results:
                    first = self.words(utterance)[:1]
                    out.append(self.results(first, utterance.start, is_final=False, speech_final=False))
        elif utterance is not None and self.quiet_since(utterance.loud_end) >= standin.endpointing_ms:
            out += self.finals(speech_final=not standin.split_final)
        # UtteranceEnd: a long enough gap after the last final word, with no new words meanwhile.
        no_new_words = self.utterance is None or self.utterance.text is None
        if (self.utterance_end and self.word_end is not None and no_new_words
                and self.quiet_since(self.word_end) >= standin.utterance_end_ms):
            last_word_end = self.seconds(self.word_end)
            out.append({"type": "UtteranceEnd", "channel": [0, 1], "last_word_end": last_word_end})
            self.word_end = None
        return out

    def finals(self, *, speech_final: bool, from_finalize: bool = False) -> list[dict]:
        """Final results for the utterance in progress (none if there is none)."""
        utterance, self.utterance = self.utterance, None
        if utterance is None:
            return []
        words = self.words(utterance)
        if words:
            self.word_end = utterance.loud_end
        if not self.standin.split_final or not words:
            return [self.results(words, utterance.start, True, speech_final, from_finalize)]
        # Two finals, neither speech_final: only the UtteranceEnd tells the client the turn is over.
        half = (len(words) + 1) // 2
        middle = round(words[half]["start"] * self.rate) if half < len(words) else self.clock
        return [self.results(words[:half], utterance.start, True, False, from_finalize, end=middle),
                self.results(words[half:], middle, True, False, from_finalize)]

    def words(self, utterance: _Utterance) -> list[dict]:
        """The utterance's transcript as Deepgram words, spread evenly over its speech."""
        texts = (utterance.text or "").split()
        step = (utterance.loud_end - utterance.start) / max(len(texts), 1)

        def at(i: int) -> float:
            return self.seconds(round(utterance.start + i * step))

        return [{"word": text.strip(".,!?;:").lower(), "start": at(i), "end": at(i + 1), "confidence": 0.99,
                 "punctuated_word": text} for i, text in enumerate(texts)]

    def results(self, words: list[dict], start: int, is_final: bool, speech_final: bool,
                from_finalize: bool = False, end: int | None = None) -> dict:
        end = self.clock if end is None else end
        return {
            "type": "Results", "channel_index": [0, 1],
            "duration": self.seconds(end - start), "start": self.seconds(start),
            "is_final": is_final, "speech_final": speech_final, "from_finalize": from_finalize,
            "channel": {"alternatives": [{
                "transcript": " ".join(word["punctuated_word"] for word in words),
                "confidence": 0.99 if words else 0.0, "words": words}]},
            "metadata": {"request_id": "standin", "model_info": {"name": "standin"}},
        }


class DeepgramStandIn(_Watched):
    """Deepgram's live transcription WebSocket, scripted.

    Each caller utterance (speech found by energy: a 20 ms frame is loud when its
    rms is above `threshold`) is "recognised" as the next of `transcripts`, and
    answered as Deepgram answers `interim_results=true&vad_events=true&
    utterance_end_ms=…&endpointing=…`: SpeechStarted at onset, one interim after
    `interim_after_ms` of speech, a final (speech_final) after `endpointing_ms`
    of quiet, UtteranceEnd after `utterance_end_ms` of quiet after the last word.
    The timings come from here; the query only switches events on, as it does
    for Deepgram. Bursts shorter than `interim_after_ms` (a cough) get an empty
    final and use up no transcript.

    `refuse`: the first attempts to reject with HTTP 401, as Deepgram rejects a
    bad key (a missing key is rejected too). `drop_after_s`: end the first
    accepted connection after that much audio, with close code `drop_code`
    (None: cut the TCP connection with no close frame)."""

    FRAME_S = 0.020  # speech is judged per 20 ms frame, however the client chunks its audio

    def __init__(self, transcripts=(), *, refuse=0, drop_after_s=None, drop_code=1011, endpointing_ms=300,
                 utterance_end_ms=1000, interim_after_ms=300, threshold=500, split_final=False):
        super().__init__()
        self.transcripts = deque(transcripts)
        self.refuse = refuse
        self.drop_after_s, self.drop_code = drop_after_s, drop_code
        self.endpointing_ms, self.utterance_end_ms = endpointing_ms, utterance_end_ms
        self.interim_after_ms, self.threshold = interim_after_ms, threshold
        self.split_final = split_final
        self.connections: list[dict] = []  # per attempt: path, query, headers, accepted, close_code, dropped
        self.attempts = 0
        self.keepalives = 0
        self.close_streams = 0
        self.finalizes = 0
        self.audio_bytes = 0
        self.sent: list[tuple[float, str, str | None]] = []  # (audio secs, type, transcript)
        self.messages: list[tuple[float, dict]] = []  # the same, whole messages
        self.unexpected: list[str] = []  # text messages Deepgram would not understand
        self._dropped = False

    def _next_transcript(self) -> str:
        return self.transcripts.popleft() if self.transcripts else "hello"

    async def serve(self, task_status=trio.TASK_STATUS_IGNORED):
        """Serve on a loopback port; started() with the ws:// URL to listen at."""
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                partial(trio_websocket.serve_websocket, self._handle, "127.0.0.1", 0, None))
            task_status.started(f"ws://127.0.0.1:{server.port}/v1/listen")

    async def _handle(self, request: trio_websocket.WebSocketRequest) -> None:
        self.attempts += 1
        split = urlsplit(request.path)
        query = dict(parse_qsl(split.query))
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in request.headers}
        record = {"path": request.path, "query": query, "headers": headers,
                  "accepted": False, "close_code": None, "dropped": False}
        self.connections.append(record)
        self._notify()
        ws = None
        try:
            refusal = self._refusal(split.path, query, headers, request.proposed_subprotocols)
            if refusal:
                status, body = refusal
                await request.reject(status, extra_headers=[(b"content-type", b"application/json")],
                                     body=json.dumps(body).encode())
                return
            # A key sent as subprotocols is answered by choosing "token", as Deepgram does.
            token = "token" if request.proposed_subprotocols[:1] == ("token",) else None
            ws = await request.accept(subprotocol=token)
            record["accepted"] = True
            self._notify()
            await self._transcribe(ws, query, record)
        except trio_websocket.ConnectionClosed:
            pass  # the client vanished; that is the client's business, not a server error
        finally:
            # trio_websocket reports 1000 for any close we started, so those codes are
            # recorded where we close; this catches the client's closes.
            if ws is not None and ws.closed is not None and record["close_code"] is None:
                record["close_code"] = ws.closed.code
            self._notify()

    def _refusal(self, path, query, headers, subprotocols) -> tuple[int, dict] | None:
        """Why Deepgram would refuse this handshake, as (status, body), or None."""
        def error(code, message):
            return {"err_code": code, "err_msg": message, "request_id": "standin"}
        # Deepgram takes the key as "Authorization: Token <key>" (or Bearer, for temporary
        # keys), or, from browsers, as the subprotocols ["token", "<key>"].
        scheme, _, key = headers.get("authorization", "").partition(" ")
        has_key = (scheme in ("Token", "Bearer") and key.strip() != "") or (
            len(subprotocols) == 2 and subprotocols[0] == "token")
        if self.attempts <= self.refuse or not has_key:
            return 401, error("INVALID_AUTH", "Invalid credentials.")
        if path != "/v1/listen":
            return 404, error("NOT_FOUND", "Not found.")
        if query.get("encoding", "linear16") not in ("mulaw", "linear16"):
            return 400, error("Bad Request", "The stand-in decodes only mulaw and linear16.")
        return None

    async def _transcribe(self, ws: trio_websocket.WebSocketConnection, query: dict, record: dict) -> None:
        mulaw = query.get("encoding", "linear16") == "mulaw"
        rate = int(query.get("sample_rate", "16000"))
        width = 1 if mulaw else 2
        frame_bytes = int(rate * self.FRAME_S) * width
        transcription = _Transcription(self, rate, query)
        drop_here = self.drop_after_s is not None and not self._dropped
        self._dropped |= drop_here  # only the first accepted connection is dropped
        pending = bytearray()  # audio short of a whole frame (a message may even split a sample)
        while True:
            message = await ws.get_message()
            if isinstance(message, bytes):
                self.audio_bytes += len(message)
                self._notify()
                pending += message
                while len(pending) >= frame_bytes:
                    frame = bytes(pending[:frame_bytes])
                    del pending[:frame_bytes]
                    pcm = audioop.ulaw2lin(frame, 2) if mulaw else frame
                    for reply in transcription.feed(pcm):
                        await self._send(ws, transcription, reply)
                    if drop_here and transcription.clock >= self.drop_after_s * rate:
                        record["dropped"] = True
                        await self._drop(ws, record)
                        return
                continue
            try:
                kind = json.loads(message).get("type")
            except (ValueError, AttributeError):
                kind = None
            if kind == "KeepAlive":
                self.keepalives += 1
                self._notify()
            elif kind == "Finalize":  # flush what was heard so far, marked from_finalize
                self.finalizes += 1
                for reply in transcription.finals(speech_final=False, from_finalize=True):
                    await self._send(ws, transcription, reply)
            elif kind == "CloseStream":  # flush, summarise, and hang up politely
                self.close_streams += 1
                for reply in transcription.finals(speech_final=False):
                    await self._send(ws, transcription, reply)
                await self._send(ws, transcription, {
                    "type": "Metadata", "transaction_key": "deprecated", "request_id": "standin",
                    "sha256": "0" * 64, "created": "2024-01-01T00:00:00.000Z",
                    "duration": transcription.seconds(), "channels": 1})
                record["close_code"] = 1000
                await ws.aclose()
                return
            else:
                # Deepgram ends the stream on a message it does not understand; so do we,
                # so that a client bug shows up as a failure rather than as silence.
                self.unexpected.append(message)
                record["close_code"] = 1008
                self._notify()
                await ws.aclose(1008, "stand-in: unexpected text message")
                return

    async def _send(self, ws, transcription: _Transcription, message: dict) -> None:
        transcript = None
        if message["type"] == "Results":
            transcript = message["channel"]["alternatives"][0]["transcript"]
        self.sent.append((transcription.seconds(), message["type"], transcript))
        self.messages.append((transcription.seconds(), message))
        self._notify()
        await ws.send_message(json.dumps(message))

    async def _drop(self, ws: trio_websocket.WebSocketConnection, record: dict) -> None:
        record["close_code"] = self.drop_code or 1006  # 1006: what the client sees with no close frame
        if self.drop_code is not None:
            await ws.aclose(self.drop_code, "stand-in dropped the connection")
        else:
            # No close frame at all, as when a network path dies. trio_websocket has no
            # public way to do this, so close the TCP stream under it.
            await ws._stream.aclose()


# ─────────────────────────────────────────────────────────────────────────────
# OpenAI-compatible HTTP API: /v1/chat/completions and /v1/audio/speech
# ─────────────────────────────────────────────────────────────────────────────


def _compact(value) -> str:
    return json.dumps(value, separators=(",", ":"))  # OpenAI sends JSON without spaces


def _openai_error(status: int, message: str) -> dict:
    kind, code = {400: ("invalid_request_error", None), 401: ("invalid_request_error", "invalid_api_key"),
                  404: ("invalid_request_error", "unknown_url"), 429: ("requests", "rate_limit_exceeded"),
                  }.get(status, ("server_error", None))
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


class _Exchange:
    """One HTTP request and its response, as the ASGI app sees them."""

    def __init__(self, send, method: str, path: str, headers: dict[str, str], body: bytes):
        self._send = send
        self.method, self.path, self.headers, self.body = method, path, headers, body
        self.record: tuple[str, int] | None = None  # ("chat" | "tts", index) once the request is recorded
        self.finished = False

    async def start(self, status: int, content_type: str) -> None:
        await self._send({"type": "http.response.start", "status": status,
                          "headers": [(b"content-type", content_type.encode())]})

    async def write(self, data: bytes) -> None:
        # Each write goes out at once: with no content-length, Hypercorn sends a chunk per write.
        await self._send({"type": "http.response.body", "body": data, "more_body": True})

    async def finish(self) -> None:
        self.finished = True  # every byte of content is out; a hang-up now loses only the terminator
        await self._send({"type": "http.response.body", "body": b"", "more_body": False})

    async def json(self, status: int, value: dict) -> None:
        await self.start(status, "application/json")
        await self.write(json.dumps(value).encode())
        await self.finish()


class OpenAIStandIn(_Watched):
    """An OpenAI-compatible API, scripted: streamed chat completions and streamed
    24 kHz PCM speech, with delays, errors and hangs set by the test.

    Every request (with a key) is recorded; `completed` and `disconnects` then
    say, as ("chat" | "tts", index into chat_requests | tts_requests), whether
    the response was sent whole or the client hung up before its end. Those two
    are written a moment after the client saw the end (or hung up), so a test
    waits for them: `await openai.wait_until(lambda: openai.disconnects)`."""

    RATE = 24000  # OpenAI's "pcm": 24 kHz, 16-bit little-endian, mono

    def __init__(self) -> None:
        super().__init__()
        self.replies: list[list[str]] = []  # tokens of each chat reply; popped, one per request
        self.first_token_delay = 0.0
        self.token_interval = 0.0
        self.chat_status = 200
        self.chat_hang = False
        self.tts_first_byte_delay = 0.0
        self.tts_status = 200
        self.tts_chunk_bytes = 4801  # odd, so a 16-bit sample is split across chunks
        self.tts_interval = 0.0
        self.chat_requests: list[dict] = []  # {"body": parsed JSON, "headers": {lowercase: value}}
        self.tts_requests: list[dict] = []
        self.completed: list[tuple[str, int]] = []
        self.disconnects: list[tuple[str, int]] = []
        self._voices: dict[str, bytes] = {}

    async def serve(self, task_status=trio.TASK_STATUS_IGNORED):
        """Serve on a loopback port; started() with the base URL, ending in /v1."""
        config = HypercornConfig()
        config.bind = ["127.0.0.1:0"]
        async with trio.open_nursery() as nursery:
            urls = await nursery.start(partial(serve, self._asgi, config, mode="asgi"))
            task_status.started(urls[0] + "/v1")

    # ── What the voice sounds like ──

    def voice(self, text: str) -> bytes:
        """The speech for `text`: a tone whose pitch depends on the text (so different
        sentences usually differ), 24 kHz 16-bit little-endian PCM, 10 ms fades."""
        if text not in self._voices:
            frequency = 400 + 100 * (zlib.crc32(text.encode()) % 25)
            count = int(max(0.4, 0.05 * len(text)) * self.RATE)
            fade = int(0.010 * self.RATE)
            samples = array.array("h", (
                int(8000 * min(1.0, i / fade, (count - 1 - i) / fade)
                    * math.sin(2 * math.pi * frequency * i / self.RATE))
                for i in range(count)))
            if sys.byteorder == "big":
                samples.byteswap()
            self._voices[text] = samples.tobytes()
        return self._voices[text]

    def voice_8k(self, text: str) -> bytes:
        """voice(text) at 8 kHz, as a phone line carries it (for correlation checks)."""
        return audioop.ratecv(self.voice(text), 2, 1, self.RATE, 8000, None)[0]

    # ── The ASGI app ──

    async def _asgi(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {name.decode("latin-1").lower(): value.decode("latin-1")
                   for name, value in scope["headers"]}
        exchange = _Exchange(send, scope["method"], scope["path"], headers, body)
        client_left = False

        async def watch_for_hangup(cancel_scope: trio.CancelScope) -> None:
            # Hypercorn tells the app the client left only through receive(); the body
            # was read, so the next message is http.disconnect, if it ever comes.
            nonlocal client_left
            while (await receive())["type"] != "http.disconnect":
                pass
            client_left = True
            cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_for_hangup, nursery.cancel_scope)
            await self._route(exchange)
            nursery.cancel_scope.cancel()  # answered: stop watching
        if exchange.record is not None:
            hung_up = client_left and not exchange.finished
            (self.disconnects if hung_up else self.completed).append(exchange.record)
            self._notify()

    async def _route(self, exchange: _Exchange) -> None:
        routes = {("POST", "/v1/chat/completions"): self._chat, ("POST", "/v1/audio/speech"): self._speech}
        handler = routes.get((exchange.method, exchange.path))
        if handler is None:
            await exchange.json(404, _openai_error(404, f"Unknown URL: {exchange.method} {exchange.path}"))
            return
        scheme, _, key = exchange.headers.get("authorization", "").partition(" ")
        if scheme != "Bearer" or not key.strip():
            await exchange.json(401, _openai_error(401, "You didn't provide an API key."))
            return
        try:
            request = json.loads(exchange.body)
        except ValueError:
            request = None
        if not isinstance(request, dict):
            await exchange.json(400, _openai_error(400, "We could not parse the JSON body of your request."))
            return
        await handler(exchange, request)

    def _record(self, exchange: _Exchange, kind: str, requests: list[dict], request: dict) -> None:
        exchange.record = (kind, len(requests))
        requests.append({"body": request, "headers": exchange.headers})
        self._notify()

    async def _chat(self, exchange: _Exchange, request: dict) -> None:
        self._record(exchange, "chat", self.chat_requests, request)
        if self.chat_status != 200:
            await exchange.json(self.chat_status, _openai_error(self.chat_status, "Told to fail."))
            return
        if self.chat_hang:
            await trio.sleep_forever()  # until the client gives up (or the test ends)
        tokens = self.replies.pop(0) if self.replies else ["Okay."]
        model = request.get("model", "gpt-4o-mini")
        if not request.get("stream"):
            await trio.sleep(self.first_token_delay)
            await exchange.json(200, {
                "id": "chatcmpl-standin", "object": "chat.completion", "created": 0, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(tokens)},
                             "finish_reason": "stop"}]})
            return

        def chunk(delta: dict, finish_reason: str | None = None) -> bytes:
            return ("data: " + _compact({
                "id": "chatcmpl-standin", "object": "chat.completion.chunk", "created": 0, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}) + "\n\n").encode()

        await exchange.start(200, "text/event-stream; charset=utf-8")
        await exchange.write(chunk({"role": "assistant", "content": ""}))
        finish = "stop"
        for number, token in enumerate(tokens):
            await trio.sleep(self.token_interval if number else self.first_token_delay)
            if token == HANG_UP:  # the model calls the hang_up tool, streamed as OpenAI does
                finish = "tool_calls"
                call = {"index": 0, "id": "call_standin", "type": "function",
                        "function": {"name": "hang_up", "arguments": ""}}
                await exchange.write(chunk({"tool_calls": [call]}))
                await exchange.write(chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}))
            else:
                await exchange.write(chunk({"content": token}))
        await exchange.write(chunk({}, finish))
        if (request.get("stream_options") or {}).get("include_usage"):
            # Asked for usage, OpenAI sends one more chunk, with no choices at all.
            await exchange.write(("data: " + _compact({
                "id": "chatcmpl-standin", "object": "chat.completion.chunk", "created": 0, "model": model,
                "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": len(tokens),
                                         "total_tokens": 1 + len(tokens)}}) + "\n\n").encode())
        await exchange.write(b"data: [DONE]\n\n")
        await exchange.finish()

    async def _speech(self, exchange: _Exchange, request: dict) -> None:
        self._record(exchange, "tts", self.tts_requests, request)
        if self.tts_status != 200:
            await exchange.json(self.tts_status, _openai_error(self.tts_status, "Told to fail."))
            return
        if not isinstance(request.get("input"), str) or not request["input"]:
            await exchange.json(400, _openai_error(400, "'input' is a required property"))
            return
        if request.get("response_format", "mp3") != "pcm":  # OpenAI's default is mp3, which we can't speak
            await exchange.json(400, _openai_error(400, "The stand-in speaks only response_format 'pcm'."))
            return
        pcm = self.voice(request["input"])
        await trio.sleep(self.tts_first_byte_delay)
        await exchange.start(200, "application/octet-stream")
        for offset in range(0, len(pcm), self.tts_chunk_bytes):
            if offset:
                await trio.sleep(self.tts_interval)
            await exchange.write(pcm[offset : offset + self.tts_chunk_bytes])
        await exchange.finish()


# ── The AI agent, against loopback stand-ins for Deepgram and OpenAI ──


HANG_UP = object()  # in a scripted reply: the model calls the hang_up tool here


class Providers:
    """A Deepgram and an OpenAI stand-in, and our server pointed at them."""

    def __init__(self, deepgram: DeepgramStandIn, openai: OpenAIStandIn, server: Server):
        self.deepgram, self.openai, self.server = deepgram, openai, server

    def user_messages(self, request: int) -> list[str]:
        messages = self.openai.chat_requests[request]["body"]["messages"]
        return [m["content"] for m in messages if m["role"] == "user"]

    def assistant_messages(self, request: int) -> list[str]:
        messages = self.openai.chat_requests[request]["body"]["messages"]
        return [m["content"] for m in messages if m["role"] == "assistant"]

    def spoken_texts(self) -> list[str]:
        return [request["body"]["input"] for request in self.openai.tts_requests]


async def start_providers(nursery, transcripts=(), *, deepgram_options=None, **settings) -> Providers:
    deepgram = DeepgramStandIn(transcripts, **(deepgram_options or {}))
    openai = OpenAIStandIn()
    deepgram_url = await nursery.start(deepgram.serve)
    openai_url = await nursery.start(openai.serve)
    server = await start_server(nursery, deepgram_api_key="dg-secret", deepgram_url=deepgram_url,
                                openai_api_key="sk-secret", openai_base_url=openai_url,
                                greeting="Hello, how can I help?", **settings)
    return Providers(deepgram, openai, server)


def heard_sentence(vobiz: SimulatedVobiz, openai: OpenAIStandIn, text: str, start: int = 0) -> float:
    """How much of what the caller heard (from `start`) sounds like the TTS voice saying `text`."""
    return resemblance(vobiz.agent_audio(start, vobiz.tick), openai.voice_8k(text))


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
        await greeted(vobiz)
        said = vobiz.say(speech(0.8, seed=36))
        await vobiz.until(lambda: len(vobiz.played_names) >= 2)
        assert heard_sentence(vobiz, ai.openai, vobiz_agent.LLM_APOLOGY, start=said) > 0.9
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
    server = await start_server(nursery, public_url="https://calls.example.com", vobiz_auth_token="secret-token")
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
    assert any("replayed nonce" in line for line in refusals) and any("wrong V3" in line for line in refusals)
    assert not any("secret-token" in r.getMessage() or signed["X-Vobiz-Signature-V3"] in r.getMessage()
                   for r in caplog.records)  # no secrets in the logs


async def test_unsigned_webhooks_are_refused_when_signatures_are_required(nursery):
    server = await start_server(nursery, public_url="https://calls.example.com",
                                vobiz_auth_token="secret-token", vobiz_require_signature=True)
    assert (await server.post("/answer", data={"CallUUID": CALL_UUID})).status_code == 403
    signed = vobiz_signs("secret-token", "https://calls.example.com/answer", "55555555555555555555", 3)
    assert (await server.post("/answer", data={"CallUUID": CALL_UUID}, headers=signed)).status_code == 200
    metrics = (await server.get("/metrics")).text
    assert 'vobiz_agent_calls_refused_total{reason="signature"} 1' in metrics


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
    expired = vobiz_agent.stream_token(b"shared-secret", CALL_UUID, int(time.time()) - 1)
    assert await refused_status(f"{base}/{CALL_UUID}/{expired}") == 403
    assert await refused_status(good) is None
    metrics = (await server.get("/metrics")).text
    assert 'vobiz_agent_calls_refused_total{reason="token"} 3' in metrics


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
    root = ET.fromstring(response.content)
    assert [child.tag for child in root] == ["Speak", "Hangup"] and "busy" in root.find("Speak").text
    assert 'vobiz_agent_calls_refused_total{reason="busy"} 1' in (await server.get("/metrics")).text


async def test_a_silent_socket_is_ended_after_the_idle_timeout(nursery, caplog):
    server = await start_server(nursery, idle_timeout_s=1.0)
    async with trio_websocket.open_websocket_url(await media_url(server)) as ws:
        await ws.send_message(json.dumps(SimulatedVobiz().start_frame()))  # and then nothing at all
        with pytest.raises(trio_websocket.ConnectionClosed):
            while True:
                await ws.get_message()
    await server.app.switchboard.wait_until_empty()
    assert any("no frame from Vobiz for 1 s" in r.getMessage() for r in caplog.records)
    assert 'vobiz_agent_calls_total{ended="idle timeout"} 1' in (await server.get("/metrics")).text


async def test_a_reconnect_continues_the_conversation_and_the_agent_ends_it(nursery):
    server = await start_server(nursery, offline_max_turns=2)
    async with vobiz_call(server.url) as first:
        await greeted(first)
        first.say(speech(0.8, seed=81))
        await first.until(lambda: len(first.played_names) >= 2)  # turn 1 answered
        url = first.url
    await server.app.switchboard.wait_until_empty()
    async with vobiz_call(server.url, url=url, stream_id="stream-2") as second:  # Vobiz maxRetries
        said = second.say(speech(0.8, seed=82))
        await second.closed.wait()  # turn 2 was the last: echo, goodbye, stop
    assert not any(name.startswith("greeting") for name in second.played_names)  # not greeted again
    assert [name.split("-")[0] for name in second.played_names] == ["echo", "goodbye"]
    assert resemblance(second.agent_audio(said, second.tick), speech(0.8, seed=82)) > 0.9
    assert second.event_ticks("stop")
    metrics = (await server.get("/metrics")).text
    assert 'vobiz_agent_calls_total{ended="agent"} 1' in metrics
    assert 'vobiz_agent_calls_total{ended="hang-up"} 1' in metrics
    assert "vobiz_agent_turns_total 2" in metrics
    assert "vobiz_agent_turn_latency_seconds_count 2" in metrics


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
    workers = int(args[args.index("--workers") + 1]) if "--workers" in args else 1
    await process_log.until(lambda text: text.count("Running on") >= workers)  # Hypercorn: listening
    return process, process_log


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


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
        assert [child.tag for child in busy] == ["Speak", "Hangup"]
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


class VobizApiStandIn:
    """Vobiz's call-create endpoint, POST /api/v1/Account/{auth_id}/Call/, on loopback."""

    def __init__(self, status: int = 201):
        self.status = status
        self.requests: list[dict] = []

    async def serve(self, task_status=trio.TASK_STATUS_IGNORED):
        from quart import request as incoming
        from quart_trio import QuartTrio

        app = QuartTrio("vobiz-api")

        @app.post("/api/v1/Account/<auth_id>/Call/")
        async def create_call(auth_id: str):
            self.requests.append({"auth_id": auth_id, "headers": dict(incoming.headers),
                                  "body": await incoming.get_json()})
            if self.status in (200, 201):
                return {"api_id": "a1", "message": "call fired", "request_uuid": "0e516b32-req"}, self.status
            return {"api_id": "a1", "error": "nope"}, self.status

        config = HypercornConfig()
        config.bind = ["127.0.0.1:0"]
        async with trio.open_nursery() as nursery:
            urls = await nursery.start(partial(serve, app, config))
            task_status.started(urls[0] + "/api/v1")


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
                               "hangup_url": "https://abc.ngrok.app/hangup", "hangup_method": "POST"}


async def test_the_call_command_says_clearly_when_vobiz_cannot_be_reached():
    code, _, err = await place_call(f"http://127.0.0.1:{free_port()}/api/v1", "--to", "+91", "--from", "1")
    assert code == 1 and "could not reach" in err and len(err.splitlines()) == 1



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


async def test_workers_share_calls_replace_a_dead_one_and_drain_with_goodbyes(nursery):
    port = free_port()
    process, process_log = await start_process(nursery, port, "--workers", "2", DRAIN_TIMEOUT_S="0.5")
    first, _ = re.findall(r"worker (\d+) started", process_log.text)
    os.kill(int(first), signal.SIGKILL)  # a worker crashes: the parent starts another in its place
    await process_log.until(lambda text: f"worker {first} ended (exit code -9)" in text
                            and len(re.findall(r"worker \d+ started", text)) == 3
                            and text.count("Running on") == 3)

    async def talk(n: int, done: trio.Event) -> None:  # answer and WebSocket land on any worker
        words = speech(0.6, seed=90 + n)
        async with vobiz_call(f"http://127.0.0.1:{port}", call_id=f"worker-call-{n}") as vobiz:
            await greeted(vobiz)
            said = vobiz.say(words)
            await vobiz.until(lambda: len(vobiz.played_names) >= 2)
            assert resemblance(vobiz.agent_audio(said, vobiz.tick), words) > 0.9
            done.set()
            await vobiz.closed.wait()  # ended by the drain, not by us
        assert vobiz.played_names[-1].startswith("goodbye") and vobiz.event_ticks("stop")

    answered = [trio.Event() for _ in range(4)]
    async with trio.open_nursery() as calls:
        for n, done in enumerate(answered):
            calls.start_soon(talk, n, done)
        for done in answered:
            await done.wait()
        process.send_signal(signal.SIGTERM)  # to the parent, as `docker stop` does
    assert await process.wait() == 0
    assert process_log.text.count("SIGTERM received: shutting down") == 2  # each worker drained
    assert "Traceback" not in process_log.text


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
    server = await start_server(nursery, offline_silence_s=1.0)
    async with vobiz_call(server.url) as vobiz:  # the caller never says a word
        await vobiz.closed.wait()
    assert [name.split("-")[0] for name in vobiz.played_names] == ["greeting", "goodbye"]
    assert vobiz.event_ticks("stop")
    assert any("ended by agent" in r.getMessage() for r in caplog.records)


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
            await trio.sleep(0)
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
    assert response.content == vobiz_agent.busy_xml()
    metrics = (await server.get("/metrics")).text
    assert f'vobiz_agent_calls_refused_total{{reason="{reason}"}} 1' in metrics
    assert "vobiz_agent_event_loop_lag_seconds " in metrics and "vobiz_agent_cpu_share " in metrics
    health = (await server.get("/health")).json()
    assert health["status"] == "ok" and health["load"]["refusing"] == reason  # healthy, but taking no calls
    assert health["load"][figure] > over


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
