"""A simulated Vobiz, and loopback stand-ins for Deepgram, OpenAI and the Vobiz REST API.

test_vobiz_agent.py (the protocol's specification, written as tests) drives the real server
with these, and so do bench_vobiz_agent.py, .ci/verify-container and .ci/verify-deploy. It is
a test helper, not part of the product: pyproject.toml installs vobiz_agent alone and the
image's build context (.dockerignore) lets in only what the Dockerfile copies.

The simulated Vobiz is the executable form of what Vobiz sends and expects, as the project's
protocol notes (vobiz-protocol.md, not in this repository) compile it from the vendor docs
(vobiz.ai/docs/...: xml/stream, xml/stream/initiate, xml/stream/stream-events,
xml/stream/play-audio, xml/stream/clear-audio, xml/stream/stop-event, xml/hangup, call/make-call,
call/transfer-call). When a platform fact is learned, it changes here first.

- Answering (notes §1.1, §1.2): it fetches the answer URL by POST or GET with the fourteen fields
  of an observed inbound call, and runs the XML. `<Hangup reason="busy"/>` first rejects the call
  unanswered and unbilled [xml/hangup]; any other verb answers it. `<Stream>` opens the media
  socket; when the socket drops or is refused it reconnects to the same URL, with a new streamId
  and the same callId, at most `maxRetries` times (0-10, default 0: a dropped socket is
  terminal; §2.2) [xml/stream/initiate]. When the stream is over the XML after `<Stream>` runs:
  `<Hangup/>` ends the call; with nothing after it, a `stop` from the app hangs up (4010, "End Of
  XML Instructions", §4.4) [xml/stream/stop-event], while a stream that just ended leaves the
  caller in billed dead air (the notes' "Read first"). `<Stream>`'s attributes count (§2.2):
  contentType picks the caller's format (default L16 8 kHz; 24 kHz does not connect), only a
  bidirectional stream takes app events, audioTrack other than inbound on one hangs up (4010),
  and without keepCallAlive the XML goes on at once.
- Callbacks (§1.3, §1.4): StartStream, PlayedStream, ClearedAudio and (after the app's `stop`)
  StopStream to statusCallbackUrl; Event=Hangup, with the observed call's fields, to the hangup
  URL when the call ends, if the test gives one (it is the Vobiz application's setting).
- The socket (§3, §4; the notes' "Simulator model", §4.6): `start` with nested ids, or the older
  flat shape (§3.1); then one `media` frame every 20 ms, numbered from 1 on each socket, μ-law
  or L16 (§3.2, §4.6): the caller's speech when a test has queued some, quiet line noise
  otherwise; `dtmf` in the shapes seen (§3.6). It takes playAudio in every documented form (L16 8/16/24 kHz, μ-law 8 kHz, any length) and plays
  it as 20 ms of 8 kHz μ-law per tick, as a phone would hear it (§4.1); a `checkpoint` is
  acked with `playedStream` once everything before it has played (§4.2, §3.3); `clearAudio` voids
  the queued audio and checkpoints and is answered with `clearedAudio` (§4.3, §3.4); a `stop`
  closes the socket (§4.4). A message without our streamId, a playAudio in an undocumented form,
  an app event on a one-way stream, or an unknown event is a protocol error, and `vobiz_call` fails
  on any; `sent_formats` keeps the forms the server chose.
- Its clock: one 20 ms tick per call; everything a test asserts is read off that timeline, and
  `playout()` replays it from arrival times, as a phone hears it even when this process stalled.
- The REST API (`VobizApiStandIn`): Make Call (§6.1) and the transfer of a live call, which
  fetches `aleg_url` and tears the live stream down (§6.3) [call/make-call, call/transfer-call];
  and the callback of a `<Record recordSession>` after the call (§2.3).

The provider stand-ins are real loopback servers speaking the providers' wire protocols, never
patches of our code: `DeepgramStandIn` (the live-transcription WebSocket, /v1/listen) and
`OpenAIStandIn` (streamed chat completions and speech, /v1). They answer as scripted, or replay
the recordings a test hands them (fixtures/, with their sources in fixtures/SOURCES.md).
`start_providers` starts both, and a server pointed at them.

Caller speech is synthesized (`speech`: voiced and different per seed; `tone`), and
`resemblance` tells whether what the caller heard is a copy of what was said.
"""

from __future__ import annotations

import array
import base64
import itertools
import json
import math
import random
import socket
import sys
import time
import xml.etree.ElementTree as ET
import zlib
from collections import Counter, deque
from contextlib import asynccontextmanager, suppress
from datetime import UTC, datetime, timedelta, timezone
from functools import partial
from urllib.parse import parse_qsl, urlsplit

import httpx
import trio
import trio_websocket
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

import vobiz_agent
from vobiz_agent import audioop

TICK = 0.020  # one media frame each way, and the simulator's clock
CALL_LIMIT_S = 20  # no test call is longer; this only stops a hung test
CALL_UUID = "12d86ccd-4ed9-45b3-9aac-c03512af8aa7"
# The observed inbound call's parties and account (notes §1.2, a real capture): numbers as sent,
# From without "+", To national with a leading 0, CallerName with "+".
CALLER, CALLED, CALLER_NAME, PARENT_AUTH_ID = "917983165036", "07971442086", "+917983165036", "MA_QVEY4SSB"
CONSOLE_TIME = timezone(timedelta(hours=5, minutes=30))  # StartTime etc. are console-local, IST there (§1.3)
# The headers seen on Vobiz's answer and hangup requests (§1.1); signatures only with callback
# credentials (⚠ §5.1): the simulated Vobiz sends none.
WEBHOOK_HEADERS = {"User-Agent": "Vobiz", "Accept": "*/*", "Accept-Encoding": "gzip"}
CALLBACK_TIMEOUT_S = 3.0  # "respond within 3 s" (§1.1); later ones count as failed (retries: not modelled)
# <Stream contentType>: what Vobiz may stream to the app, and its default (§2.2). L16 at 24 kHz is
# outbound only ("stream does not connect", ⚠ the REST pages list it): refused here.
STREAM_FORMATS = {"audio/x-l16;rate=8000": ("audio/x-l16", 8000), "audio/x-l16;rate=16000": ("audio/x-l16", 16000),
                  "audio/x-mulaw;rate=8000": ("audio/x-mulaw", 8000)}
