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
import json
import logging
import math
import os
import random
import signal
import socket
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import deque
from contextlib import asynccontextmanager
from functools import partial

import httpx
import pytest
import trio
import trio_websocket
from hypercorn.trio import serve

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
    gain = audioop.findfactor(segment, probe)
    return gain * audioop.rms(probe, 2) / max(audioop.rms(segment, 2), 1)


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
        began = trio.current_time()
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
            self.max_queue = max(self.max_queue, sum(isinstance(item, bytes) for item in self.queue))
            return
        self.events.append((self.tick, message))
        if event == "checkpoint":
            self.queue.append(message["name"])
        elif event == "clearAudio":
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
async def vobiz_call(base_url: str, **options):
    """A call from answer to hang-up; leaving the block hangs up (closes the socket)."""
    vobiz = SimulatedVobiz(**options)
    url = await vobiz.answer(base_url)
    with trio.fail_after(CALL_LIMIT_S):  # a hung test fails instead of hanging CI
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


async def start_server(nursery, **settings) -> Server:
    settings = vobiz_agent.Settings(host="127.0.0.1", port=0, **settings)
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
    assert stream.text == f"ws://{host}/ws"
    assert stream.attrib == {
        "bidirectional": "true", "audioTrack": "inbound", "keepCallAlive": "true",
        "contentType": "audio/x-mulaw;rate=8000", "statusCallbackUrl": f"{server.url}/stream-status",
        "statusCallbackMethod": "POST",
    }


async def test_answer_honours_forwarded_headers_from_a_tunnel(server):
    response = await server.post("/answer", data={"CallUUID": CALL_UUID},
                                 headers={"X-Forwarded-Proto": "https", "X-Forwarded-Host": "abc.ngrok.app"})
    stream = parse_answer(response).find("Stream")
    assert stream.text == "wss://abc.ngrok.app/ws"
    assert stream.get("statusCallbackUrl") == "https://abc.ngrok.app/stream-status"


async def test_answer_uses_public_url_and_escapes_it(nursery):
    server = await start_server(nursery, public_url="https://calls.example.com/agent")
    response = await server.get("/answer", params={"CallUUID": CALL_UUID},
                                headers={"X-Forwarded-Host": "ignored.example"})
    stream = parse_answer(response).find("Stream")
    assert stream.text == "wss://calls.example.com/agent/ws"
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
    assert (await server.get("/health")).json() == {"status": "ok", "calls": 0}
    async with vobiz_call(server.url) as vobiz:
        await vobiz.until_tick(2)
        assert (await server.get("/health")).json() == {"status": "ok", "calls": 1}


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
    await server.app.live_calls.wait_until_empty()
    assert call_tasks() == []
    assert (await server.get("/health")).json()["calls"] == 0


async def test_a_stop_frame_ends_the_call_and_dtmf_is_logged(server, caplog):
    caplog.set_level(logging.INFO, logger="vobiz_agent")
    async with vobiz_call(server.url) as vobiz:
        await vobiz.until_tick(3)
        await vobiz.ws.send_message(json.dumps({"event": "dtmf", "dtmf": {"digit": "5"}}))
        await vobiz.ws.send_message(json.dumps({"event": "stop", "streamId": vobiz.stream_id}))
        await vobiz.closed.wait()  # the server closed the socket
    await server.app.live_calls.wait_until_empty()
    lines = [r.getMessage() for r in caplog.records if CALL_UUID in r.getMessage()]
    assert any("pressed 5" in line for line in lines)
    assert any("ended by a stop frame" in line for line in lines)


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
    assert health.json() == {"status": "ok", "calls": 0}
    process.send_signal(signal.SIGINT)
    assert await process.wait() == 0
