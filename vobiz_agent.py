"""vobiz_agent: answer phone calls on Vobiz and talk with the caller.

One file, one process, one Trio event loop. A call travels like this:

    caller's phone
        │  (the phone network)
        ▼
    Vobiz ── POST /answer ──────────────▶ this server answers with <Stream> XML:
        │                                  "open a WebSocket to wss://…/ws"
        │◀──────────── WebSocket /ws ─────▶ one Call (one Trio nursery):
        │   start, media (20 ms of caller     inbound task:  frames → ears
        │   audio each), playedStream,        ears:          "speech started", "turn ended"
        │   clearedAudio                      conversation:  turn → responder → player
        │                                     player:        PCM → 8 kHz μ-law → playAudio
        │   playAudio, checkpoint,   ◀─────── barge-in:      caller talks over the agent →
        │   clearAudio                                       cancel the reply, clearAudio
        ▼
    POST /hangup, /stream-status ───────▶ logged for the operator

With no provider keys the agent is an offline "echo test": it greets the caller with
a chime, listens, and plays each of the caller's turns back to them.

Run it:      pip install . && python vobiz_agent.py      (serves on 0.0.0.0:5000)
Expose it:   a tunnel (ngrok http 5000), then PUBLIC_URL=https://<tunnel-host>
Test it:     pip install '.[test]' && pytest
"""

from __future__ import annotations

import argparse
import array
import base64
import binascii
import hashlib
import hmac
import json
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import secrets
import signal
import sys
import time
import warnings
import xml.etree.ElementTree as ET
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import aclosing, suppress
from dataclasses import dataclass, field
from functools import cache, partial
from typing import Protocol
from urllib.parse import urlencode, urljoin, urlsplit

import httpx
import trio
import trio_websocket
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from quart import Response, current_app, request, websocket
from quart_trio import QuartTrio

with warnings.catch_warnings():  # 3.11/3.12 warn that audioop leaves the standard library in 3.13;
    warnings.simplefilter("ignore", DeprecationWarning)  # there, the audioop-lts package provides it.
    import audioop

try:  # Quart 0.23 raises this from receive() when the peer hangs up ...
    from quart.wrappers import ClientDisconnectedError
except ImportError:  # ... Quart 0.22 cancels the handler instead, which needs no except.

    class ClientDisconnectedError(Exception):
        """Stands in for Quart 0.23's exception; Quart 0.22 never raises it."""


log = logging.getLogger("vobiz_agent")


# ─────────────────────────────────────────────────────────────────────────────
# Settings: read and checked once, at start. A bad value stops the program with
# one line that names the variable, says what is wrong and shows a good value.
# ─────────────────────────────────────────────────────────────────────────────


class SettingsError(Exception):
    """A setting that cannot be used; the message is meant for the operator."""


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
DEFAULT_SYSTEM_PROMPT = (
    "You are a friendly voice assistant on a phone call. Answer in one to three short, "
    "spoken sentences. Use plain words: no lists, markdown, emoji or URLs. If you did not "
    "catch something, ask the caller to repeat it."
)


@dataclass(frozen=True)
class Settings:
    host: str = "0.0.0.0"
    port: int = 5000
    public_url: str | None = None  # e.g. https://abc.ngrok.app, without a trailing slash
    log_level: str = "INFO"
    log_format: str = "text"  # or "json": one JSON object per line, for log collectors
    barge_in_min_ms: int = 200  # how long the caller must talk over the agent to stop it
    # The AI agent: used when both keys are set.
    deepgram_api_key: str = ""
    deepgram_url: str = "wss://api.deepgram.com/v1/listen"
    deepgram_model: str = "nova-3"
    deepgram_language: str = "en"
    deepgram_endpointing_ms: int = 300
    openai_api_key: str = ""
    openai_base_url: str = "https://api.openai.com/v1"
    openai_model: str = "gpt-4o-mini"
    openai_timeout_s: float = 10.0  # connect, and wait for the first token or byte
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    tts_model: str = "gpt-4o-mini-tts"
    tts_voice: str = "alloy"
    greeting: str = "Hello! How can I help you today?"
    # Trust and operations.
    vobiz_auth_id: str = ""
    vobiz_auth_token: str = ""  # set: every webhook's signature is checked
    vobiz_require_signature: bool = False  # refuse webhooks that carry no signature at all
    vobiz_api_url: str = "https://api.vobiz.ai/api/v1"
    stream_secret: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False)
    stream_secret_generated: bool = True  # no STREAM_SECRET: only this process can verify its URLs
    max_calls: int = 50
    # Admission by measured load: over any of these, new calls hear "busy" (MAX_CALLS stays the hard cap).
    load_max_lag_ms: int = 50  # the event loop woke a timer this late, within the last few seconds
    load_max_cpu: float = 0.75  # the process's CPU (share of one core), counting the new call too
    load_max_behind_ms: int = 250  # the median call reads its caller's audio this far behind real time
    offline_max_turns: int = 20  # the echo test says goodbye after this many turns,
    offline_silence_s: float = 60.0  # or after this long without a word from the caller
    idle_timeout_s: float = 30.0
    drain_timeout_s: float = 30.0

    @property
    def uses_ai(self) -> bool:
        return bool(self.deepgram_api_key and self.openai_api_key)

    @classmethod
    def from_env(cls, env: Mapping[str, str], host: str | None = None, port: int | None = None) -> Settings:
        """Settings from the environment; command-line flags win over variables."""
        defaults = cls()
        return cls(
            host=host or env.get("HOST") or defaults.host,
            port=port if port is not None else _port("PORT", env.get("PORT", "5000")),
            public_url=_url("PUBLIC_URL", env.get("PUBLIC_URL", ""), ("http", "https"), "https://abc.ngrok.app"),
            log_level=_choice("LOG_LEVEL", env.get("LOG_LEVEL", "INFO"), LOG_LEVELS),
            log_format=_choice("LOG_FORMAT", env.get("LOG_FORMAT", "text"), ("TEXT", "JSON")).lower(),
            barge_in_min_ms=_number("BARGE_IN_MIN_MS", env, defaults.barge_in_min_ms, 0, 2000),
            **_ai_settings(env, defaults),
            **_trust_settings(env, defaults),
            max_calls=_number("MAX_CALLS", env, defaults.max_calls, 1, 100_000),
            load_max_lag_ms=_number("LOAD_MAX_LAG_MS", env, defaults.load_max_lag_ms, 1, 60_000),
            load_max_cpu=_number("LOAD_MAX_CPU", env, defaults.load_max_cpu, 0.01, 64.0),
            load_max_behind_ms=_number("LOAD_MAX_BEHIND_MS", env, defaults.load_max_behind_ms, 1, 60_000),
            offline_max_turns=_number("OFFLINE_MAX_TURNS", env, defaults.offline_max_turns, 1, 10_000),
            offline_silence_s=_number("OFFLINE_SILENCE_S", env, defaults.offline_silence_s, 1, 86_400),
            idle_timeout_s=_number("IDLE_TIMEOUT_S", env, defaults.idle_timeout_s, 1, 3600),
            drain_timeout_s=_number("DRAIN_TIMEOUT_S", env, defaults.drain_timeout_s, 0, 3600),
        )


def _ai_settings(env: Mapping[str, str], defaults: Settings) -> dict:
    """The AI agent's providers: both keys or neither (then the offline agent answers)."""
    deepgram_key, openai_key = env.get("DEEPGRAM_API_KEY", ""), env.get("OPENAI_API_KEY", "")
    if bool(deepgram_key) != bool(openai_key):
        missing = "OPENAI_API_KEY" if deepgram_key else "DEEPGRAM_API_KEY"
        raise SettingsError(f"{missing} is not set: the AI agent needs both DEEPGRAM_API_KEY and "
                            f"OPENAI_API_KEY (set neither for the offline echo agent), e.g. {missing}=sk-...")
    return {
        "deepgram_api_key": deepgram_key,
        "deepgram_url": _url("DEEPGRAM_URL", env.get("DEEPGRAM_URL", ""), ("ws", "wss"),
                          defaults.deepgram_url) or defaults.deepgram_url,
        "deepgram_model": env.get("DEEPGRAM_MODEL") or defaults.deepgram_model,
        "deepgram_language": env.get("DEEPGRAM_LANGUAGE") or defaults.deepgram_language,
        "deepgram_endpointing_ms": _number("DEEPGRAM_ENDPOINTING_MS", env, defaults.deepgram_endpointing_ms,
                                           10, 5000),
        "openai_api_key": openai_key,
        "openai_base_url": _url("OPENAI_BASE_URL", env.get("OPENAI_BASE_URL", ""), ("http", "https"),
                             defaults.openai_base_url) or defaults.openai_base_url,
        "openai_model": env.get("OPENAI_MODEL") or defaults.openai_model,
        "openai_timeout_s": _number("OPENAI_TIMEOUT_S", env, defaults.openai_timeout_s, 0.1, 120),
        "system_prompt": env.get("SYSTEM_PROMPT") or defaults.system_prompt,
        "tts_model": env.get("TTS_MODEL") or defaults.tts_model,
        "tts_voice": env.get("TTS_VOICE") or defaults.tts_voice,
        "greeting": env.get("GREETING") or defaults.greeting,
    }


def _trust_settings(env: Mapping[str, str], defaults: Settings) -> dict:
    """Vobiz credentials (webhook signatures, outbound calls) and the media-URL secret."""
    return {
        "vobiz_auth_id": env.get("VOBIZ_AUTH_ID", ""),
        "vobiz_auth_token": env.get("VOBIZ_AUTH_TOKEN", ""),
        "vobiz_require_signature": _flag("VOBIZ_REQUIRE_SIGNATURE", env.get("VOBIZ_REQUIRE_SIGNATURE", "")),
        "vobiz_api_url": _url("VOBIZ_API_URL", env.get("VOBIZ_API_URL", ""), ("http", "https"),
                           defaults.vobiz_api_url) or defaults.vobiz_api_url,
        "stream_secret": env["STREAM_SECRET"].encode() if env.get("STREAM_SECRET") else defaults.stream_secret,
        "stream_secret_generated": not env.get("STREAM_SECRET"),
    }