DEFAULT_CONTENT_TYPE = "audio/x-l16;rate=8000"
# playAudio's media.contentType and sampleRate: L16 at 8, 16 or 24 kHz, μ-law at 8 kHz only (§4.1).
PLAY_FORMATS = {("audio/x-l16", 8000), ("audio/x-l16", 16000), ("audio/x-l16", 24000), ("audio/x-mulaw", 8000)}


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



# Why a call ended, as the Hangup webhook says it (§1.3): (HangupCause, HangupCauseCode,
# HangupCauseName, HangupSource). The XML's own <Hangup/> is the observed call's (CAP); 4010
# after a `stop` with nothing after <Stream> is the docs' (§4.4), whose HangupCause they don't
# give (⚠: NORMAL_CLEARING here); the caller's is the notes' simulator model (§4.6 step 7).
HANGUP_CAUSES = {
    "caller": ("NORMAL_CLEARING", "4000", "Normal Hangup", "Caller"),
    "Hangup": ("NORMAL_CLEARING", "4000", "Normal Hangup", "Answer XML"),
    "Hangup after Stream": ("NORMAL_CLEARING", "4000", "Normal Hangup", "Answer XML"),
    "End Of XML Instructions": ("NORMAL_CLEARING", "4010", "End Of XML Instructions", "Vobiz"),
}


# ── The simulated Vobiz ──


class SimulatedVobiz:
    """One call as Vobiz makes it: answer webhook, WebSocket, 20 ms media, real-time playback.

    It runs the answer XML as the docs say (the protocol notes' "Read first", §2.2, §4.4):
    `<Hangup reason="busy"/>` first rejects the call unanswered (unbilled), anything else
    answers it; `<Stream>` opens the socket, and when the socket drops (or is refused) it
    reconnects to the same URL, with a new streamId and the same callId, at most
    `maxRetries` times (default 0: a dropped socket is terminal). When the stream is over
    it runs the XML after `<Stream>`: `<Hangup/>` ends the call; with nothing after it a
    `stop` from the app hangs up (4010, "End Of XML Instructions"), while a stream that
    just ended leaves the caller in billed dead air (the docs' warning: the worst case).
    """

    RECONNECT_DELAY_S = 0.5  # undocumented; "after a short delay"

    def __init__(self, *, start_shape="nested", media_format=None,
                 cleared_delay=0.0, answers_clear=True, call_id=CALL_UUID, stream_id="stream-1",
                 before_start=(), hangup_url=None, hangup_method="POST", subprotocols=()):
        self.start_shape = start_shape
        # Offered in the upgrade, e.g. mod_audio_fork's "audio.drachtio.org" (⚠ §3, §4.6 step 1: unconfirmed).
        # A client that offers subprotocols may fail an upgrade that chooses none (browsers do): strict here.
        self.subprotocols = tuple(subprotocols)
        self.before_start = before_start  # raw frames a misbehaving peer sends before `start`
        # The caller's audio is in the format <Stream contentType> asks for (§2.2). `media_format`
        # overrides it: a Vobiz sending what start.mediaFormat says, not what was asked (the notes'
        # Decisions: decode whatever it says). Dialled straight (vobiz_call's url=), the URL came
        # from our <Stream>, which asks for μ-law (test_answer_streams_the_call_to_our_websocket).
        self.media_format_fixed = media_format is not None
        self.encoding, self.rate = media_format or ("audio/x-mulaw", 8000)
        # <Stream>'s other attributes (§2.2); the defaults stand for a URL dialled straight.
        self.bidirectional, self.audio_track, self.keep_call_alive = True, "inbound", True
        self.status_url: str | None = None  # statusCallbackUrl: the stream's events go there (§1.4)
        self.status_method = "POST"
        # The hangup URL is the Vobiz application's (inbound) or Make Call's setting, not the XML's (§1.3).
        self.hangup_url, self.hangup_method = hangup_url, hangup_method
        self.callbacks: list[dict] = []  # every HTTP callback: url, method, fields, status (or the error)
        self.callbacks_sent = trio.Event()  # the call is over and every callback has been answered (or not)
        self._outbox, self._callbacks_to_send = trio.open_memory_channel(math.inf)
        self.client: httpx.AsyncClient | None = None  # the callbacks' client (a bench shares one)
        self.started_at = datetime.now(CONSOLE_TIME)  # the call came in (StartTime)
        self.session_fields: dict[str, str] = {}  # the answer request's form, once it was sent
        self.answered_at: tuple[datetime, float] | None = None  # (AnswerTime, trio time)
        self.sent_formats: Counter[tuple[str, int, int]] = Counter()  # (contentType, sampleRate, bytes) of each playAudio
        self._unplayed = b""  # μ-law of the last playAudio short of a whole 20 ms frame
        self._resampled: dict[int, tuple] = {}  # ratecv state per source rate, so chunks join smoothly
        self.cleared_delay = cleared_delay
        self.answers_clear = answers_clear
        self.call_id, self.stream_id = call_id, stream_id
        self.first_stream_id = stream_id
        self.url: str | None = None
        self.max_retries = 0
        self.after_stream: list[ET.Element] = []  # the XML that runs once the stream is over
        self.state = "ringing"  # → "answered", then "hung up" or "dead air"; or "rejected"
        self.billed = False  # answered: the caller's line costs money from here on
        self.hangup_reason = ""  # "busy", "Hangup after Stream", "End Of XML Instructions", "caller"
        self.streams: list[str] = []  # streamId of every socket that was opened
        self.refused: list[int] = []  # HTTP status of every socket the server refused
        self.tick = 0
        self.sequence = 0  # the last media frame's sequenceNumber on this socket (renewed per socket)
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
        self.closed = trio.Event()  # no more audio on this call: the last stream is over
        self.stream_closed = trio.Event()  # the current socket is gone (renewed per stream)
        self.stream_closed.set()  # (and there is none yet)
        self._stopped = self._app_stopped = self._hung_up = self._dropping = self._half_open = False
        self._changed = trio.Event()
        noise = random.Random(7)
        self.noise = array.array("h", (noise.randint(-40, 40) for _ in range(8000 * 2))).tobytes()

    # What a test does with it.

    @property
    def call_open(self) -> bool:
        """Is the phone call still up (and billed)? Dead air counts: the caller still pays."""
        return self.state in ("answered", "dead air")

    def say(self, pcm: bytes) -> int:
        """Queue caller speech (16-bit PCM at the call's rate); returns its first tick."""
        size = int(self.rate * TICK) * 2
        first = self.tick + len(self.to_say) + 1
        for i in range(0, len(pcm), size):
            self.to_say.append(pcm[i : i + size].ljust(size, b"\0"))
        return first

    async def press(self, key: str, shape: str = "vendor") -> None:
        """The caller presses a key: a `dtmf` frame, in one of the shapes seen (protocol §3.6):
        "vendor" {"dtmf": {"digit"}} as Vobiz's own code reads it, "plivo" with track and
        timestamp, "flat" {"dtmf": "5"}."""
        if shape == "vendor":
            frame = {"event": "dtmf", "dtmf": {"digit": key}}
        elif shape == "plivo":
            now_ms = str(int(time.time() * 1000))
            frame = {"event": "dtmf", "sequenceNumber": self.tick, "streamId": self.stream_id,
                     "dtmf": {"track": "inbound", "digit": key, "timestamp": now_ms}}
        else:
            frame = {"event": "dtmf", "streamId": self.stream_id, "dtmf": key}
        await self.ws.send_message(json.dumps(frame))

    async def drop(self, half_open: bool = False) -> None:
        """A network blip: the socket is gone (no close handshake); Vobiz may reconnect.
        Half open: the server is not told at all, its side of the old socket just goes quiet."""
        self._dropping = True
        if half_open:
            self._half_open = True
            self.stream_closed.set()
            self._notify()
        else:
            await self.ws._stream.aclose()

    async def stop_stream(self) -> None:
        """Vobiz ends the stream itself with a `stop` frame (older docs): no reconnect follows."""
        self._stopped = True
        await self.ws.send_message(json.dumps({"event": "stop", "streamId": self.stream_id}))

    async def transfer(self) -> None:
        """A REST transfer moved the call to other XML: Vobiz tears this stream down for good."""
        self._hung_up = True  # no reconnect: the call has left our <Stream>
        if not self.stream_closed.is_set():
            with trio.move_on_after(2):
                await self.ws.aclose()
        self._end_call("transferred", "transfer")

    async def hang_up(self) -> None:
        """The caller hangs up: Vobiz closes the socket and never reconnects."""
        self._hung_up = True
        if not self.stream_closed.is_set():
            with trio.move_on_after(2):
                await self.ws.aclose()
        self._end_call("hung up", "caller")

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

    # The answer XML.

    def answer_fields(self) -> dict[str, str]:
        """The answer request's form: the fourteen keys of the observed inbound call (§1.2), in its order."""
        session_start = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")  # UTC, microseconds
        return {"BillRate": "0", "CallStatus": "ringing", "CallUUID": self.call_id, "CallerName": CALLER_NAME,
                "CountryCode": "", "Direction": "inbound", "Event": "StartApp", "From": CALLER,
                "ParentAuthID": PARENT_AUTH_ID, "RouteType": "", "STIRAttestation": "Not Applicable",
                "STIRVerification": "Not Applicable", "SessionStart": session_start, "To": CALLED}

    async def answer(self, base_url: str, method: str = "POST") -> str | None:
        """Fetch the answer URL and run its XML up to <Stream>; returns the media URL (None: no stream)."""
        self.session_fields = fields = self.answer_fields()
        async with httpx.AsyncClient() as client:
            if method == "POST":
                response = await client.post(base_url + "/answer", data=fields, headers=WEBHOOK_HEADERS)
            else:
                response = await client.get(base_url + "/answer", params=fields, headers=WEBHOOK_HEADERS)
        return self.run_xml(ET.fromstring(response.content))

    def run_xml(self, root: ET.Element) -> str | None:
        self.answer_xml = root
        elements = list(root)
        if elements and elements[0].tag == "Hangup" and elements[0].get("reason") in ("busy", "rejected"):
            self.state, self.hangup_reason = "rejected", elements[0].get("reason")  # never answered
            self.closed.set()
            return None
        self.state, self.billed = "answered", True  # any other verb answers the call
        self.answered_at = (datetime.now(CONSOLE_TIME), trio.current_time())
        for i, element in enumerate(elements):
            if element.tag == "Stream":
                self.after_stream = elements[i + 1:]
                return self._open_stream(element)
            if element.tag == "Hangup":
                break
        self._end_call("hung up", "Hangup")
        return None

    def _open_stream(self, stream: ET.Element) -> str | None:
        """<Stream>'s attributes, as the docs define them (§2.2); the media URL, or None if it can't connect."""
        def flag(name: str) -> bool:
            return (stream.get(name) or "false").strip().lower() == "true"  # both default to false

        self.bidirectional = flag("bidirectional")  # without it, Vobiz takes no app→Vobiz event (§4)
        self.keep_call_alive = flag("keepCallAlive") and self.bidirectional  # it requires bidirectional (§2.2)
        self.audio_track = stream.get("audioTrack", "inbound")
        if self.audio_track not in ("inbound", "outbound", "both"):  # VPY's check (§2.2); Vobiz's: undocumented
            self.protocol_errors.append(f"<Stream audioTrack={self.audio_track!r}>")
        content_type = (stream.get("contentType") or DEFAULT_CONTENT_TYPE).replace(" ", "")
        self.status_url = stream.get("statusCallbackUrl")
        self.status_method = stream.get("statusCallbackMethod", "POST").upper()
        self.max_retries = self._retries(stream.get("maxRetries"))
        self.url = (stream.text or "").strip()  # the URL is the text, whitespace around it trimmed (§2.1)
        if self.bidirectional and self.audio_track != "inbound":
            # "both" (or "outbound") with bidirectional hangs the call up, "End Of XML Instructions" (§2.2)
            self.url = None
            self._end_call("hung up", "End Of XML Instructions")
        elif content_type not in STREAM_FORMATS:
            # L16 at 24 kHz (or anything else): "stream does not connect" (§2.2); the XML after it runs
            self.protocol_errors.append(f"<Stream contentType={content_type!r}>: the stream does not connect")
            self.url = None
            self._after_stream("refused")
        elif not self.media_format_fixed:
            self.encoding, self.rate = STREAM_FORMATS[content_type]
        return self.url

    @staticmethod
    def _retries(value: str | None) -> int:
        """maxRetries: 0-10, default 0; below 0 → 0, above 10 → 10, not an integer → 0 (§2.2)."""
        try:
            return min(max(int(value), 0), 10)
        except (TypeError, ValueError):
            return 0

    def _end_call(self, state: str, reason: str) -> None:
        if self.state in ("answered", "dead air"):
            self.state, self.hangup_reason = state, reason
            if state == "hung up":  # a transfer moves the call on (<Dial>): it has not ended
                self._hangup_webhook(reason)
        self.closed.set()
        self._notify()

    def _hangup_webhook(self, reason: str) -> None:
        """Event=Hangup to the hangup URL, with the observed call's fields (§1.3); the last callback."""
        if self.hangup_url:
            answered, answered_trio = self.answered_at or (datetime.now(CONSOLE_TIME), trio.current_time())
            duration = round(trio.current_time() - answered_trio)
            cause, code, name, source = HANGUP_CAUSES[reason]

            def console(when: datetime) -> str:
                return when.strftime("%Y-%m-%d %H:%M:%S")  # yyyy-MM-dd HH:mm:ss (call/call-object)

            fields = {**self.answer_fields(), **self.session_fields}
            del fields["CountryCode"], fields["RouteType"]  # the answer's, not the hangup's
            fields.update({
                "AnswerTime": console(answered), "BillDuration": str(-(-duration // 60) * 60),  # 60 s pulses
                "CallStatus": "completed", "Duration": str(duration), "EndTime": console(datetime.now(CONSOLE_TIME)),
                "Event": "Hangup", "HangupCause": cause, "HangupCauseCode": code, "HangupCauseName": name,
                "HangupSource": source, "StartTime": console(self.started_at), "TotalCost": "0.00000"})
            self._callback(self.hangup_url, self.hangup_method, dict(sorted(fields.items())))
        self._outbox.close()  # nothing comes after the Hangup

    def _stream_status(self, event: str, **extra: str) -> None:
        """An event to <Stream statusCallbackUrl>, with the docs' example fields (§1.4); Error is
        always there, empty when healthy."""
        if self.status_url:
            fields = {"From": CALLER, "To": CALLED, "CallUUID": self.call_id, "Event": event,
                      "StreamID": self.stream_id, "ParentAuthID": PARENT_AUTH_ID,
                      "status_callback_url": self.status_url, "status_callback_method": self.status_method,
                      "Timestamp": datetime.now(CONSOLE_TIME).strftime("%Y-%m-%d %H:%M:%S"), "Error": "", **extra}
            self._callback(self.status_url, self.status_method, fields)

    def _callback(self, url: str, method: str, fields: dict[str, str]) -> None:
        record = {"url": url, "method": method, "fields": fields, "status": None}
        self.callbacks.append(record)
        with suppress(trio.ClosedResourceError):  # the call is over (a late ack): Vobiz posts nothing more
            self._outbox.send_nowait(record)

    def callbacks_of(self, event: str) -> list[dict]:
        return [record for record in self.callbacks if record["fields"].get("Event") == event]

    async def send_callbacks(self) -> None:
        """Post the callbacks in order as they come, until the call is over (§1.1: form-encoded,
        POST or GET as the URL's method says; notify-only, so the answer's status is all we keep)."""
        async with httpx.AsyncClient(verify=False) as own:  # loopback http: no certificate store to load
            client = self.client or own
            async with self._callbacks_to_send:
                async for record in self._callbacks_to_send:
                    fields = record["fields"]
                    data, params = (None, fields) if record["method"] == "GET" else (fields, None)
                    try:
                        response = await client.request(record["method"], record["url"], data=data, params=params,
                                                        headers=WEBHOOK_HEADERS, timeout=CALLBACK_TIMEOUT_S)
                        record["status"] = response.status_code
                    except httpx.HTTPError as error:
                        record["status"] = type(error).__name__
                    self._notify()
        self.callbacks_sent.set()

    # The wire: one socket per attempt, as many attempts as maxRetries allows.

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Stream the call; started() once the first socket has sent `start` (or the call is over)."""
        attempts = 0
        async with trio.open_nursery() as self._connections:  # the sockets' tasks; half-open ones linger
            while self.url is not None and not self._hung_up:
                if attempts:
                    self.stream_id = f"{self.first_stream_id}-retry{attempts}"
                outcome = await self._stream(task_status)
                if outcome == "stop" or self._hung_up or attempts >= self.max_retries:
                    break
                attempts += 1
                await trio.sleep(self.RECONNECT_DELAY_S)
            if self.url is not None and not self._hung_up:
                self._after_stream(outcome)
            if not self.streams:
                task_status.started()
            self._connections.cancel_scope.cancel()

    def _after_stream(self, outcome: str) -> None:
        """The XML after <Stream> runs (§2.2, §4.4): <Hangup/> ends the call; with nothing after it a
        `stop` hangs up with 4010, and so does any end of a stream without keepCallAlive (it never held
        the call); a kept-alive stream that just ended leaves dead air (the notes' "Read first")."""
        if self.after_stream and self.after_stream[0].tag == "Hangup":
            self._end_call("hung up", "Hangup after Stream")
        elif outcome == "stop" or not self.keep_call_alive:
            self._end_call("hung up", "End Of XML Instructions")
        else:
            self.state = "dead air"
            self.closed.set()
            self._notify()

    async def _stream(self, task_status) -> str:
        """One socket: "stop" (the app sent stop), "closed" (it closed without one), "refused"."""
        self._stopped = self._app_stopped = self._dropping = self._half_open = False
        self.stream_closed = trio.Event()
        self.sequence = 0  # each socket numbers its frames from its own `start` (§4.6 step 2)
        release = trio.Event()  # set: the socket is closed; never set: left half open
        try:
            ws = await self._connections.start(self._hold, release)
        except trio_websocket.ConnectionRejected as rejected:
            self.refused.append(rejected.status_code)
            self.stream_closed.set()
            self._notify()
            return "refused"
        except (trio_websocket.HandshakeError, OSError):
            self.stream_closed.set()
            return "closed"
        try:
            self.ws = ws
            self.streams.append(self.stream_id)
            for frame in self.before_start:
                await ws.send_message(frame)
            await ws.send_message(json.dumps(self.start_frame()))
            self._stream_status("StartStream", ServiceURL=self.url)  # right after the WS start (§1.4)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._receive, nursery)
                if len(self.streams) == 1:
                    task_status.started()
                if self.keep_call_alive:
                    await self._clock()
                else:  # the XML goes on at once, and with nothing but <Hangup/> (or nothing) after, ends (§2.2)
                    self._stopped = True  # over for good: no retry
                    await ws.aclose()
                nursery.cancel_scope.cancel()
        except (trio_websocket.ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # a vanished socket is closed, however it went
        finally:
            if not self._half_open:
                release.set()
            self.stream_closed.set()
            self._notify()
        if self._app_stopped:
            self._stream_status("StopStream")  # only after the app's `stop` (⚠ §1.4), before the Hangup
        return "stop" if self._stopped else "closed"

    async def _hold(self, release: trio.Event, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """One socket, open until released."""
        with suppress(trio_websocket.ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError):
            async with trio_websocket.open_websocket_url(self.url, subprotocols=self.subprotocols or None) as ws:
                if self.subprotocols and ws.subprotocol not in self.subprotocols:
                    self.protocol_errors.append(f"the upgrade chose none of the offered {self.subprotocols}")
                task_status.started(ws)
                await release.wait()

    async def recording_finished(self) -> httpx.Response | None:
        """After the call: a <Record recordSession> in the answer gets its callback, with the
        fields Vobiz (like Plivo) posts for a finished recording."""
        record = getattr(self, "answer_xml", ET.Element("Response")).find("Record")
        if record is None or not record.get("callbackUrl"):
            return None
        file_name = f"rec-5b1e.{record.get('fileFormat', 'mp3')}"
        fields = {"CallUUID": self.call_id, "RecordingID": "rec-5b1e", "RecordingDuration": "12",
                  "RecordingDurationMs": "12040",
                  "RecordUrl": f"https://media.vobiz.ai/v1/Account/MA_X/Recording/{file_name}"}
        async with httpx.AsyncClient() as client:
            return await client.request(record.get("callbackMethod", "POST"), record.get("callbackUrl"),
                                        data=fields)

    def start_frame(self) -> dict:
        media_format = {"encoding": self.encoding, "sampleRate": self.rate}
        if self.start_shape == "flat":  # the older documented shape
            return {"event": "start", "streamId": self.stream_id, "callId": self.call_id,
                    "accountId": "MA_2210JXXN", "contentType": f"{self.encoding};rate={self.rate}"}
        tracks = ["inbound", "outbound"] if self.audio_track == "both" else [self.audio_track]
        return {"sequenceNumber": 0, "event": "start", "extra_headers": "{}",
                "start": {"callId": self.call_id, "streamId": self.stream_id, "accountId": "500025",
                          "tracks": tracks, "mediaFormat": media_format}}

    async def _clock(self) -> None:
        began = self.began = trio.current_time() - self.tick * TICK  # one timeline across reconnects
        while not self.stream_closed.is_set():
            await trio.sleep_until(began + (self.tick + 1) * TICK)
            self.tick += 1
            try:
                await self._send_media()
                await self._play_one()
            except (trio_websocket.ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError):
                self.stream_closed.set()
            self._notify()
        self.queue.clear()  # what was queued for a closed stream never plays

    async def _send_media(self) -> None:
        if self.to_say:
            pcm = self.to_say.popleft()
            self.said_ticks.append(self.tick)
        else:
            size = int(self.rate * TICK) * 2
            start = (self.tick * size) % (len(self.noise) - size)
            pcm = self.noise[start : start + size]
        payload = audioop.lin2ulaw(pcm, 2) if self.encoding == "audio/x-mulaw" else pcm
        self.sequence += 1  # sequenceNumber and chunk: from 1 after this socket's start, equal (§3.2, §4.6)
        await self.ws.send_message(json.dumps({
            "sequenceNumber": self.sequence, "streamId": self.stream_id, "event": "media",
            "media": {"track": "inbound", "timestamp": str(int(time.time() * 1000)),  # epoch ms, a string (§3.2)
                      "chunk": self.sequence, "payload": base64.b64encode(payload).decode()},
            "extra_headers": "{}"}))

    async def _play_one(self) -> None:
        """The phone plays one frame per tick; a checkpoint is acked once all before it played."""
        if self.queue and isinstance(self.queue[0], bytes):
            self.heard[self.tick] = self.queue.popleft()
        while self.queue and isinstance(self.queue[0], str):
            name = self.queue.popleft()
            self.played_names.append(name)
            await self.ws.send_message(json.dumps({"event": "playedStream", "name": name}))
            self._stream_status("PlayedStream", Name=name)  # alongside the WS ack (§1.4)

    async def _receive(self, nursery) -> None:
        try:
            while True:
                message = json.loads(await self.ws.get_message())
                self._on_message(message, nursery)
                self._notify()
        except (trio_websocket.ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError):
            self.stream_closed.set()
            self._notify()

    def _on_message(self, message: dict, nursery) -> None:
        event = message.get("event")
        if message.get("streamId") != self.stream_id:
            self.protocol_errors.append(f"{event} without our streamId: {message.get('streamId')!r}")
        if not self.bidirectional:  # a one-way stream takes no app→Vobiz event: ignored (§2.2, §4, §4.6 step 3)
            self.protocol_errors.append(f"{event} on a one-way stream (no bidirectional=\"true\"): ignored")
            return
        if event == "playAudio":
            self._play_audio(message["media"])
            return
        self.events.append((self.tick, message))
        if event == "checkpoint":
            self._queue_unplayed()  # everything sent before the checkpoint plays before its ack
            self.utterance_ends.append(len(self.audio_arrivals))
            self.queue.append(message["name"])
        elif event == "clearAudio":
            self.utterance_ends.append(len(self.audio_arrivals))  # what was cut short is one, too
            self.clears.append(len(self.audio_arrivals))
            self.queue.clear()  # queued audio and checkpoints are void: never played, never acked
            self._unplayed = b""
            if self.answers_clear:
                self.clearing = True
                nursery.start_soon(self._cleared)
        elif event == "stop":
            self._stopped = self._app_stopped = True
            nursery.start_soon(self.ws.aclose)
        else:
            self.protocol_errors.append(f"unexpected event {event!r}")

    def _play_audio(self, media: dict) -> None:
        """Queue a playAudio in any documented form (§4.1): L16 (little-endian) at 8, 16 or 24 kHz, μ-law
        at 8 kHz, any length (20-60 ms is only recommended). The phone line carries 8 kHz μ-law: the
        caller hears it as that, one 20 ms frame per tick. What was sent is kept in sent_formats."""
        content_type, rate = media.get("contentType"), media.get("sampleRate")
        payload = base64.b64decode(media["payload"])
        self.sent_formats[(content_type, rate, len(payload))] += 1
        if (content_type, rate) not in PLAY_FORMATS or (content_type == "audio/x-l16" and len(payload) % 2):
            # a bad contentType/sampleRate combination, or half a sample: ignored (§4.6 step 3)
            self.protocol_errors.append(f"bad playAudio {content_type} {rate} {len(payload)}: ignored")
            return
        if content_type == "audio/x-l16":
            pcm = payload if sys.byteorder == "little" else audioop.byteswap(payload, 2)
            if rate != 8000:  # a phone line is narrowband whatever rate was sent (§4.1)
                pcm, self._resampled[rate] = audioop.ratecv(pcm, 2, 1, rate, 8000, self._resampled.get(rate))
            payload = audioop.lin2ulaw(pcm, 2)
        audio = self._unplayed + payload
        whole = len(audio) - len(audio) % 160
        self._unplayed = audio[whole:]
        for offset in range(0, whole, 160):
            self._queue_frame(audio[offset : offset + 160])

    def _queue_frame(self, frame: bytes) -> None:
        self.audio_while_clearing += self.clearing
        self.queue.append(frame)
        self.audio_arrivals.append(trio.current_time())  # one per 20 ms of audio, as playout() counts
        self.max_queue = max(self.max_queue, sum(isinstance(item, bytes) for item in self.queue))

    def _queue_unplayed(self) -> None:
        """The last piece short of 20 ms plays too, padded with silence (μ-law 0xFF)."""
        if self._unplayed:
            self._queue_frame(self._unplayed.ljust(160, b"\xff"))
            self._unplayed = b""

    async def _cleared(self) -> None:
        await trio.sleep(self.cleared_delay)  # Vobiz takes its time to flush
        self.clearing = False
        with suppress(trio_websocket.ConnectionClosed):
            await self.ws.send_message(json.dumps({"sequenceNumber": 0, "event": "clearedAudio",
                                                   "streamId": self.stream_id}))
            self._stream_status("ClearedAudio")  # one per clearAudio (§1.4)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()


@asynccontextmanager
async def streaming(vobiz: SimulatedVobiz):
    """The call's stream runs while the block does (it starts once the first socket has
    sent `start`); leaving the block hangs up, if the call is still up."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(vobiz.send_callbacks)
        await nursery.start(vobiz.run)
        yield vobiz
        if vobiz.call_open:  # streaming, or dead air: the caller gives up
            await vobiz.hang_up()
        vobiz._outbox.close()  # a rejected or transferred call posts no Hangup here
        await vobiz.callbacks_sent.wait()  # every callback answered, or failed (CALLBACK_TIMEOUT_S each)
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def vobiz_call(base_url: str, limit_s: float = CALL_LIMIT_S, url: str | None = None, **options):
    """A call from answer to hang-up; leaving the block hangs up (if the call is still up) and waits
    for the callbacks to be answered. With `url`, Vobiz dials that media URL straight away (no
    answer webhook, no retries); `hangup_url` (an option) gets Event=Hangup at the end (§1.3)."""
    vobiz = SimulatedVobiz(**options)
    if url is None:
        await vobiz.answer(base_url)
    else:
        vobiz.url, vobiz.state, vobiz.billed = url, "answered", True
    with trio.fail_after(limit_s):  # a hung test fails instead of hanging CI
        async with streaming(vobiz):
            yield vobiz
        vobiz.recording_response = await vobiz.recording_finished()
    assert vobiz.protocol_errors == [], f"the server broke the protocol: {vobiz.protocol_errors}"


async def greeted(vobiz: SimulatedVobiz) -> int:
    """Wait for the greeting to finish playing; returns the tick it ended."""
    await vobiz.until(lambda: any(name.startswith("greeting") for name in vobiz.played_names))
    return vobiz.tick


# ── The server under test ──


class Server:
    """A server under test: its URL, and its app when it runs in this process."""

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
LOAD_ADMISSION_OFF = {"load_max_lag_ms": 60_000, "load_max_cpu": 64.0, "load_max_behind_ms": 60_000,
                      "load_max_starts_per_s": 10_000}


async def start_server(nursery, **settings) -> Server:
    settings = vobiz_agent.Settings(host="127.0.0.1", port=0, **{**LOAD_ADMISSION_OFF, **settings})
    app = vobiz_agent.create_app(settings)
    urls = await nursery.start(partial(serve, app, vobiz_agent.ServerConfig(settings)))
    return Server(app, urls[0])


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


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
        self.onset: int | None = None  # audio clock at the first speech on this connection
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
                self.onset = start if self.onset is None else self.onset
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
    (None: cut the TCP connection with no close frame). `close_every`:
    (code, reason, after_s): close *every* accepted connection that way after
    after_s of audio, as Deepgram does when it keeps failing.

    `replay`: recorded messages, [(seconds, text)], each sent verbatim once the
    connection's audio clock is that far past the caller's first speech on it.
    With `simulate=False` only those are sent: the energy-driven script is off."""

    FRAME_S = 0.020  # speech is judged per 20 ms frame, however the client chunks its audio

    def __init__(self, transcripts=(), *, refuse=0, drop_after_s=None, drop_code=1011, endpointing_ms=300,
                 utterance_end_ms=1000, interim_after_ms=300, threshold=500, split_final=False,
                 close_every=None, replay=(), simulate=True):
        super().__init__()
        self.transcripts = deque(transcripts)
        self.refuse = refuse
        self.drop_after_s, self.drop_code = drop_after_s, drop_code
        self.endpointing_ms, self.utterance_end_ms = endpointing_ms, utterance_end_ms
        self.interim_after_ms, self.threshold = interim_after_ms, threshold
        self.split_final = split_final
        self.close_every = close_every
        self.replay, self.simulate = list(replay), simulate
        # Per attempt: path, query, headers, accepted, close_code, dropped, and backlog_s: how far
        # the audio received ran ahead of the wall clock since accepting (audio queued while down).
        self.connections: list[dict] = []
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
                  "accepted": False, "close_code": None, "dropped": False, "backlog_s": 0.0}
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
        replay = deque(self.replay)
        accepted_at = trio.current_time()
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
                        if self.simulate:
                            await self._send(ws, transcription, reply)
                    await self._replay(ws, transcription, replay)
                    ahead = transcription.clock / rate - (trio.current_time() - accepted_at)
                    record["backlog_s"] = max(record["backlog_s"], round(ahead, 3))
                    if drop_here and transcription.clock >= self.drop_after_s * rate:
                        record["dropped"] = True
                        await self._drop(ws, record)
                        return
                    if self.close_every and transcription.clock >= self.close_every[2] * rate:
                        record["close_code"] = self.close_every[0]
                        await ws.aclose(*self.close_every[:2])
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
                self._notify()
                for reply in transcription.finals(speech_final=False, from_finalize=True):
                    if self.simulate:
                        await self._send(ws, transcription, reply)
            elif kind == "CloseStream":  # flush, summarise, and hang up politely
                self.close_streams += 1
                for reply in transcription.finals(speech_final=False):
                    if self.simulate:
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

    async def _replay(self, ws, transcription: _Transcription, replay: deque) -> None:
        """Send the recorded messages that are due on this connection's audio clock."""
        while replay and transcription.onset is not None and \
                transcription.clock >= transcription.onset + replay[0][0] * transcription.rate:
            text = replay.popleft()[1]
            try:  # what it was, for the test's records; junk is sent as it is too
                message = json.loads(text)
                kind, transcript = message["type"], None
                if kind == "Results":
                    transcript = message["channel"]["alternatives"][0]["transcript"]
            except (ValueError, RecursionError, LookupError, TypeError):
                message, kind, transcript = {"junk": text[:100]}, None, None
            self.sent.append((transcription.seconds(), kind, transcript))
            self.messages.append((transcription.seconds(), message))
            self._notify()
            await ws.send_message(text)  # the recorded bytes, not a re-serialization

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


HANG_UP = object()  # in a scripted reply: the model calls the hang_up tool here
TRANSFER = object()  # ... or the transfer_call tool


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


def odd_pieces(data: bytes, sizes: tuple[int, ...]) -> list[bytes]:
    """`data` cut into pieces of `sizes` bytes in turn, and also inside every multi-byte
    UTF-8 character and between every \\r and \\n: the places a careless reader breaks."""
    cuts, at, turn = set(), 0, 0
    while at < len(data):
        at += sizes[turn % len(sizes)]
        turn += 1
        cuts.add(at)
    for i in range(1, len(data)):
        if (0x80 <= data[i] < 0xC0 and data[i - 1] >= 0xC0) or data[i - 1 : i + 1] == b"\r\n":
            cuts.add(i)
    bounds = [0, *sorted(cut for cut in cuts if 0 < cut < len(data)), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


class OpenAIStandIn(_Watched):
    """An OpenAI-compatible API, scripted: streamed chat completions and streamed
    24 kHz PCM speech, with delays, errors and hangs set by the test.

    `recordings`: recorded chat streams (bytes), one per request, replayed byte for
    byte in `odd_pieces(recording, replay_pieces)`; once they run out, `replies`
    are streamed. `refuse_tools`: (status, body) for every chat request that
    carries `tools`, as servers answer when the model has no tool support.

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
        self.recordings: list[bytes] = []
        self.replay_pieces: tuple[int, ...] = (7,)
        self.refuse_tools: tuple[int, bytes] | None = None
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
        if self.refuse_tools and request.get("tools"):
            status, body = self.refuse_tools
            await exchange.start(status, "application/json")
            await exchange.write(body)
            await exchange.finish()
            return
        if self.recordings:
            await trio.sleep(self.first_token_delay)
            await exchange.start(200, "text/event-stream; charset=utf-8")
            for piece in odd_pieces(self.recordings.pop(0), self.replay_pieces):
                await exchange.write(piece)
            await exchange.finish()
            return
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
            if token in (HANG_UP, TRANSFER):  # the model calls a tool, streamed as OpenAI does
                finish = "tool_calls"
                name = "hang_up" if token is HANG_UP else "transfer_call"
                call = {"index": 0, "id": "call_standin", "type": "function",
                        "function": {"name": name, "arguments": ""}}
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


# ── Both stand-ins, and our server pointed at them ──


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


# ── The Vobiz REST API: placing a call, transferring a live one ──


class VobizApiStandIn:
    """Vobiz's call-create endpoint, POST /api/v1/Account/{auth_id}/Call/, on loopback,
    and the transfer of a live call, POST /api/v1/Account/{auth_id}/Call/{uuid}/ (202): as
    Vobiz does, it then fetches the aleg_url's XML and ends the call's <Stream>
    (`streams` maps a CallUUID to its SimulatedVobiz)."""

    def __init__(self, status: int = 201, transfer_status: int = 202):
        self.status = status
        self.transfer_status = transfer_status
        self.requests: list[dict] = []
        self.transfers: list[dict] = []
        self.streams: dict[str, SimulatedVobiz] = {}
        self.transferred = trio.Event()

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

        @app.post("/api/v1/Account/<auth_id>/Call/<call_uuid>/")
        async def transfer_call(auth_id: str, call_uuid: str):
            vobiz = self.streams.get(call_uuid)
            self.transfers.append({"path": incoming.path, "headers": dict(incoming.headers),
                                   "body": await incoming.get_json(),
                                   "played_before": list(vobiz.played_names) if vobiz else []})
            if self.transfer_status != 202:
                return {"api_id": "a2", "error": "call not found"}, self.transfer_status
            nursery.start_soon(self._move, vobiz, self.transfers[-1])
            return {"api_id": "a2", "message": "call transferred"}, 202

        config = HypercornConfig()
        config.bind = ["127.0.0.1:0"]
        async with trio.open_nursery() as nursery:
            urls = await nursery.start(partial(serve, app, config))
            task_status.started(urls[0] + "/api/v1")

    async def _move(self, vobiz: SimulatedVobiz | None, transfer: dict) -> None:
        """The leg leaves its XML: fetch aleg_url's, and tear the live stream down."""
        body = transfer["body"]
        fields = {"CallUUID": vobiz.call_id if vobiz else "", "From": "917983165036", "To": "07971442086",
                  "Direction": "inbound", "Event": "Transfer", "CallStatus": "in-progress"}
        async with httpx.AsyncClient() as client:
            response = await client.request(body["aleg_method"], body["aleg_url"], data=fields)
        transfer["xml"] = ET.fromstring(response.content)
        if vobiz is not None:
            await vobiz.transfer()
        self.transferred.set()