def _port(name: str, value: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= 65535:
        raise SettingsError(f"{name}={value!r} is not a TCP port (1-65535), e.g. {name}=5000")
    return int(value)


def _url(name: str, value: str, schemes: tuple[str, ...], example: str) -> str | None:
    if not value:
        return None
    parts = urlsplit(value)
    if parts.scheme not in schemes or not parts.netloc or parts.query:
        raise SettingsError(f"{name}={value!r} is not a {'/'.join(schemes)} base URL, e.g. {name}={example}")
    return value.rstrip("/")


def _choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    if value.upper() not in choices:
        raise SettingsError(f"{name}={value!r} is not one of {', '.join(choices)}, e.g. {name}={choices[1]}")
    return value.upper()


def _flag(name: str, value: str) -> bool:
    if value.lower() not in ("", "true", "false", "1", "0", "yes", "no"):
        raise SettingsError(f"{name}={value!r} is not true or false, e.g. {name}=true")
    return value.lower() in ("true", "1", "yes")


def _number(name: str, env: Mapping[str, str], default: float, low: float, high: float) -> float:
    value = env.get(name, "")
    if not value:
        return default
    try:
        number = type(default)(value)
    except ValueError:
        number = None
    if number is None or not low <= number <= high:
        raise SettingsError(f"{name}={value!r} is not a number from {low} to {high}, e.g. {name}={default}")
    return number


# ─────────────────────────────────────────────────────────────────────────────
# Audio. Vobiz plays G.711 μ-law at 8000 samples/s: one byte per sample, so
# 8 bytes per millisecond, and a 20 ms frame is exactly 160 bytes. Agent speech
# arrives as 16-bit PCM at whatever rate the voice makes (24 kHz for OpenAI TTS)
# and must be brought down to 8 kHz without letting high tones fold into the band.
# ─────────────────────────────────────────────────────────────────────────────

TELEPHONE_RATE = 8000
FRAME_SECONDS = 0.020
FRAME_BYTES = 160  # 20 ms of 8 kHz μ-law: 8 bytes/ms × 20 ms
ULAW_SILENCE = b"\xff"  # μ-law's code for a zero sample: pads the last frame of an utterance


@dataclass(frozen=True)
class MediaFormat:
    """The caller's audio as Vobiz sends it (from `start.mediaFormat`)."""

    encoding: str  # "audio/x-mulaw" or "audio/x-l16"
    rate: int  # samples per second

    @property
    def sample_width(self) -> int:
        return 1 if self.encoding == "audio/x-mulaw" else 2

    def to_pcm(self, payload: bytes) -> bytes:
        """Inbound payload → 16-bit native-endian PCM at `self.rate`."""
        if self.sample_width == 1:
            return audioop.ulaw2lin(payload, 2)
        # Observed Vobiz L16 is little-endian (vobiz-protocol.md §3.2).
        return payload if sys.byteorder == "little" else audioop.byteswap(payload, 2)


MULAW_8K = MediaFormat("audio/x-mulaw", 8000)


def lowpass_taps(rate: int, passband: int = 3400, stopband: int = 5000, attenuation_db: float = 50) -> list[float]:
    """A linear-phase low-pass FIR, designed with a Kaiser window.

    Why a filter at all: `audioop.ratecv` just interpolates between samples, so
    anything above 4 kHz in 24 kHz speech (sibilants, a synthetic voice's hiss)
    folds back below 4 kHz at full strength: a 5 kHz tone comes out as a 3 kHz
    one. The telephone band is 300-3400 Hz; we keep that flat and push 5 kHz
    and above down by `attenuation_db`. Kaiser's formulas give the length and
    window shape for that attenuation and transition width (3400 → 5000 Hz).
    """
    transition = 2 * math.pi * (stopband - passband) / rate
    taps = math.ceil((attenuation_db - 8) / (2.285 * transition)) | 1  # odd: a whole-sample delay
    beta = 0.1102 * (attenuation_db - 8.7)
    cutoff = (passband + stopband) / 2 / rate  # cycles per sample
    middle = (taps - 1) / 2
    coefficients = []
    for n in range(taps):
        t = n - middle
        ideal = 2 * cutoff if t == 0 else math.sin(2 * math.pi * cutoff * t) / (math.pi * t)
        window = _bessel_i0(beta * math.sqrt(1 - (t / middle) ** 2)) / _bessel_i0(beta)
        coefficients.append(ideal * window)
    gain = sum(coefficients)
    return [c / gain for c in coefficients]  # unity gain at 0 Hz


def _bessel_i0(x: float) -> float:
    """The modified Bessel function I0 (the Kaiser window's shape), by its series."""
    total = term = 1.0
    k = 1
    while term > 1e-12 * total:
        term *= (x / (2 * k)) ** 2
        total += term
        k += 1
    return total


class Downsampler:
    """16-bit PCM at any rate → 16-bit PCM at 8 kHz, one chunk at a time.

    Filtering and `ratecv` both remember the end of the previous chunk (the
    filter its last taps-1 samples, ratecv its interpolation state), so a voice
    split into chunks of any size comes out exactly as if it arrived whole.

    The filter is polyphase: when the rate is a multiple of 8 kHz we compute
    only the output samples that decimation keeps (1 in 3 at 24 kHz), so the
    cost is per *output* sample. Each tap is one audioop call over a strided
    copy of the input; the symmetric taps of a linear-phase filter share a
    multiply. Samples are halved on the way in (headroom: a pair of samples,
    or a running sum, can exceed 16 bits) and doubled at the end.
    """

    def __init__(self, rate: int):
        self.rate = rate
        # Decimate by the largest whole step that keeps at least 8 kHz; ratecv does the rest.
        self.step = max(d for d in range(1, max(rate // TELEPHONE_RATE, 1) + 1) if rate % d == 0)
        self.taps = lowpass_taps(rate) if rate > TELEPHONE_RATE else []
        self.history = bytes(2 * (len(self.taps) - 1)) if self.taps else b""
        self.ratecv_state = None

    def feed(self, pcm: bytes) -> bytes:
        if self.taps:
            pcm = self._filter(pcm)
        rate = self.rate // self.step
        if rate != TELEPHONE_RATE:
            pcm, self.ratecv_state = audioop.ratecv(pcm, 2, 1, rate, TELEPHONE_RATE, self.ratecv_state)
        return pcm

    def _filter(self, pcm: bytes) -> bytes:
        samples = self.history + audioop.mul(pcm, 2, 0.5)
        length, taps, step = len(samples) // 2, len(self.taps), self.step
        outputs = max(0, -(-(length - taps + 1) // step))  # ceil: outputs whose newest sample we have
        # phases[r][i] is sample r + i*step: strided copies made once per chunk.
        view = memoryview(samples).cast("h")
        phases = [view[r::step].tobytes() for r in range(step)]

        def delayed(k: int) -> bytes:
            """x[n - k] for every output position n = taps-1 + j*step."""
            first = taps - 1 - k
            phase = phases[first % step]
            start = 2 * (first // step)
            return phase[start : start + 2 * outputs]

        total = bytes(2 * outputs)
        for k in range(taps // 2):
            pair = audioop.add(delayed(k), delayed(taps - 1 - k), 2)
            total = audioop.add(total, audioop.mul(pair, 2, self.taps[k]), 2)
        middle = taps // 2
        total = audioop.add(total, audioop.mul(delayed(middle), 2, self.taps[middle]), 2)
        keep_from = outputs * step  # the oldest sample the next output still needs
        self.history = samples[2 * keep_from :]
        return audioop.mul(total, 2, 2.0)


class FrameEncoder:
    """Agent speech (16-bit PCM at `rate`) → exact 160-byte μ-law frames."""

    def __init__(self, rate: int):
        self.downsampler = Downsampler(rate)
        self.odd_byte = b""  # a sample split across two chunks waits here
        self.ulaw = b""  # less than one frame, waiting for more

    def encode(self, pcm: bytes) -> list[bytes]:
        pcm = self.odd_byte + pcm
        whole = len(pcm) & ~1
        self.odd_byte = pcm[whole:]
        self.ulaw += audioop.lin2ulaw(self.downsampler.feed(pcm[:whole]), 2)
        cut = len(self.ulaw) - len(self.ulaw) % FRAME_BYTES
        frames = [self.ulaw[i : i + FRAME_BYTES] for i in range(0, cut, FRAME_BYTES)]
        self.ulaw = self.ulaw[cut:]
        return frames

    def flush(self) -> list[bytes]:
        """The last, partial frame, padded with silence (Vobiz wants whole frames)."""
        rest, self.ulaw = self.ulaw, b""
        return [rest.ljust(FRAME_BYTES, ULAW_SILENCE)] if rest else []


@cache
def chime(frequencies: tuple[float, float], rate: int = 24000) -> bytes:
    """The offline agent's greeting (rising) and goodbye (falling): two soft tones,
    made here at 24 kHz so that every call sends speech-rate audio through the
    whole chain, filter included."""
    samples = array.array("h")
    for frequency, seconds in zip(frequencies, (0.18, 0.30), strict=True):
        count = int(rate * seconds)
        for i in range(count):
            fade = min(1.0, i / (0.01 * rate), (count - i) / (0.05 * rate))
            samples.append(int(8000 * fade * math.sin(2 * math.pi * frequency * i / rate)))
    return samples.tobytes()


# ─────────────────────────────────────────────────────────────────────────────
# The Vobiz protocol (see shared/vobiz-protocol.md): the <Stream> answer, the
# frames Vobiz sends us, and the ones we send back. Pure functions.
# ─────────────────────────────────────────────────────────────────────────────

MAX_FRAME_BYTES = 64 * 1024  # larger frames are ignored (a 20 ms media frame is < 1 KiB)


def stream_xml(media_url: str, status_url: str) -> bytes:
    """The answer that connects the call's audio to our WebSocket, both ways."""
    response = ET.Element("Response")
    stream = ET.SubElement(
        response,
        "Stream",
        bidirectional="true",  # we may send playAudio, checkpoint, clearAudio
        audioTrack="inbound",  # the caller only; "both" ends bidirectional calls
        keepCallAlive="true",  # the call lasts as long as the stream
        contentType="audio/x-mulaw;rate=8000",
        statusCallbackUrl=status_url,
        statusCallbackMethod="POST",
    )
    stream.text = media_url  # the URL is the element's text, not an attribute
    return ET.tostring(response, encoding="utf-8", xml_declaration=True)


def empty_xml() -> bytes:
    return ET.tostring(ET.Element("Response"), encoding="utf-8", xml_declaration=True)


class BadFrame(ValueError):
    """A frame we cannot use. `kind` groups them for the call's log."""

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind


@dataclass(frozen=True)
class Start:
    call_id: str
    stream_id: str
    media_format: MediaFormat


@dataclass(frozen=True)
class Media:
    payload: bytes  # raw caller audio in the stream's MediaFormat


@dataclass(frozen=True)
class PlayedStream:
    name: str


@dataclass(frozen=True)
class ClearedAudio:
    pass


@dataclass(frozen=True)
class Dtmf:
    digit: str


@dataclass(frozen=True)
class Stop:
    pass


Frame = Start | Media | PlayedStream | ClearedAudio | Dtmf | Stop


def parse_frame(message: str | bytes) -> Frame:
    """One WebSocket message from Vobiz → a typed frame, or BadFrame."""
    if len(message) > MAX_FRAME_BYTES:
        raise BadFrame("oversized", f"frame of {len(message)} bytes is over {MAX_FRAME_BYTES}")
    try:
        data = json.loads(message)
    except (ValueError, UnicodeDecodeError) as error:
        raise BadFrame("json", f"frame is not JSON ({error})") from None
    if not isinstance(data, dict):
        raise BadFrame("json", f"frame is a JSON {type(data).__name__}, not an object")
    event = data.get("event")
    if event == "media":
        return Media(_media_payload(data))
    if event == "start":
        return _start(data)
    if event == "playedStream":
        return PlayedStream(_text(data, "name", "playedStream"))
    if event == "clearedAudio":
        return ClearedAudio()
    if event == "dtmf":
        return Dtmf(_dtmf_digit(data))
    if event == "stop":
        return Stop()
    raise BadFrame("event", f"unknown event {event!r}")


def _media_payload(data: dict) -> bytes:
    media = data.get("media")
    payload = media.get("payload") if isinstance(media, dict) else None
    if not isinstance(payload, str) or not payload:
        raise BadFrame("fields", "media frame has no media.payload")
    try:
        return binascii.a2b_base64(payload, strict_mode=True)
    except ValueError as error:  # binascii.Error is one; non-ASCII text raises the plain kind
        raise BadFrame("base64", f"media.payload is not base64 ({error})") from None


def _start(data: dict) -> Start:
    # Current Vobiz nests the ids under "start"; older docs put them at the top.
    nested = data.get("start") if isinstance(data.get("start"), dict) else {}
    call_id = nested.get("callId") or data.get("callId")
    stream_id = nested.get("streamId") or data.get("streamId")
    if not isinstance(call_id, str) or not isinstance(stream_id, str) or not call_id or not stream_id:
        raise BadFrame("fields", "start frame has no callId/streamId")
    return Start(call_id, stream_id, _media_format(nested.get("mediaFormat"), data.get("contentType")))


def _media_format(media_format: object, content_type: object) -> MediaFormat:
    """`start.mediaFormat` {"encoding", "sampleRate"}, or the old flat
    "audio/x-l16;rate=8000" string; we asked for μ-law, so that is the default."""
    if isinstance(media_format, dict):
        encoding, rate = media_format.get("encoding"), media_format.get("sampleRate")
    elif isinstance(content_type, str):
        encoding, _, rate = content_type.partition(";rate=")
    else:
        return MULAW_8K
    try:
        found = MediaFormat(str(encoding).strip().lower(), int(rate))
    except (TypeError, ValueError):
        raise BadFrame("format", f"unreadable media format {media_format or content_type!r}") from None
    if (found.encoding, found.rate) not in (
        ("audio/x-mulaw", 8000),
        ("audio/x-l16", 8000),
        ("audio/x-l16", 16000),
    ):
        raise BadFrame("format", f"unsupported media format {found.encoding} at {found.rate} Hz")
    return found


def _text(data: dict, key: str, event: str) -> str:
    value = data.get(key)
    if not isinstance(value, str):
        raise BadFrame("fields", f"{event} frame has no {key}")
    return value


def _dtmf_digit(data: dict) -> str:
    dtmf = data.get("dtmf")
    digit = dtmf.get("digit") if isinstance(dtmf, dict) else dtmf
    if not isinstance(digit, str):
        raise BadFrame("fields", "dtmf frame has no digit")
    return digit


class Outbound:
    """The frames we send to Vobiz for one stream."""

    def __init__(self, stream_id: str):
        self.stream_id = stream_id
        # playAudio goes out 50 times a second: build it from a fixed prefix and
        # the payload. Base64 never needs JSON escaping, so this is valid JSON.
        head = json.dumps({"event": "playAudio", "streamId": stream_id})[:-1]
        self.play_prefix = head + ', "media": {"contentType": "audio/x-mulaw", "sampleRate": 8000, "payload": "'

    def play_audio(self, frame: bytes) -> str:
        return self.play_prefix + base64.b64encode(frame).decode("ascii") + '"}}'

    def checkpoint(self, name: str) -> str:
        return json.dumps({"event": "checkpoint", "streamId": self.stream_id, "name": name})

    def clear_audio(self) -> str:
        return json.dumps({"event": "clearAudio", "streamId": self.stream_id})

    def stop(self) -> str:
        return json.dumps({"event": "stop", "streamId": self.stream_id})


# Trust. Vobiz signs its webhooks (when the callback has credentials); the media
# WebSocket carries no authentication at all, so the URL we hand out in <Stream>
# is itself the credential: a capability for one call, signed with STREAM_SECRET.

NONCE_MEMORY_S = 300.0  # a signed request replayed within this window is refused


def webhook_signature(auth_token: str, url: str, nonce: str, version: int) -> str:
    """Vobiz's X-Vobiz-Signature-V3 (URL + "." + nonce) or -V2 (URL + nonce):
    base64 of HMAC-SHA256 keyed with the account's auth token. The body is not signed."""
    message = f"{url}.{nonce}" if version == 3 else f"{url}{nonce}"
    digest = hmac.new(auth_token.encode(), message.encode(), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


class WebhookGuard:
    """Checks webhook signatures and remembers recent nonces, so a captured
    request cannot be replayed (the signature covers no timestamp)."""

    def __init__(self, auth_token: str, require: bool):
        self.auth_token = auth_token
        self.require = require
        self.seen: dict[str, float] = {}  # nonce → when; insertion order is time order

    def refusal(self, url: str, headers: Mapping[str, str]) -> str | None:
        """Why this request must be refused, or None if it may pass."""
        if not self.auth_token:
            return None
        for version in (3, 2):
            signature = headers.get(f"X-Vobiz-Signature-V{version}")
            nonce = headers.get(f"X-Vobiz-Signature-V{version}-Nonce")
            if signature and nonce:
                return self._verify(url, signature, nonce, version)
        return "no signature" if self.require else None

    def _verify(self, url: str, signature: str, nonce: str, version: int) -> str | None:
        expected = webhook_signature(self.auth_token, url, nonce, version)
        if not hmac.compare_digest(expected.encode(), signature.encode()):
            return f"wrong V{version} signature"
        now = time.monotonic()
        while self.seen and next(iter(self.seen.values())) < now - NONCE_MEMORY_S:
            self.seen.pop(next(iter(self.seen)))
        if nonce in self.seen:
            return "replayed nonce"
        self.seen[nonce] = now
        return None


STREAM_URL_LIFETIME_S = 60  # the URL must be used this soon after /answer issued it


def stream_token(secret: bytes, call_id: str, expires: int) -> str:
    """A short capability for one call's media URL: the expiry and a truncated MAC."""
    mac = hmac.new(secret, f"{call_id}.{expires}".encode(), hashlib.sha256).digest()[:15]
    return f"{expires}.{base64.urlsafe_b64encode(mac).decode()}"


def stream_token_problem(secret: bytes, call_id: str, token: str, now: float, known_call: bool) -> str | None:
    """Why a media URL is not valid for `call_id`, or None. A call that is already
    known to this process (a reconnect) may use its URL after it expired."""
    expires, _, _ = token.partition(".")
    if not expires.isdigit() or not hmac.compare_digest(stream_token(secret, call_id, int(expires)), token):
        return "bad token"
    if int(expires) < now and not known_call:
        return "expired token"
    return None


# ─────────────────────────────────────────────────────────────────────────────
# The agent: ears, brain and mouth. The call feeds the ears every inbound
# payload; the ears tell the call when the caller starts speaking (so it can
# stop talking) and when a turn is over. A responder turns a turn into
# utterances, streams of PCM, and hands each one to the call's player.
# ─────────────────────────────────────────────────────────────────────────────


@dataclass
class Turn:
    """What the caller said: their audio (16-bit PCM at `rate`) and/or its text.

    `marks` collects when each step of the answer happened (trio.current_time()),
    for the per-turn latency line; `speech_ended` is when the caller went quiet.
    """

    text: str = ""
    audio: bytes = b""
    rate: int = TELEPHONE_RATE
    kind: str = "speech"  # "ears-down": speech-to-text is unreachable; "silence": nobody has spoken for long
    speech_ended: float = 0.0
    marks: dict[str, float] = field(default_factory=dict)

    def mark(self, step: str, at: float | None = None) -> None:
        self.marks.setdefault(step, trio.current_time() if at is None else at)


@dataclass
class Utterance:
    """One piece of agent speech (a sentence, a chime). The player sends a
    checkpoint after it; `heard` turns true when Vobiz says that checkpoint played."""

    label: str
    rate: int
    pcm: AsyncIterator[bytes]
    text: str = ""
    heard: bool = False


Play = Callable[[Utterance], Awaitable[None]]


class Listener(Protocol):
    """What ears report to (the Call)."""

    def speech_started(self, onset: float) -> None: ...

    def turn_ended(self, turn: Turn) -> None: ...


class Ears(Protocol):
    def hear(self, payload: bytes) -> None:
        """Called for every inbound media payload; must never block."""

    async def run(self) -> None:
        """The ears' own task, for ears that need one (a speech-to-text socket)."""


class Responder(Protocol):
    """The brain and mouth of one call: they speak by awaiting `play(utterance)`."""

    async def greet(self, play: Play) -> None: ...

    async def reply(self, turn: Turn, play: Play) -> bool:
        """Answer a turn; True when the conversation is over (the agent hangs up)."""

    async def farewell(self, reason: str, play: Play) -> None: ...


class Agent(Protocol):
    """Makes the ears and the responder for each call."""

    name: str

    def ears(self, media_format: MediaFormat, listener: Listener, log: CallLog) -> Ears: ...

    def responder(self, log: CallLog) -> Responder: ...

    async def aclose(self) -> None: ...


class CallLog(Protocol):
    def __call__(self, level: int, message: str, *args: object, error: str | None = None) -> None: ...


class VoiceActivity:
    """Is this frame speech? Loud enough, and well above the line's noise floor.

    The floor is learnt from the quiet frames (quickly down, slowly up), so a
    noisy line raises the bar and a quiet one lowers it. It also measures how
    long the current run of speech has lasted: short dips inside a word don't
    end it, a longer gap does.
    """

    MIN_THRESHOLD = 300  # rms of 16-bit samples, about -40 dBFS: below this nothing is speech
    ABOVE_FLOOR = 4.0  # speech is 12 dB above the noise floor
    GAP_TOLERANCE_S = 0.10

    def __init__(self) -> None:
        self.noise_floor = 100.0
        self.run_s = 0.0  # voiced time in the current run of speech
        self.quiet_s = 0.0  # quiet time since the last voiced frame
        self.last_voiced = 0.0  # trio time of the last voiced frame

    def voiced(self, pcm: bytes, seconds: float) -> bool:
        loudness = audioop.rms(pcm, 2)
        if loudness > max(self.MIN_THRESHOLD, self.noise_floor * self.ABOVE_FLOOR):
            self.run_s += seconds
            self.quiet_s = 0.0
            self.last_voiced = trio.current_time()
            return True
        self.quiet_s += seconds
        if self.quiet_s > self.GAP_TOLERANCE_S:
            self.run_s = 0.0
        rate = 0.3 if loudness < self.noise_floor else 0.02
        self.noise_floor += rate * (loudness - self.noise_floor)
        return False

    @property
    def onset(self) -> float:
        """When the current run of speech began (near enough: dips are not subtracted)."""
        return self.last_voiced - self.run_s


class EnergyEars:
    """Turn-taking by loudness alone, for the offline agent.

    Speech must last `speech_min_s` before it counts (a click or a cough is not
    speech), and a turn ends after SILENCE_END_S of quiet. The turn's audio is
    kept, with a little from before the onset: first consonants are quiet.
    """

    SILENCE_END_S = 0.60
    PRE_ROLL_S = 0.10
    TAIL_S = 0.10  # keep this much of the closing quiet: words trail off below the threshold
    MAX_TURN_S = 30.0

    def __init__(self, media_format: MediaFormat, listener: Listener, speech_min_s: float, silence_s: float):
        self.format = media_format
        self.listener = listener
        self.speech_min_s = speech_min_s
        self.silence_s = silence_s  # this long without speech: report a "silence" turn, once
        self.silent_for_s = 0.0
        self.vad = VoiceActivity()
        self.speaking = False
        self.heard: deque[bytes] = deque()  # before a turn: pre-roll; during one: the turn
        self.heard_s = 0.0

    def hear(self, payload: bytes) -> None:
        pcm = self.format.to_pcm(payload)
        seconds = len(pcm) / 2 / self.format.rate
        voiced = self.vad.voiced(pcm, seconds)
        self.heard.append(pcm)
        self.heard_s += seconds
        self.silent_for_s = 0.0 if voiced else self.silent_for_s + seconds
        if self.silent_for_s >= self.silence_s > self.silent_for_s - seconds:
            self.listener.turn_ended(Turn(kind="silence"))
        if not self.speaking:
            if not self.vad.run_s:  # nothing started yet: keep only the pre-roll
                while self.heard_s > self.PRE_ROLL_S and len(self.heard) > 1:
                    self.heard_s -= len(self.heard.popleft()) / 2 / self.format.rate
            if self.vad.run_s >= max(self.speech_min_s, FRAME_SECONDS):
                self.speaking = True
                self.listener.speech_started(self.vad.onset)
        elif not voiced and self.vad.quiet_s >= self.SILENCE_END_S or self.heard_s >= self.MAX_TURN_S:
            self._end_turn()

    def _end_turn(self) -> None:
        audio = b"".join(self.heard)
        drop = int(max(0.0, self.vad.quiet_s - self.TAIL_S) * self.format.rate) * 2
        self.speaking = False
        self.heard.clear()
        self.heard_s = 0.0
        turn = Turn(audio=audio[: len(audio) - drop], rate=self.format.rate, speech_ended=self.vad.last_voiced)
        turn.mark("turn_ended")
        self.listener.turn_ended(turn)

    async def run(self) -> None:
        """Energy VAD works inside hear(); it needs no task of its own."""


class EchoResponder:
    """The offline brain and mouth: a chime to greet, each turn played back, and
    after `max_turns` turns (or a long silence) a falling chime and the end of the call."""

    def __init__(self, max_turns: int):
        self.max_turns = max_turns
        self.turns = 0

    async def greet(self, play: Play) -> None:
        await play(Utterance("greeting", 24000, _once(chime((660.0, 880.0))), text="(chime)"))

    async def reply(self, turn: Turn, play: Play) -> bool:
        if turn.kind == "silence":
            return True  # nobody there: say goodbye
        self.turns += 1
        await play(Utterance("echo", turn.rate, _once(turn.audio), text="(the caller's own words)"))
        return self.turns >= self.max_turns

    async def farewell(self, reason: str, play: Play) -> None:
        await play(Utterance("goodbye", 24000, _once(chime((880.0, 660.0))), text="(goodbye chime)"))


async def _once(pcm: bytes) -> AsyncIterator[bytes]:
    yield pcm


class OfflineAgent:
    """The default agent when no provider keys are set: an echo test."""

    name = "offline echo agent"

    def __init__(self, settings: Settings):
        self.speech_min_s = settings.barge_in_min_ms / 1000
        self.max_turns = settings.offline_max_turns
        self.silence_s = settings.offline_silence_s

    def ears(self, media_format: MediaFormat, listener: Listener, log: CallLog) -> Ears:
        return EnergyEars(media_format, listener, self.speech_min_s, self.silence_s)

    def responder(self, log: CallLog) -> Responder:
        return EchoResponder(self.max_turns)

    async def aclose(self) -> None:
        """Nothing to release."""


# The AI agent's ears: Deepgram live transcription over a WebSocket.


def deepgram_url(settings: Settings, media_format: MediaFormat) -> str:
    """The listen URL, telling Deepgram exactly what audio we forward (unchanged)."""
    query = {
        "model": settings.deepgram_model,
        "language": settings.deepgram_language,
        "encoding": "mulaw" if media_format.sample_width == 1 else "linear16",
        "sample_rate": media_format.rate,
        "channels": 1,
        "interim_results": "true",  # words while the caller is still talking: an early barge-in signal
        "endpointing": settings.deepgram_endpointing_ms,  # this much quiet ends a phrase (speech_final)
        "utterance_end_ms": 1000,  # a backstop for when endpointing misses in noise
        "vad_events": "true",  # SpeechStarted
        "smart_format": "true",
    }
    return f"{settings.deepgram_url}?{urlencode(query)}"


class DeepgramEars:
    """Speech-to-text with Deepgram, and turn-taking from what it reports.

    hear() never waits: payloads go into a bounded buffer that a sender task
    drains into Deepgram's socket, so a slow Deepgram can never delay reading
    Vobiz's frames (if the buffer fills, frames are dropped and counted).
    A turn ends at `speech_final`, or at `UtteranceEnd` if finals are pending.
    A possible barge-in (SpeechStarted) is confirmed only once the caller has
    spoken for `barge_in_min_s`, by our own energy measure, or once words arrive.
    """

    BUFFER_FRAMES = 250  # 5 s of 20 ms frames
    KEEPALIVE_S = 4.0  # Deepgram closes a stream that gets no audio for about 10 s
    BACKOFF_S = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
    APOLOGY_AFTER_S = 2.0  # ears down this long: tell the caller rather than leave them in silence

    def __init__(self, settings: Settings, media_format: MediaFormat, listener: Listener, log: CallLog):
        self.url = deepgram_url(settings, media_format)
        self.headers = [("Authorization", f"Token {settings.deepgram_api_key}")]
        self.format = media_format
        self.listener = listener
        self.log = log
        self.barge_in_min_s = settings.barge_in_min_ms / 1000
        self.audio_in, self.audio_out = trio.open_memory_channel[bytes](self.BUFFER_FRAMES)
        self.dropped = 0
        self.vad = VoiceActivity()
        self.maybe_speaking = False  # SpeechStarted came; not yet confirmed
        self.speaking = False  # confirmed: reported to the listener
        self.finals: list[str] = []

    def hear(self, payload: bytes) -> None:
        pcm = self.format.to_pcm(payload)
        self.vad.voiced(pcm, len(pcm) / 2 / self.format.rate)
        if self.maybe_speaking and self.vad.run_s >= self.barge_in_min_s:
            self._confirm_speech()
        try:
            self.audio_in.send_nowait(payload)
        except trio.WouldBlock:
            self.dropped += 1

    def _confirm_speech(self) -> None:
        self.maybe_speaking = False
        if not self.speaking:
            self.speaking = True
            self.listener.speech_started(self.vad.onset)

    def on_message(self, message: dict) -> None:
        kind = message.get("type")
        if kind == "SpeechStarted":
            self.maybe_speaking = True
            if self.vad.run_s >= self.barge_in_min_s:
                self._confirm_speech()
        elif kind == "Results":
            alternatives = message.get("channel", {}).get("alternatives") or [{}]
            text = str(alternatives[0].get("transcript") or "").strip()
            if text:
                self._confirm_speech()  # words are speech, however short
                if message.get("is_final"):
                    self.finals.append(text)
            if message.get("speech_final") and self.finals:
                self._end_turn()
        elif kind == "UtteranceEnd" and self.finals:
            self._end_turn()

    def _end_turn(self) -> None:
        turn = Turn(text=" ".join(self.finals), speech_ended=self.vad.last_voiced)
        turn.mark("stt_final")
        self.finals, self.speaking, self.maybe_speaking = [], False, False
        self.listener.turn_ended(turn)

    async def run(self) -> None:
        """Stay connected for the whole call, reconnecting with backoff."""
        failures, down_since, apologized = 0, None, False
        while True:
            problem = await self._stream(failures)
            now = trio.current_time()
            if problem is None:  # it was up, then closed: a new outage starts now
                failures, down_since, apologized = 0, None, False
                problem = "Deepgram closed the stream"
            down_since = now if down_since is None else down_since
            if not apologized and now - down_since >= self.APOLOGY_AFTER_S:
                apologized = True  # once per outage, so the caller knows why nobody answers
                self.listener.turn_ended(Turn(kind="ears-down"))
            delay = self.BACKOFF_S[min(failures, len(self.BACKOFF_S) - 1)]
            self.log(logging.WARNING, "speech-to-text is down (%s); reconnecting in %.2f s", problem, delay,
                     error="stt")
            failures += 1
            await trio.sleep(delay)

    async def _stream(self, failures: int) -> str | None:
        """One connection to Deepgram; returns why it failed to connect, or None if it was up."""
        problem = None
        try:
            async with trio_websocket.open_websocket_url(
                self.url, extra_headers=self.headers, connect_timeout=5, disconnect_timeout=1
            ) as socket:
                self.log(logging.INFO, "speech-to-text connected%s",
                         f" after {failures} failed attempts" if failures else "")
                try:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._send_audio, socket)
                        await self._receive(socket)
                        nursery.cancel_scope.cancel()
                finally:
                    # The call may be ending (cancelled): still tell Deepgram we're done.
                    with trio.CancelScope(shield=True, deadline=trio.current_time() + 0.5), \
                            suppress(trio_websocket.ConnectionClosed):
                        await socket.send_message(json.dumps({"type": "CloseStream"}))
        except* (trio_websocket.HandshakeError, OSError, trio.TooSlowError) as group:
            problem = _describe(group.exceptions[0])
        return problem

    async def _send_audio(self, socket: trio_websocket.WebSocketConnection) -> None:
        with suppress(trio_websocket.ConnectionClosed):
            while True:
                with trio.move_on_after(self.KEEPALIVE_S):
                    await socket.send_message(await self.audio_out.receive())
                    continue
                await socket.send_message(json.dumps({"type": "KeepAlive"}))

    async def _receive(self, socket: trio_websocket.WebSocketConnection) -> None:
        with suppress(trio_websocket.ConnectionClosed):
            while True:
                message = await socket.get_message()
                try:
                    data = json.loads(message)
                except ValueError:
                    self.log(logging.WARNING, "speech-to-text sent something that is not JSON")
                    continue
                if isinstance(data, dict):
                    self.on_message(data)


def _describe(error: BaseException) -> str:
    """A one-line reason for a failed connection."""
    status = getattr(error, "status_code", None)  # trio_websocket.ConnectionRejected
    return f"refused with HTTP {status}" if status else f"{type(error).__name__} {error}".strip()


# The AI agent's brain: an OpenAI-compatible chat model, streamed.


class ProviderError(Exception):
    """A provider (LLM or TTS) failed: bad status, timeout, or network error."""


# The model may end the call: it calls this tool after saying goodbye.
HANG_UP_TOOL = {"type": "function", "function": {
    "name": "hang_up",
    "description": "End the phone call. Use it only after the caller says goodbye and you have said goodbye too.",
    "parameters": {"type": "object", "properties": {}},
}}


async def chat_tokens(client: httpx.AsyncClient, settings: Settings, messages: list[dict],
                      tools_called: set[str]) -> AsyncIterator[str]:
    """Stream a chat completion: server-sent events, one `data: {...}` line each.
    Text comes out as it arrives; the names of tools the model calls go into `tools_called`."""
    body = {"model": settings.openai_model, "messages": messages, "stream": True, "tools": [HANG_UP_TOOL]}
    try:
        async with client.stream("POST", f"{settings.openai_base_url}/chat/completions", json=body,
                                 headers={"Authorization": f"Bearer {settings.openai_api_key}"}) as response:
            await _check(response, "LLM")
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, comments, keep-alives
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                try:
                    choice = json.loads(data)["choices"][0]
                except (ValueError, KeyError, IndexError, TypeError):
                    continue  # e.g. a usage-only chunk with no choices
                delta = choice.get("delta") or {}
                for call in delta.get("tool_calls") or []:
                    name = (call.get("function") or {}).get("name")
                    if name:  # later chunks of the same call carry only its arguments
                        tools_called.add(name)
                if delta.get("content"):
                    yield delta["content"]
    except httpx.HTTPError as error:
        raise ProviderError(f"LLM: {type(error).__name__} {error}".strip()) from None


async def _check(response: httpx.Response, who: str) -> None:
    if response.status_code != 200:
        detail = (await response.aread())[:200].decode("utf-8", "replace")
        raise ProviderError(f"{who}: HTTP {response.status_code} {_clean(detail)}")


SENTENCE_ENDS = ".!?"
CLAUSE_ENDS = ",;:"
FIRST_PIECE_MIN_CHARS = 4  # "Sure," can go to TTS at once; "Dr." cannot
SENTENCE_MIN_CHARS = 20  # later pieces: whole sentences, not fragments
ABBREVIATIONS = {"dr", "mr", "mrs", "ms", "st", "jr", "sr", "prof", "vs", "etc", "e.g", "i.e", "no"}


def speakable_end(text: str, first: bool) -> int | None:
    """Where the first piece ready for speech ends in `text`, or None if it isn't complete.

    The first piece of a reply may end at a comma: the caller hears the agent
    start a few hundred milliseconds sooner. After that, whole sentences.
    """
    marks = SENTENCE_ENDS + CLAUSE_ENDS if first else SENTENCE_ENDS
    shortest = FIRST_PIECE_MIN_CHARS if first else SENTENCE_MIN_CHARS
    for i, char in enumerate(text):
        if char == "\n" and text[:i].strip():
            return i + 1
        if char in marks and i + 1 < len(text) and text[i + 1].isspace():
            piece = text[: i + 1].strip()
            last_word = piece.rsplit(None, 1)[-1].rstrip(".").lower()
            if len(piece) >= shortest and last_word not in ABBREVIATIONS:
                return i + 1
    return None


async def speakable_pieces(tokens: AsyncIterator[str]) -> AsyncIterator[str]:
    """Tokens → pieces of text ready to speak, each as soon as it is complete."""
    pending, first = "", True
    async for token in tokens:
        pending += token
        while (end := speakable_end(pending, first)) is not None:
            yield pending[:end].strip()
            pending, first = pending[end:], False
    if pending.strip():
        yield pending.strip()


# The AI agent's mouth: OpenAI text-to-speech, streamed as raw 24 kHz PCM.

TTS_RATE = 24000


async def speech_pcm(client: httpx.AsyncClient, settings: Settings, text: str) -> AsyncIterator[bytes]:
    body = {"model": settings.tts_model, "voice": settings.tts_voice, "input": text, "response_format": "pcm"}
    try:
        async with client.stream("POST", f"{settings.openai_base_url}/audio/speech", json=body,
                                 headers={"Authorization": f"Bearer {settings.openai_api_key}"}) as response:
            await _check(response, "TTS")
            async for chunk in response.aiter_bytes():
                yield chunk  # any size: the player carries an odd byte over to the next chunk
    except httpx.HTTPError as error:
        raise ProviderError(f"TTS: {type(error).__name__} {error}".strip()) from None


@cache
def trouble_tone(rate: int = TTS_RATE) -> bytes:
    """Two falling tones: what the caller hears when the voice itself fails."""
    samples = array.array("h")
    for frequency in (480.0, 360.0):
        count = int(rate * 0.2)
        for i in range(count):
            fade = min(1.0, i / (0.01 * rate), (count - i) / (0.03 * rate))
            samples.append(int(6000 * fade * math.sin(2 * math.pi * frequency * i / rate)))
    return samples.tobytes()


LLM_APOLOGY = "Sorry, I'm having trouble thinking right now. Could you say that again?"
EARS_APOLOGY = "Sorry, I'm having trouble hearing you. Please hold on a moment."
FAREWELL = "Sorry, I have to end our call now. Goodbye!"
INTERRUPTED = "[the caller interrupted]"


class AIResponder:
    """One call's conversation with the language model, spoken sentence by sentence.

    A reply is three things at once, all inside the call's reply scope: the
    LLM stream is cut into sentences; each sentence's TTS request starts as soon
    as it is ready (one sentence ahead of the player at most); the player plays
    them in order. Cancelling the scope closes every HTTP stream at once.

    History keeps only what the caller heard: an assistant turn is the list of
    its utterances, and its text is read (heard ones only) when the next request
    is built, after Vobiz has acknowledged or voided each checkpoint.
    """

    PREFETCH = 1  # sentences synthesized ahead of the one playing

    def __init__(self, settings: Settings, client: httpx.AsyncClient, log: CallLog):
        self.settings = settings
        self.client = client
        self.log = log
        self.history: list[tuple[str, str | list[Utterance]]] = []
        self.tools_called: set[str] = set()

    async def greet(self, play: Play) -> None:
        await self._speak("greeting", self.settings.greeting, play, Turn())

    async def reply(self, turn: Turn, play: Play) -> bool:
        if turn.kind == "ears-down":
            await self._speak("apology", EARS_APOLOGY, play, turn)
            return False
        messages = self._conversation(turn.text)
        async with trio.open_nursery() as nursery:
            ready_in, ready_out = trio.open_memory_channel[Utterance](self.PREFETCH)
            nursery.start_soon(self._think, messages, turn, ready_in, nursery)
            async for utterance in ready_out:
                await play(utterance)
        return "hang_up" in self.tools_called

    async def farewell(self, reason: str, play: Play) -> None:
        if reason != "agent":  # the model said its own goodbye before hanging up
            await self._speak("goodbye", FAREWELL, play, Turn())

    async def _speak(self, label: str, text: str, play: Play, turn: Turn) -> None:
        """Fixed words (the greeting, an apology): synthesized and played."""
        spoken: list[Utterance] = []
        self.history.append(("assistant", spoken))
        async with trio.open_nursery() as nursery:
            await play(self._utterance(text, turn, nursery, spoken, label))

    def _conversation(self, text: str) -> list[dict]:
        # The caller went on talking before hearing any of the last reply:
        # it was one turn with a pause in it, so answer the whole of it.
        if len(self.history) >= 2 and self.history[-2][0] == "user":
            last_reply = self.history[-1][1]
            if not any(utterance.heard for utterance in last_reply):
                self.history.pop()
                text = f"{self.history.pop()[1]} {text}"
        self.history.append(("user", text))
        messages = [{"role": "system", "content": self.settings.system_prompt}]
        for role, content in self.history:
            messages.append({"role": role, "content": content if role == "user" else _heard_text(content)})
        return messages

    async def _think(self, messages: list[dict], turn: Turn, ready: trio.MemorySendChannel[Utterance],
                     nursery: trio.Nursery) -> None:
        spoken: list[Utterance] = []
        self.history.append(("assistant", spoken))
        async with ready:
            try:
                tokens = _marking(chat_tokens(self.client, self.settings, messages, self.tools_called), turn)
                async with aclosing(speakable_pieces(tokens)) as pieces:
                    async for piece in pieces:
                        turn.mark("first_sentence")
                        await ready.send(self._utterance(piece, turn, nursery, spoken))
                if not spoken and "hang_up" not in self.tools_called:
                    raise ProviderError("LLM: the reply was empty")
            except ProviderError as error:
                self.log(logging.WARNING, "%s", error, error="llm")
                if not spoken:  # never leave the caller in silence
                    await ready.send(self._utterance(LLM_APOLOGY, turn, nursery, spoken, "apology"))

    def _utterance(self, text: str, turn: Turn, nursery: trio.Nursery, spoken: list[Utterance],
                   label: str = "sentence") -> Utterance:
        """Start synthesizing `text` now; the utterance plays its audio as it arrives."""
        pcm_in, pcm_out = trio.open_memory_channel[bytes](math.inf)
        nursery.start_soon(self._synthesize, text, turn, pcm_in)
        utterance = Utterance(label, TTS_RATE, pcm_out, text=text)
        spoken.append(utterance)
        return utterance

    async def _synthesize(self, text: str, turn: Turn, pcm: trio.MemorySendChannel[bytes]) -> None:
        async with pcm:
            try:
                async with aclosing(speech_pcm(self.client, self.settings, text)) as chunks:
                    async for chunk in chunks:
                        turn.mark("tts_first_byte")
                        pcm.send_nowait(chunk)
            except ProviderError as error:
                self.log(logging.WARNING, "%s", error, error="tts")
                pcm.send_nowait(trouble_tone())


async def _marking(tokens: AsyncIterator[str], turn: Turn) -> AsyncIterator[str]:
    async for token in tokens:
        turn.mark("llm_first_token")
        yield token


def _heard_text(utterances: list[Utterance]) -> str:
    """What the caller heard of a reply, marked if they cut it short."""
    heard = [utterance.text for utterance in utterances if utterance.heard]
    text = " ".join(heard)
    return text if len(heard) == len(utterances) else f"{text} {INTERRUPTED}".strip()


class AIAgent:
    """Deepgram ears, an OpenAI-compatible brain, OpenAI TTS for a mouth."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.name = f"AI agent: Deepgram {settings.deepgram_model} → {settings.openai_model} → {settings.tts_model}"
        # One client for the process: its connection pool keeps TLS sessions warm between turns.
        # Sized to the calls: each may stream one LLM reply and two sentences of speech at once
        # (httpx's default of 100, shared, makes the 34th call's speech wait for a connection),
        # and keeps that many warm (the default keeps 20: the rest redo TCP and TLS every turn).
        streams = (1 + 1 + AIResponder.PREFETCH) * settings.max_calls
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(settings.openai_timeout_s),
                                        limits=httpx.Limits(max_connections=streams,
                                                            max_keepalive_connections=streams))

    def ears(self, media_format: MediaFormat, listener: Listener, log: CallLog) -> Ears:
        return DeepgramEars(self.settings, media_format, listener, log)

    def responder(self, log: CallLog) -> Responder:
        return AIResponder(self.settings, self.client, log)

    async def aclose(self) -> None:
        await self.client.aclose()


# ─────────────────────────────────────────────────────────────────────────────
# The call: one WebSocket from Vobiz, one nursery. The inbound task reads
# frames and feeds the ears; the conversation task greets and replies. Each
# reply runs in a cancel scope, so barge-in is one cancel(): whatever the reply
# was doing (thinking, fetching speech, pacing frames) stops at once. When the
# socket closes the nursery is cancelled and every task of the call ends with it.
# ─────────────────────────────────────────────────────────────────────────────


class Socket(Protocol):
    async def receive(self) -> str | bytes: ...

    async def send(self, data: str) -> None: ...


class Call:
    # Keep at least 80 ms queued at Vobiz: enough to ride out network jitter.
    # When our own wake-ups come late (a busy event loop), the lead grows to
    # cover that lateness, up to LEAD_MAX_S, and shrinks back (halving its
    # excess every LEAD_HALF_LIFE_S) once they are on time again. A barge-in
    # flushes whatever is queued with one clearAudio, so a larger lead does
    # not mean the agent talks over the caller for longer.
    LEAD_S = 0.08
    LEAD_MAX_S = 0.40
    LEAD_HALF_LIFE_S = 1.0
    LEAD_SHRINK = 0.5 ** (FRAME_SECONDS / LEAD_HALF_LIFE_S)  # per frame sent
    CLEARED_TIMEOUT_S = 1.0  # clearedAudio can be lost: never wait longer than this
    BAD_FRAMES_LOGGED = 3  # per kind; the rest are counted in the call's last line

    FAREWELL_ACK_TIMEOUT_S = 5.0  # how long a goodbye may take to play before we stop the stream

    def __init__(self, socket: Socket, switchboard: Switchboard, call_id: str):
        self.socket = socket
        self.switchboard = switchboard
        self.agent = switchboard.agent
        self.call_id = call_id  # the CallUUID this socket's URL was issued for
        self.label = call_id
        self.responder: Responder | None = None  # the conversation, chosen at `start`
        self.resumed = False  # a reconnect of a call whose conversation goes on
        self.start: Start | None = None
        self.outbound: Outbound | None = None
        self.ears: Ears | None = None
        self.media_flowing = trio.Event()
        self.cleared = trio.Event()  # unset between our clearAudio and Vobiz's clearedAudio
        self.cleared.set()
        self.reply_scope: trio.CancelScope | None = None
        self.play_clock = 0.0  # when Vobiz will have played everything we sent
        self.lead = self.LEAD_S  # how far ahead of Vobiz's playout we send
        self.caller_audio_s = 0.0  # seconds of caller audio read so far, and the earliest
        self.caller_audio_origin = math.inf  # time it could have started: read on time, s - origin = now
        self.turn: Turn | None = None  # the turn being answered, for its latency marks
        self.unheard: dict[str, tuple[Utterance, Turn | None, int]] = {}  # checkpoint → (utterance, turn, frames)
        self.acked = trio.Event()  # set (and renewed) whenever a checkpoint is acknowledged
        self.turns_in, self.turns_out = trio.open_memory_channel[Turn](4)
        self.bad_frames: Counter[str] = Counter()
        self.counts: Counter[str] = Counter()
        self.ended_by = "hang-up"
        self.began = self.last_frame = trio.current_time()

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as self.nursery:
                self.nursery.start_soon(self.listen_to_vobiz, name=f"call {self.label} inbound")
                self.nursery.start_soon(self.converse, name=f"call {self.label} conversation")
                self.nursery.start_soon(self.watch_for_silence, name=f"call {self.label} idle watch")
        finally:
            self._log_end()
            self.switchboard.metrics.count("calls_total", ended=self.ended_by)

    # Inbound: everything Vobiz sends. Nothing in here waits for anything but
    # the next frame, so acks are seen even while the agent is busy talking.

    async def listen_to_vobiz(self) -> None:
        try:
            while True:
                message = await self.socket.receive()
                self.last_frame = trio.current_time()
                try:
                    if self._handle(parse_frame(message)):
                        break
                except BadFrame as bad:
                    self._complain(bad.kind, str(bad))
        except ClientDisconnectedError:
            pass  # Quart 0.23's way of saying the caller hung up
        self.nursery.cancel_scope.cancel()

    def _handle(self, frame: Frame) -> bool:
        """Act on one frame; True means the call is over."""
        if isinstance(frame, Media):
            self._hear(frame.payload)
        elif isinstance(frame, Start):
            self._begin(frame)
        elif isinstance(frame, PlayedStream):
            utterance, turn, frames = self.unheard.pop(frame.name, (None, None, 0))
            if utterance is not None:
                utterance.heard = True
                self.acked.set()
                self.acked = trio.Event()
            if turn is not None:  # it began playing `frames` frames before this ack
                turn.mark("first_frame_heard", trio.current_time() - frames * FRAME_SECONDS)
        elif isinstance(frame, ClearedAudio):
            self.cleared.set()
        elif isinstance(frame, Dtmf):
            self.log(logging.INFO, "caller pressed %s", _clean(frame.digit))
        elif isinstance(frame, Stop):
            self.ended_by = "stop frame"
            return True
        return False

    async def watch_for_silence(self) -> None:
        """End a call whose socket stays open but carries nothing: a stuck peer."""
        timeout = self.switchboard.settings.idle_timeout_s
        while trio.current_time() < self.last_frame + timeout:
            await trio.sleep_until(self.last_frame + timeout)
        self.ended_by = "idle timeout"
        self.log(logging.WARNING, "no frame from Vobiz for %.0f s: ending the call", timeout)
        self.nursery.cancel_scope.cancel()

    def _begin(self, start: Start) -> None:
        if self.start is not None:
            raise BadFrame("start", f"second start (streamId {_clean(start.stream_id)}) ignored")
        if start.call_id != self.call_id:
            self.log(logging.WARNING, "start is for call %s, not the call this URL was issued for: closing",
                     _clean(start.call_id))
            self.switchboard.metrics.count("calls_refused_total", reason="wrong call")
            self.ended_by = "refused"
            self.nursery.cancel_scope.cancel()
            return
        self.start = start
        # The responder outlives this Call in the resume window: give it a log that does not hold the Call.
        detached_log = partial(log_for_call, self.label, self.switchboard.metrics)
        self.responder, self.resumed = self.switchboard.conversation(start.call_id, detached_log)
        self.outbound = Outbound(start.stream_id)
        self.caller_bytes_per_s = start.media_format.rate * start.media_format.sample_width
        self.ears = self.agent.ears(start.media_format, self, self.log)
        self.nursery.start_soon(self.ears.run, name=f"call {self.label} ears")
        self.log(logging.INFO, "stream %s %s, caller audio %s at %d Hz", _clean(start.stream_id),
                 "reconnected: the conversation goes on" if self.resumed else "started",
                 start.media_format.encoding, start.media_format.rate)

    def _hear(self, payload: bytes) -> None:
        if self.ears is None:
            raise BadFrame("early", "media before start")
        if len(payload) % self.start.media_format.sample_width:
            raise BadFrame("length", f"media payload of {len(payload)} bytes is not whole samples")
        self.ears.hear(payload)
        self.media_flowing.set()
        self.caller_audio_s += len(payload) / self.caller_bytes_per_s
        self.caller_audio_origin = min(self.caller_audio_origin, self.last_frame - self.caller_audio_s)

    def behind_s(self) -> float:
        """How far behind real time we read the caller's audio (Vobiz sends it in real
        time, so the best time we ever read it at is the on-time mark)."""
        if not self.caller_audio_s:
            return 0.0
        return self.last_frame - self.caller_audio_s - self.caller_audio_origin

    # What the ears report (the Listener side of the seam).

    def speech_started(self, onset: float) -> None:
        self.log(logging.DEBUG, "caller started speaking")
        if trio.current_time() < self.play_clock:
            self.barge_in(onset)
        elif self.reply_scope is not None:
            # Still thinking, nothing heard yet: the caller had only paused. Drop
            # the reply; the responder hears the rest as part of the same turn.
            self.log(logging.INFO, "the caller went on talking: reply dropped before it was heard")
            self.reply_scope.cancel()

    def turn_ended(self, turn: Turn) -> None:
        self.log(logging.DEBUG, "turn ended (%s)", turn.kind)
        try:
            self.turns_in.send_nowait(turn)
        except trio.WouldBlock:
            self.log(logging.WARNING, "dropped a turn: too many are waiting for a reply")

    def barge_in(self, onset: float) -> None:
        """The caller talks over the agent: stop the reply and flush Vobiz's queue.

        Whatever was queued at Vobiz is dropped unplayed, so its checkpoints
        will never be acked: those utterances count as not heard. New audio
        waits for clearedAudio, or it would race the flush and lose its start.
        """
        self.counts["barge-ins"] += 1
        self.switchboard.metrics.count("barge_ins_total")
        if self.reply_scope is not None:
            self.reply_scope.cancel()
        self.unheard.clear()
        self.play_clock = trio.current_time()
        self.cleared = trio.Event()
        if self.turn is not None:
            self.turn.mark("barge_in_onset", onset)
        self.nursery.start_soon(self._clear_audio, self.turn)

    async def _clear_audio(self, turn: Turn | None) -> None:
        await self.send(self.outbound.clear_audio())
        if turn is not None:
            turn.mark("clear_audio_sent")
        self.log(logging.INFO, "barge-in: the caller spoke over the agent, clearAudio sent")

    # The conversation: greet, then answer turns one at a time.

    async def converse(self) -> None:
        # Audio sent before the caller's audio flows is lost on real calls.
        await self.media_flowing.wait()
        if not self.resumed:
            await self.respond(self.responder.greet)
        async for turn in self.turns_out:
            if turn.kind == "farewell":
                await self._say_goodbye(turn.text)
                return
            self.turn = turn
            if turn.kind == "speech":
                self.counts["turns"] += 1
                self.switchboard.metrics.count("turns_total")
            finished = await self.respond(partial(self.responder.reply, turn))
            self._log_latency(turn)
            self.turn = None
            if finished:
                self.log(logging.INFO, "the agent ends the call")
                self.end("agent")

    def end(self, reason: str) -> None:
        """End the call from our side: stop talking, say goodbye, then `stop` the stream."""
        if self.ended_by == "hang-up":
            self.ended_by = reason
            if self.reply_scope is not None:
                self.reply_scope.cancel()
            with suppress(trio.WouldBlock, trio.ClosedResourceError):
                self.turns_in.send_nowait(Turn(kind="farewell", text=reason))

    async def _say_goodbye(self, reason: str) -> None:
        """Play the farewell, wait (a little) until Vobiz has played everything, then stop:
        a `stop` drops whatever is still queued, last words included."""
        if self.responder is not None and self.outbound is not None:
            await self.respond(partial(self.responder.farewell, reason))
            with trio.move_on_after(self.FAREWELL_ACK_TIMEOUT_S):
                while self.unheard:
                    await self.acked.wait()
            await self.send(self.outbound.stop())
        self.nursery.cancel_scope.cancel()

    async def respond(self, responder: Callable[[Play], Awaitable[object]], play: Play | None = None) -> object:
        """Run one reply in a cancel scope: barge-in (or hang-up) stops all of it at once.
        Returns what the responder returned, or None if it was cut off."""
        result = None
        with trio.CancelScope() as self.reply_scope:
            result = await responder(play or self.play)
        self.reply_scope = None
        return result

    async def play(self, utterance: Utterance) -> None:
        """Send one utterance as paced playAudio frames, then a checkpoint."""
        self.counts["utterances"] += 1
        name = f"{utterance.label}-{self.counts['utterances']}"  # unique within the call
        turn, frames = self.turn, 0
        encoder = FrameEncoder(utterance.rate)
        async with aclosing(utterance.pcm) as chunks:
            async for pcm in chunks:
                for frame in encoder.encode(pcm):
                    await self.send_frame(frame)
                    frames += 1
        for frame in encoder.flush():
            await self.send_frame(frame)
            frames += 1
        self.unheard[name] = (utterance, turn, frames)
        await self.send(self.outbound.checkpoint(name))

    async def send_frame(self, frame: bytes) -> None:
        if not self.cleared.is_set():
            with trio.move_on_after(self.CLEARED_TIMEOUT_S) as waited:
                await self.cleared.wait()
            if waited.cancelled_caught:
                self.log(logging.WARNING, "no clearedAudio after %.1f s; speaking anyway", self.CLEARED_TIMEOUT_S)
                self.cleared.set()
        # Real time with a lead: Vobiz queues what we send, and everything
        # queued is what a barge-in must flush, so don't send in a burst.
        now = trio.current_time()
        starts = max(self.play_clock, now)
        self.play_clock = starts + FRAME_SECONDS
        await self.send(self.outbound.play_audio(frame))
        self._follow_lateness(trio.current_time() - now)  # a send is near instant, unless the loop stalls
        if self.turn is not None and "first_frame_sent" not in self.turn.marks:
            self.turn.mark("first_frame_sent")
            self.turn.mark("first_frame_due", starts)  # when it should play: the estimate, until acked
        self.counts["frames"] += 1
        await self._pace()

    async def _pace(self) -> None:
        """Wait until Vobiz has only `lead` left to play. Two frames go out per
        wake-up (half the timers of one per frame), and how late the wake-up
        comes sets the lead: the next stall of that size is covered."""
        self.lead = self.LEAD_S + (self.lead - self.LEAD_S) * self.LEAD_SHRINK
        wake = self.play_clock - self.lead
        if wake - trio.current_time() < 1.5 * FRAME_SECONDS:
            return  # less than lead + 1.5 frames queued: send the next frame now
        await trio.sleep_until(wake)
        self._follow_lateness(trio.current_time() - wake)

    def _follow_lateness(self, late: float) -> None:
        """A stall delays the wake-up due in it by some of its length: cover half as much again."""
        self.lead = min(self.LEAD_MAX_S, max(self.lead, self.LEAD_S + 1.5 * late))

    async def send(self, message: str) -> None:
        try:
            await self.socket.send(message)
        except ClientDisconnectedError:
            self.nursery.cancel_scope.cancel()

    # The call's log: every line names the call.

    def log(self, level: int, message: str, *args: object, error: str | None = None) -> None:
        """A line in the call's log; `error` also counts it in /metrics under that kind."""
        log_for_call(self.label, self.switchboard.metrics, level, message, *args, error=error)

    def _complain(self, kind: str, detail: str) -> None:
        self.bad_frames[kind] += 1
        self.switchboard.metrics.count("errors_total", kind=f"bad_frame_{kind}")
        if self.bad_frames[kind] <= self.BAD_FRAMES_LOGGED:
            self.log(logging.WARNING, "ignored a bad frame: %s", detail)

    def _log_latency(self, turn: Turn) -> None:
        """One line per turn: how long each step took, from the end of the caller's speech."""
        if turn.kind != "speech" or not turn.speech_ended:
            return
        marks = dict(turn.marks)
        heard = marks.pop("first_frame_heard", None)
        due = marks.pop("first_frame_due", None)
        onset, cleared = marks.pop("barge_in_onset", None), marks.pop("clear_audio_sent", None)
        steps = {step: round((at - turn.speech_ended) * 1000) for step, at in marks.items()}
        if heard or due:
            steps["first_frame_heard"] = round(((heard or due) - turn.speech_ended) * 1000)
            steps["heard_is_estimate"] = heard is None
        if onset and cleared:
            steps["barge_in"] = round((cleared - onset) * 1000)
        if heard or due:
            self.switchboard.metrics.observe_turn_latency((heard or due) - turn.speech_ended)
        text = " ".join(f"{step}={value}ms" for step, value in steps.items() if not isinstance(value, bool))
        log.info("call %s: turn %d latency: %s%s", self.label, self.counts["turns"], text,
                 " (heard: estimated)" if steps.get("heard_is_estimate") else "",
                 extra={"fields": {"call": self.label, "turn": self.counts["turns"], **steps}})

    def _log_end(self) -> None:
        bad = ", ".join(f"{kind} ×{n}" for kind, n in self.bad_frames.items())
        dropped = getattr(self.ears, "dropped", 0)
        self.log(logging.INFO, "ended by %s after %.1f s: %d turns, %d barge-ins, %d frames sent%s%s",
                 self.ended_by, trio.current_time() - self.began, self.counts["turns"],
                 self.counts["barge-ins"], self.counts["frames"], f"; bad frames: {bad}" if bad else "",
                 f"; {dropped} frames dropped on the way to speech-to-text" if dropped else "")


def log_for_call(label: str, metrics: Metrics, level: int, message: str, *args: object,
                 error: str | None = None) -> None:
    log.log(level, "call %s: " + message, label, *args)
    if error:
        metrics.count("errors_total", kind=error)


def _clean(value: object, limit: int = 120) -> str:
    """A value from the network, made safe for one log line."""
    return str(value)[:limit].encode("unicode_escape").decode("ascii")


# ─────────────────────────────────────────────────────────────────────────────
# The web app: Vobiz's webhooks and the media WebSocket, on one Quart-Trio app.
# ─────────────────────────────────────────────────────────────────────────────


class Metrics:
    """Counters and the turn-latency histogram, served by /metrics in Prometheus' text format."""

    LATENCY_BUCKETS_S = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0)

    def __init__(self) -> None:
        self.counters: Counter[tuple[str, tuple[tuple[str, str], ...]]] = Counter()
        self.gauges: dict[str, float] = {}
        self.latency_buckets = [0] * len(self.LATENCY_BUCKETS_S)
        self.latency_sum = 0.0
        self.latency_count = 0

    def count(self, name: str, **labels: str) -> None:
        self.counters[(name, tuple(sorted(labels.items())))] += 1

    def set_gauge(self, name: str, value: float) -> None:
        self.gauges[name] = value

    def observe_turn_latency(self, seconds: float) -> None:
        for i, bound in enumerate(self.LATENCY_BUCKETS_S):
            if seconds <= bound:
                self.latency_buckets[i] += 1
        self.latency_sum += seconds
        self.latency_count += 1

    def render(self, live_calls: int, draining: bool) -> str:
        lines = [
            "# TYPE vobiz_agent_calls_live gauge", f"vobiz_agent_calls_live {live_calls}",
            "# TYPE vobiz_agent_draining gauge", f"vobiz_agent_draining {int(draining)}",
        ]
        for name, value in sorted(self.gauges.items()):
            lines += [f"# TYPE vobiz_agent_{name} gauge", f"vobiz_agent_{name} {value:.6g}"]
        for name in sorted({name for name, _ in self.counters}):
            lines.append(f"# TYPE vobiz_agent_{name} counter")
            for (each, labels), value in sorted(self.counters.items()):
                if each == name:
                    label_text = ",".join(f'{key}="{_label(value)}"' for key, value in labels)
                    lines.append(f"vobiz_agent_{name}{{{label_text}}} {value}" if labels else
                                 f"vobiz_agent_{name} {value}")
        lines.append("# TYPE vobiz_agent_turn_latency_seconds histogram")
        for bound, count in zip(self.LATENCY_BUCKETS_S, self.latency_buckets, strict=True):
            lines.append(f'vobiz_agent_turn_latency_seconds_bucket{{le="{bound}"}} {count}')
        lines += [f'vobiz_agent_turn_latency_seconds_bucket{{le="+Inf"}} {self.latency_count}',
                  f"vobiz_agent_turn_latency_seconds_sum {self.latency_sum:.3f}",
                  f"vobiz_agent_turn_latency_seconds_count {self.latency_count}"]
        return "\n".join(lines) + "\n"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")


class LoadMonitor:
    """How loaded this process is, measured: what admission decides on, and /health shows.

    Past one core's capacity every live call degrades at once (gappy audio,
    late replies), so a new call must be refused *before* that. Three measures:
    - lag: a tiny task asks to wake every TICK_S and notes how late it woke.
      Every call's timers and frames wait in the same queue, so they are that
      late too. The figure is the worst of the last WINDOW_S.
    - CPU: the process's CPU time (time.process_time) over the last WINDOW_S,
      as a share of one core. A new call is admitted only if the CPU with
      it stays under the threshold, counting every live call at the cost
      per call last measured while most calls were settled (a call that
      began within the window has cost only part of it): so a burst of new
      calls does not look cheap. Until measured, MAX_CALLS calls fill a core.
    - behind: how far the calls are behind in reading their callers' audio
      (Vobiz sends it in real time, so a backlog means we are not keeping up);
      the median call's, so that one caller's bad network does not count.
    """

    TICK_S = 0.05
    WINDOW_S = 3.0
    LEARN_FROM_CALLS = 5

    def __init__(self, settings: Settings, calls: set[Call], metrics: Metrics):
        self.settings, self.calls, self.metrics = settings, calls, metrics
        self.wakes: deque[tuple[float, float]] = deque()  # (when, how late), the last WINDOW_S
        self.cpu_samples: deque[tuple[float, float]] = deque()  # (when, process CPU seconds)
        self.lag_s = self.cpu = self.behind_s = 0.0
        self.cpu_per_call = 1 / settings.max_calls  # until measured: MAX_CALLS calls fill a core
        self.ended: deque[tuple[float, float]] = deque()  # (began, ended) of calls that ended in the window
        self.scope = trio.CancelScope()

    async def run(self) -> None:
        with self.scope:
            next_sample = trio.current_time()
            while True:
                due = trio.current_time() + self.TICK_S
                await trio.sleep_until(due)
                now = trio.current_time()
                self.wakes.append((now, now - due))
                if now >= next_sample:
                    self.sample(now)
                    next_sample = now + 0.5

    def sample(self, now: float) -> None:
        """Bring the figures up to date (twice a second) and publish them as gauges."""
        while self.wakes and self.wakes[0][0] < now - self.WINDOW_S:
            self.wakes.popleft()
        self.lag_s = max((late for _, late in self.wakes), default=0.0)
        self.cpu_samples.append((now, time.process_time()))
        while self.cpu_samples[0][0] < now - self.WINDOW_S:
            self.cpu_samples.popleft()
        (began, cpu_then), (_, cpu_now) = self.cpu_samples[0], self.cpu_samples[-1]
        self.cpu = (cpu_now - cpu_then) / (now - began) if now > began else 0.0
        # How many calls the window's CPU was spent on: one live for a second of it counts 1/3.
        while self.ended and self.ended[0][1] < now - self.WINDOW_S:
            self.ended.popleft()
        start = now - self.WINDOW_S
        live = sum(now - max(call.began, start) for call in self.calls) / self.WINDOW_S
        gone = sum(end - max(began, start) for began, end in self.ended) / self.WINDOW_S
        new = sum(call.began > start for call in self.calls)
        # Learnt only from a window of settled calls: new ones cost more at first, a window of
        # calls that have gone is mostly idle time, and a handful would each carry the process's
        # own upkeep.
        if live >= self.LEARN_FROM_CALLS and new <= len(self.calls) / 4 and gone <= live / 4:
            self.cpu_per_call = self.cpu / (live + gone)
        behind = sorted(call.behind_s() for call in self.calls)
        self.behind_s = behind[len(behind) // 2] if behind else 0.0
        self.metrics.set_gauge("event_loop_lag_seconds", self.lag_s)
        self.metrics.set_gauge("cpu_share", self.cpu)
        self.metrics.set_gauge("cpu_share_per_call", self.cpu_per_call)
        self.metrics.set_gauge("inbound_behind_seconds", self.behind_s)

    def call_ended(self, call: Call) -> None:
        self.ended.append((call.began, trio.current_time()))

    def overload(self) -> str | None:
        """Why the measured load leaves no room for one more call, or None."""
        settings, calls = self.settings, len(self.calls)
        if self.lag_s * 1000 > settings.load_max_lag_ms:
            return "overloaded: event loop late"
        # The CPU now, or what the live calls will cost once none of them is new, plus one more call.
        if max(self.cpu, self.cpu_per_call * calls) + self.cpu_per_call > settings.load_max_cpu:
            return "overloaded: CPU"
        if self.behind_s * 1000 > settings.load_max_behind_ms:
            return "overloaded: calls behind"
        return None

    def figures(self) -> dict[str, float]:
        return {"event_loop_lag_ms": round(self.lag_s * 1000, 1), "cpu": round(self.cpu, 3),
                "cpu_per_call": round(self.cpu_per_call, 4),
                "inbound_behind_ms": round(self.behind_s * 1000, 1)}


class Switchboard:
    """What the calls of one process share: the agent, the live calls, their
    conversations (kept a while after a socket closes, so a Vobiz reconnect
    with the same callId goes on where it stopped), the counters, and whether
    we are draining for shutdown."""

    RESUME_WINDOW_S = 120.0

    def __init__(self, settings: Settings, agent: Agent):
        self.settings, self.agent = settings, agent
        self.calls: set[Call] = set()
        self.emptied = trio.Event()
        self.emptied.set()
        self.conversations: dict[str, tuple[Responder, float]] = {}  # callId → (responder, last seen)
        self.hung_up: set[str] = set()  # live calls Vobiz has told us are over
        self.metrics = Metrics()
        self.load = LoadMonitor(settings, self.calls, self.metrics)
        self.draining = False

    def __len__(self) -> int:
        return len(self.calls)

    def add(self, call: Call) -> None:
        if not self.calls:
            self.emptied = trio.Event()
        self.calls.add(call)

    def remove(self, call: Call) -> None:
        self.calls.discard(call)
        self.load.call_ended(call)
        now = trio.current_time()
        self._forget_stale(now)
        # Only a socket that closed on us may come back; a call we ended, that a stop ended,
        # or that Vobiz already said is over (its hangup webhook may come first) may not.
        over = call.call_id in self.hung_up
        self.hung_up.discard(call.call_id)
        if call.responder is not None and call.ended_by == "hang-up" and not over:
            self.conversations.pop(call.call_id, None)  # re-inserted last: the dict stays in time order
            self.conversations[call.call_id] = (call.responder, now)
        else:
            self.forget(call.call_id)
        if not self.calls:
            self.emptied.set()

    def forget(self, call_id: str) -> None:
        """The call is over for good (Vobiz said so, or we ended it): no reconnect will resume it."""
        if any(c.call_id == call_id for c in self.calls):
            self.hung_up.add(call_id)  # its socket has yet to close: forget it then
        else:
            self.conversations.pop(call_id, None)

    def _forget_stale(self, now: float) -> None:
        """Drop conversations unseen for RESUME_WINDOW_S (oldest first: the dict is in time order)."""
        live = {c.call_id for c in self.calls}
        for old_id, (_, seen) in list(self.conversations.items()):
            if seen >= now - self.RESUME_WINDOW_S:
                break
            if old_id not in live:
                del self.conversations[old_id]

    async def wait_until_empty(self) -> None:
        await self.emptied.wait()

    def knows(self, call_id: str) -> bool:
        return call_id in self.conversations

    def conversation(self, call_id: str, log: CallLog) -> tuple[Responder, bool]:
        """The call's responder: the one it had before a reconnect, or a new one."""
        now = trio.current_time()
        self._forget_stale(now)
        if call_id in self.conversations:
            responder, _ = self.conversations.pop(call_id)  # re-inserted last: the dict stays in time order
            resumed = True
        else:
            responder, resumed = self.agent.responder(log), False
        self.conversations[call_id] = (responder, now)
        return responder, resumed

    def busy(self) -> str | None:
        """Why a new call can't be taken now, or None."""
        if self.draining:
            return "draining"
        if len(self.calls) >= self.settings.max_calls:
            return "busy"
        return self.load.overload()

    async def drain(self) -> None:
        """Stop taking calls, let live ones finish, then end the rest politely."""
        self.draining = True
        log.info("draining: %d live calls, waiting up to %.0f s", len(self), self.settings.drain_timeout_s)
        with trio.move_on_after(self.settings.drain_timeout_s):
            await self.wait_until_empty()
        for call in list(self.calls):
            call.end("shutdown")
        with trio.move_on_after(Call.FAREWELL_ACK_TIMEOUT_S + 2):
            await self.wait_until_empty()


BUSY_MESSAGE = "Sorry, all our lines are busy right now. Please call again in a few minutes."
WEBHOOK_PATHS = ("/answer", "/hangup", "/stream-status")
CALL_ID_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")


def busy_xml() -> bytes:
    response = ET.Element("Response")
    ET.SubElement(response, "Speak").text = BUSY_MESSAGE
    ET.SubElement(response, "Hangup")
    return ET.tostring(response, encoding="utf-8", xml_declaration=True)


def create_app(settings: Settings, agent: Agent | None = None) -> QuartTrio:
    """The web app: Vobiz's three webhooks, health and metrics, and the media WebSocket."""
    app = QuartTrio(__name__)
    agent = agent or (AIAgent(settings) if settings.uses_ai else OfflineAgent(settings))
    app.switchboard = Switchboard(settings, agent)
    app.webhook_guard = WebhookGuard(settings.vobiz_auth_token, settings.vobiz_require_signature)
    app.before_request(check_signature)
    for path, view in (("/answer", answer), ("/hangup", hangup), ("/stream-status", stream_status)):
        app.add_url_rule(path, view_func=view, methods=["GET", "POST"])  # Vobiz may use either
    app.add_url_rule("/health", view_func=health)
    app.add_url_rule("/metrics", view_func=prometheus_metrics)
    app.add_websocket("/ws/<call_id>/<token>", view_func=media_stream)
    app.before_serving(start_load_monitor)
    app.after_serving(release_agent)
    return app


async def check_signature() -> Response | None:
    if request.path not in WEBHOOK_PATHS:
        return None
    settings = current_app.switchboard.settings
    # Vobiz signed the URL it called: behind a tunnel that is PUBLIC_URL + path, not ours.
    signed_url = (settings.public_url or _request_base()) + request.path
    refusal = current_app.webhook_guard.refusal(signed_url, request.headers)
    if refusal is None:
        return None
    log.warning("refused a %s %s from %s: %s", request.method, request.path, request.remote_addr, refusal)
    current_app.switchboard.metrics.count(
        "calls_refused_total" if request.path == "/answer" else "webhooks_refused_total", reason="signature")
    return Response("forbidden\n", 403)


async def answer() -> Response:
    switchboard, params = current_app.switchboard, await _webhook_params()
    if params.get("Event") == "Hangup":  # the answer URL doubles as hangup URL when none is set
        _log_hangup(params)
        switchboard.forget(params.get("CallUUID", ""))
        return _xml(empty_xml())
    call_id = params.get("CallUUID", "")
    if not call_id or len(call_id) > 64 or not CALL_ID_CHARACTERS.issuperset(call_id):
        log.warning("answer without a usable CallUUID (%s): refused", _clean(call_id) or "none")
        return Response("a CallUUID is required\n", 400)
    if reason := switchboard.busy():
        log.warning("call %s: refused (%s), the caller hears that we are busy", call_id, reason)
        switchboard.metrics.count("calls_refused_total", reason=reason)
        return _xml(busy_xml())
    settings = switchboard.settings
    base = settings.public_url or _request_base()
    token = stream_token(settings.stream_secret, call_id, int(time.time()) + STREAM_URL_LIFETIME_S)
    media_url = base.replace("http", "ws", 1) + f"/ws/{call_id}/{token}"  # http→ws, https→wss
    log.info("call %s: answering, %s → %s (%s)", call_id, _clean(params.get("From")),
             _clean(params.get("To")), _clean(params.get("Direction")))
    return _xml(stream_xml(media_url, base + "/stream-status"))


async def hangup() -> Response:
    params = await _webhook_params()
    _log_hangup(params)
    current_app.switchboard.forget(params.get("CallUUID", ""))  # the call is over: nothing to resume
    return Response("", 200)


async def stream_status() -> Response:
    params = await _webhook_params()
    fields = " ".join(f"{key}={_clean(params[key])}" for key in ("Name", "Error") if params.get(key))
    log.info("call %s: stream %s %s %s", _clean(params.get("CallUUID")), _clean(params.get("StreamID")),
             _clean(params.get("Event")), fields)
    return Response("", 200)


async def health() -> tuple[dict, int]:
    switchboard = current_app.switchboard
    # Overloaded is still 200: the process is healthy, it only takes no new calls for now.
    load = {**switchboard.load.figures(), "refusing": switchboard.load.overload()}
    if switchboard.draining:
        return {"status": "draining", "calls": len(switchboard), "load": load}, 503
    return {"status": "ok", "calls": len(switchboard), "load": load}, 200


async def prometheus_metrics() -> Response:
    switchboard = current_app.switchboard
    text = switchboard.metrics.render(len(switchboard), switchboard.draining)
    return Response(text, content_type="text/plain; version=0.0.4")


async def start_load_monitor() -> None:
    current_app.add_background_task(current_app.switchboard.load.run)


async def release_agent() -> None:
    current_app.switchboard.load.scope.cancel()  # a background task: it would hold shutdown up
    await current_app.switchboard.agent.aclose()


async def media_stream(call_id: str, token: str) -> Response | None:
    switchboard = current_app.switchboard
    # Checked before the socket is accepted: a refused peer gets HTTP 403, not a call.
    problem = stream_token_problem(switchboard.settings.stream_secret, call_id, token, time.time(),
                                   switchboard.knows(call_id))
    if problem:
        log.warning("refused a media WebSocket for call %s from %s: %s", _clean(call_id),
                    websocket.remote_addr, problem)
        switchboard.metrics.count("calls_refused_total", reason="token")
        return Response("forbidden\n", 403)
    call = Call(websocket._get_current_object(), switchboard, call_id)
    switchboard.add(call)
    try:
        await call.run()
    finally:
        switchboard.remove(call)
    return None


async def _webhook_params() -> dict[str, str]:
    """Vobiz posts a form, or sends the same fields in the query string with GET."""
    params = request.args.to_dict()
    if request.method == "POST":
        params.update((await request.form).to_dict())
    return params


def _request_base() -> str:
    """The public base URL as the client sees it, through a tunnel or proxy."""
    proto = request.headers.get("X-Forwarded-Proto", request.scheme).split(",")[0].strip()
    host = request.headers.get("X-Forwarded-Host", request.host).split(",")[0].strip()
    return f"{proto}://{host}"


def _xml(document: bytes) -> Response:
    return Response(document, content_type="application/xml")


def _log_hangup(params: dict[str, str]) -> None:
    log.info("call %s: hung up after %s s, cause %s (%s), by %s", _clean(params.get("CallUUID")),
             _clean(params.get("Duration")), _clean(params.get("HangupCause")),
             _clean(params.get("HangupCauseName")), _clean(params.get("HangupSource")))


# ─────────────────────────────────────────────────────────────────────────────
# The command line.
# ─────────────────────────────────────────────────────────────────────────────

MAX_MESSAGE_BYTES = 1024 * 1024  # Hypercorn closes a socket that sends more; we ignore > 64 KiB


class JsonLogFormatter(logging.Formatter):
    """LOG_FORMAT=json: one JSON object per line; structured fields (a turn's latency) merged in."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name,
                 "message": record.getMessage()}
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler()
    if settings.log_format == "json":
        handler.setFormatter(JsonLogFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=settings.log_level, handlers=[handler])
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per TTS request is noise


def hypercorn_config(settings: Settings) -> HypercornConfig:
    config = HypercornConfig()
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    config.bind = [f"{host}:{settings.port}"]
    config.websocket_max_message_size = MAX_MESSAGE_BYTES
    config.errorlog = logging.getLogger("hypercorn.error")  # through our logging setup, once
    return config


def banner(settings: Settings, agent: Agent) -> str:
    lines = [f"vobiz-agent ({agent.name}) listening on http://{settings.host}:{settings.port}"]
    if settings.public_url:
        lines += [
            f"Answer URL (Vobiz console → your application, method POST): {settings.public_url}/answer",
            f"Hangup URL: {settings.public_url}/hangup",
        ]
    else:
        lines += [
            f"PUBLIC_URL is not set. Expose port {settings.port} with a tunnel (e.g. `ngrok http {settings.port}`),",
            "then start again with PUBLIC_URL=https://<your-tunnel-host> to see the Answer URL to paste",
            "into the Vobiz console. Until then /answer builds URLs from the request's Host header.",
        ]
    if settings.stream_secret_generated:
        lines.append("STREAM_SECRET is not set: media URLs are signed with a random per-process secret. "
                     "Several hosts behind one URL need a shared STREAM_SECRET (--workers share this one).")
    if not settings.vobiz_auth_token:
        lines.append("VOBIZ_AUTH_TOKEN is not set: webhook signatures are not checked.")
    return "\n".join(lines)


def command_line() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vobiz-agent", description="Answer Vobiz calls with a voice agent.")
    parser.add_argument("--host", help="address to listen on (default $HOST or 0.0.0.0)")
    parser.add_argument("--port", help="port to listen on (default $PORT or 5000)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    commands = parser.add_subparsers(dest="command", metavar="call", help="place an outbound call (else: serve)")
    call = commands.add_parser("call", help="ask Vobiz to call a number and connect it to this agent")
    call.add_argument("--to", required=True, help="the number to call, e.g. +919876543210")
    call.add_argument("--from", dest="caller", help="your Vobiz number (default $VOBIZ_FROM)")
    call.add_argument("--answer-url", help="default $PUBLIC_URL/answer")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = command_line()
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be 1 or more, e.g. --workers 4")
    try:
        port = _port("--port", args.port) if args.port is not None else None
        settings = Settings.from_env(os.environ, host=args.host, port=port)
    except SettingsError as error:
        sys.exit(f"vobiz-agent: {error}")
    if args.command == "call":
        call_command(settings, args.to, args.caller or os.environ.get("VOBIZ_FROM", ""), args.answer_url)
        return
    configure_logging(settings)
    agent = AIAgent(settings) if settings.uses_ai else OfflineAgent(settings)
    print(banner(settings, agent), flush=True)
    if args.workers > 1:
        serve_with_workers(settings, args.workers)
    else:
        trio.run(serve_until_signalled, create_app(settings, agent), hypercorn_config(settings))


WORKER_MIN_LIFE_S = 1.0  # a worker that dies sooner is replaced only after this long


def serve_with_workers(settings: Settings, workers: int) -> None:
    """Several processes on one port, each with its own event loop and calls.

    This parent binds the port and forks the workers, so they all accept on
    one listening socket and inherit one Settings, STREAM_SECRET included
    (a generated one too): any worker can take any call's WebSocket, because
    the media URL verifies itself. On SIGTERM or SIGINT the parent passes
    SIGTERM on, and each worker drains like a single process does. A worker
    that dies is replaced, so a crash costs only that worker's calls.
    """
    pool = WorkerPool(settings)
    for _ in range(workers):
        pool.start_worker()
    signal.signal(signal.SIGINT, pool.stop)
    signal.signal(signal.SIGTERM, pool.stop)
    sys.exit(pool.supervise())


class WorkerPool:
    """The parent's side of --workers: start them, replace the dead, pass a stop on."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.listeners = hypercorn_config(settings).create_sockets().insecure_sockets  # kept open here
        self.binds = [f"fd://{listener.fileno()}" for listener in self.listeners]
        self.fork = multiprocessing.get_context("fork")  # fork, not spawn: the children inherit the sockets
        self.born: dict[multiprocessing.Process, float] = {}
        self.stopping = False

    def start_worker(self) -> None:
        worker = self.fork.Process(target=run_worker, args=(self.settings, self.binds), name="vobiz-worker")
        worker.start()
        self.born[worker] = time.monotonic()
        log.info("worker %d started", worker.pid)

    def stop(self, number: int, _frame: object) -> None:
        """The signal handler: every worker gets SIGTERM, and drains."""
        if not self.stopping:
            log.info("%s received: draining %d workers", signal.Signals(number).name, len(self.born))
        self.stopping = True
        for worker in self.born:
            worker.terminate()

    def supervise(self) -> int:
        """Wait for workers to end, replacing them until a stop; the exit code."""
        failed = False
        while self.born:
            multiprocessing.connection.wait([worker.sentinel for worker in self.born])
            for worker in [worker for worker in self.born if worker.exitcode is not None]:
                lived = time.monotonic() - self.born.pop(worker)
                if self.stopping:
                    failed |= worker.exitcode != 0
                    continue
                log.error("worker %d ended (exit code %s): starting another", worker.pid, worker.exitcode)
                if lived < WORKER_MIN_LIFE_S:  # one that can't start: retried once a second, not in a spin
                    time.sleep(WORKER_MIN_LIFE_S - lived)
                if not self.stopping:
                    self.start_worker()
        return 1 if failed else 0


def run_worker(settings: Settings, binds: list[str]) -> None:
    """One worker process: the single-process server, on the parent's sockets."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a replacement worker is forked
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # with the parent's handlers: not ours to run
    config = hypercorn_config(settings)
    config.bind = binds
    trio.run(serve_until_signalled, create_app(settings), config)


# Outbound calls: Vobiz's REST API places the call; when it is answered, Vobiz
# fetches our answer URL and the call proceeds exactly like an inbound one.


class CallRefused(Exception):
    """Vobiz did not queue the call; the message says why, in one line."""


@dataclass(frozen=True)
class OutboundCall:
    url: str
    headers: dict[str, str]
    body: dict[str, str]


def outbound_call(settings: Settings, to: str, caller: str, answer_url: str | None) -> OutboundCall:
    for name, value in (("VOBIZ_AUTH_ID", settings.vobiz_auth_id), ("VOBIZ_AUTH_TOKEN", settings.vobiz_auth_token),
                        ("--from (or VOBIZ_FROM)", caller)):
        if not value:
            raise SettingsError(f"{name} is needed to place a call, e.g. VOBIZ_AUTH_ID=MA_XXXXXXXX")
    answer_url = answer_url or (settings.public_url and settings.public_url + "/answer")
    if not answer_url:
        raise SettingsError("--answer-url (or PUBLIC_URL) is needed, e.g. PUBLIC_URL=https://abc.ngrok.app")
    return OutboundCall(
        # Casing and the trailing slash matter: /account/... or /Call answers 401.
        url=f"{settings.vobiz_api_url}/Account/{settings.vobiz_auth_id}/Call/",
        headers={"X-Auth-ID": settings.vobiz_auth_id, "X-Auth-Token": settings.vobiz_auth_token},
        body={"from": caller, "to": to, "answer_url": answer_url, "answer_method": "POST",
              "hangup_url": urljoin(answer_url, "hangup"), "hangup_method": "POST"},
    )


CALL_ERRORS = {
    401: "Vobiz refused the credentials (HTTP 401): check VOBIZ_AUTH_ID and VOBIZ_AUTH_TOKEN",
    402: "the Vobiz account has no balance left (HTTP 402)",
    429: "Vobiz is rate limiting (HTTP 429): too many calls per second or at once; try again shortly",
}


async def place_call(settings: Settings, call: OutboundCall) -> str:
    """Ask Vobiz to place the call; returns its request_uuid (the future CallUUID)."""
    try:
        async with httpx.AsyncClient(timeout=15) as client:
            response = await client.post(call.url, json=call.body, headers=call.headers)
    except httpx.HTTPError as error:
        raise CallRefused(f"could not reach {call.url}: {type(error).__name__} {error}".strip()) from None
    if response.status_code in (200, 201):  # the docs say 200; the API has been seen answering 201
        try:
            return str(response.json()["request_uuid"])
        except (ValueError, KeyError, TypeError):
            raise CallRefused(f"Vobiz queued the call but sent no request_uuid: {_clean(response.text)}") from None
    raise CallRefused(CALL_ERRORS.get(response.status_code)
                      or f"Vobiz answered HTTP {response.status_code}: {_clean(response.text, 200)}")


def call_command(settings: Settings, to: str, caller: str, answer_url: str | None) -> None:
    """`vobiz-agent call`: print the request_uuid, or stop with one line saying why not."""
    try:
        print(trio.run(place_call, settings, outbound_call(settings, to, caller, answer_url)))
    except (SettingsError, CallRefused) as error:
        sys.exit(f"vobiz-agent: {error}")


async def serve_until_signalled(app: QuartTrio, config: HypercornConfig) -> None:
    """Serve until SIGINT (Ctrl-C) or SIGTERM (docker stop), drain, then exit 0.

    The handler matters in a container: there the program is process 1, and
    the kernel drops signals that process 1 has not asked for.
    """

    async def signalled() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for number in signals:
                log.info("%s received: shutting down", signal.Signals(number).name)
                break
            # Still receiving while we drain: a second signal (Ctrl-C reaches a worker
            # from the terminal and from its parent) must not cut the goodbyes short.
            await app.switchboard.drain()

    await serve(app, config, shutdown_trigger=signalled)


if __name__ == "__main__":
    main()
