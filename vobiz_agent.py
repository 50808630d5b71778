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
        │   clearedAudio, dtmf                conversation:  turn → responder → player
        │                                     player:        PCM → 8 kHz μ-law → playAudio
        │   playAudio, checkpoint,   ◀─────── barge-in:      caller talks over the agent →
        │   clearAudio                                       cancel the reply, clearAudio
        ▼
    POST /hangup, /stream-status, ──────▶ logged for the operator
         /ring, /recording
    POST /transfer ─────────────────────▶ <Dial> a person (after we asked Vobiz to move the call)

The path of a frame from Vobiz: media_stream (the WebSocket route) → Call.run (the call's
nursery) → Call.listen_to_vobiz → parse_frame → Call._handle → Call._hear → the ears
(EnergyEars or DeepgramEars) → Call.turn_ended → Call.converse (the call's life: greet,
turns, goodbye, stop) → Call.answer → Call.respond (the reply's cancel scope, which a
barge-in cancels) → the responder's reply → Player.play → Player.send_frame (paced) →
Outbound.play_audio → Call.send; Vobiz's playedStream for each checkpoint comes back the
same way in, to Player.heard (what the caller heard).

Read the file top to bottom: its sections come in the order a call meets them: settings,
audio, the Vobiz protocol (the frames in and out, the trust in webhooks and media URLs, the REST
API), the agent (ears, brain and mouth: offline, then AI), the call (its transcript, the Player,
the Call), the web app (metrics, load, the switchboard, the routes), the command line (logging,
the server's settings, the banner, `vobiz-agent call`, serving until a signal). The few helpers
every section uses to read values from the network come first, after the imports.

With no provider keys the agent is an offline "echo test": it greets the caller with
a chime, listens, and plays each of the caller's turns back to them.

Run it:      pip install . && python vobiz_agent.py      (serves on 0.0.0.0:5000)
Try it:      open http://localhost:5000/phone and click Call (phone.html plays Vobiz)
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
import importlib.metadata
import ipaddress
import json
import logging
import math
import os
import secrets
import signal
import socket
import sys
import textwrap
import time
import uuid
import warnings
import xml.etree.ElementTree as ET
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import aclosing, suppress
from dataclasses import dataclass, field, fields
from functools import cache, partial
from pathlib import Path
from typing import ClassVar, Protocol
from urllib.parse import urlencode, urljoin, urlsplit

import dotenv
import httpx
import prometheus_client
import trio
import trio_websocket
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from quart import Response, current_app, request, websocket
from quart.wrappers import Websocket
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


# Values from the network, used by every section: providers and peers send every shape.


def _clean(value: object, limit: int = 120) -> str:
    """A value from the network, made safe for one log line."""
    return str(value)[:limit].encode("unicode_escape").decode("ascii")


def _get(value: object, key: str) -> object:
    """value[key] if value is a JSON object that has it, else None."""
    return value.get(key) if isinstance(value, dict) else None


def _list(value: object) -> list:
    """value if it is a JSON array, else an empty one."""
    return value if isinstance(value, list) else []


def _describe(error: BaseException) -> str:
    """A one-line reason for a failed connection."""
    status = getattr(error, "status_code", None)  # trio_websocket.ConnectionRejected
    return f"refused with HTTP {status}" if status else f"{type(error).__name__} {error}".strip()


# ─────────────────────────────────────────────────────────────────────────────
# Settings: read and checked once, at start. A bad value stops the program with
# one line that names the variable, says what is wrong and shows a good value.
# ─────────────────────────────────────────────────────────────────────────────


class SettingsError(Exception):
    """A setting that cannot be used; the message is meant for the operator."""


def variable(default: object, help: str, kind: str = "text", **checks: object):
    """A Settings field, read from its name in upper case: a row of SETTINGS (see Setting)."""
    return field(default=default, metadata={"help": help, "kind": kind, **checks})


WEB = ("http", "https")


@dataclass(frozen=True)
class Settings:
    """Every setting: its default, what it means, and how its variable is read and checked."""

    host: str = variable("0.0.0.0", "address to listen on")
    port: int = variable(5000, "port to listen on", "number", low=1, high=65535)
    public_url: str | None = variable(  # without a trailing slash
        None, "the public base URL Vobiz reaches, e.g. `https://abc.ngrok.app`; used for the `<Stream>` URL and "
        "the status callback", "url", choices=WEB, example="https://abc.ngrok.app")
    log_level: str = variable("INFO", "`DEBUG`, `INFO`, `WARNING` or `ERROR`", "choice",
                              choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    log_format: str = variable("text", "`json` for one JSON object per line (log collectors)", "choice",
                               choices=("text", "json"))
    barge_in_min_ms: int = variable(200, "how long the caller must talk over the agent to stop it (also the "
                                    "offline agent's minimum speech)", "number", low=0, high=2000)
    # The AI agent: used when both keys are set.
    deepgram_api_key: str = variable("", "with `OPENAI_API_KEY`: use the AI agent. Only one of the two is an error")
    deepgram_url: str = variable("wss://api.deepgram.com/v1/listen", "the live transcription endpoint", "url",
                                 choices=("ws", "wss"))
    deepgram_model: str = variable("nova-3", "the speech-to-text model")
    deepgram_language: str = variable("en", "the caller's language")
    deepgram_endpointing_ms: int = variable(300, "quiet that ends a phrase", "number", low=10, high=5000)
    openai_api_key: str = variable("", "any string for a local server")
    openai_base_url: str = variable("https://api.openai.com/v1", "any OpenAI-compatible server", "url", choices=WEB)
    openai_model: str = variable("gpt-4o-mini", "the chat model")
    openai_timeout_s: float = variable(10.0, "connect / first token / first byte timeout", "number",
                                       low=0.1, high=120)
    system_prompt: str = variable(
        "You are a friendly voice assistant on a phone call. Answer in one to three short, spoken sentences. "
        "Use plain words: no lists, markdown, emoji or URLs. If you did not catch something, ask the caller "
        "to repeat it.", "short spoken sentences, no markdown", shown="a phone-assistant prompt")
    tts_model: str = variable("gpt-4o-mini-tts", "the text-to-speech model")
    tts_voice: str = variable("alloy", "the text-to-speech voice")
    tts_base_url: str = variable(  # empty: OPENAI_BASE_URL
        "", "the voice's server, when it is not the model's (Groq, Ollama, vLLM and LM Studio speak no `pcm`)",
        "url", choices=WEB, shown="OPENAI_BASE_URL", example="https://api.openai.com/v1")
    tts_api_key: str = variable("", "the voice server's key", shown="OPENAI_API_KEY")  # empty: OPENAI_API_KEY
    greeting: str = variable("Hello! How can I help you today?", "spoken when the caller's audio starts flowing")
    # Trust and operations.
    vobiz_auth_id: str = variable("", "your account id (`MA_…`), for outbound calls and transfers")
    vobiz_auth_token: str = variable("", "the account's token: with `VOBIZ_AUTH_ID`, outbound calls and "
                                     "transfers; checks V2/V3 signatures")
    vobiz_parent_auth_token: str = variable("", "a sub-account's parent (main) account token: checks "
                                            "`-MA-V2`/`-MA-V3` signatures")
    vobiz_verify_signatures: str = variable(
        "off", "`off`, `when-signed` (signed webhooks must be right) or `required` (unsigned ones refused too); "
        "the old `VOBIZ_REQUIRE_SIGNATURE=true` means `required`", "choice",
        choices=("off", "when-signed", "required"))
    vobiz_api_url: str = variable("https://api.vobiz.ai/api/v1", "the Vobiz REST API, for outbound calls and "
                                  "transfers", "url", choices=WEB)
    vobiz_from: str = variable("", "the caller id for `call` when `--from` is not given")
    transfer_number: str = variable("", "a person's number: the agent can transfer the caller there (a model "
                                    "tool; 0 on the echo agent)")
    transfer_caller_id: str = variable("", "the caller ID the person sees on a transfer",
                                       shown="our number on the call")
    record_calls: bool = variable(False, "record every call (`<Record recordSession>`); the recording's URL is "
                                  "logged", "flag", example="true")
    stream_secret: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False, metadata={
        "help": "signs the media URLs; give every replica the same one", "kind": "secret",
        "shown": "random per process"})
    stream_secret_generated: bool = True  # no STREAM_SECRET: only this process can verify its URLs
    max_calls: int = variable(50, "calls per process, counted from `/answer`; more get a busy tone (unanswered, "
                              "unbilled)", "number", low=1, high=100_000)
    stream_max_retries: int = variable(3, "`maxRetries` on `<Stream>`: how often Vobiz reconnects a dropped "
                                       "socket", "number", low=0, high=10)
    max_call_s: float = variable(3600.0, "every call says goodbye and ends after this long", "number",
                                 low=10, high=86_400)
    silence_timeout_s: float = variable(60.0, "every agent says goodbye after this long without a word from the "
                                        "caller (old name `OFFLINE_SILENCE_S`)", "number", low=1, high=86_400)
    idle_timeout_s: float = variable(30.0, "end a call whose socket carries no valid media this long", "number",
                                     low=1, high=3600)
    http_read_timeout_s: float = variable(10.0, "close a connection that sends nothing this long", "number",
                                          low=1, high=300)
    drain_timeout_s: float = variable(30.0, "on SIGTERM, how long live calls may go on", "number", low=0, high=3600)
    # Admission by measured load: over any of these, new calls hear "busy" (MAX_CALLS stays the hard cap).
    load_max_lag_ms: int = variable(50, "new calls hear busy while the event loop wakes this late (measured "
                                    "load)", "number", low=1, high=60_000)
    load_max_cpu: float = variable(0.75, "new calls hear busy while the process's CPU with one more call would "
                                   "pass this share of a core", "number", low=0.01, high=64.0)
    load_max_behind_ms: int = variable(250, "new calls hear busy while the median call reads its caller's audio "
                                       "this far behind", "number", low=1, high=60_000)
    load_max_starts_per_s: int = variable(10, "new calls hear busy while this many were answered within the last "
                                          "second (a burst of set-ups stalls the calls already live)", "number",
                                          low=1, high=10_000)
    offline_max_turns: int = variable(20, "the echo agent says goodbye after this many turns", "number",
                                      low=1, high=10_000)
    phone: bool | None = variable(  # None: decided by serves_phone
        None, "serve the browser softphone at `/phone`; `true` with the AI agent on a public address lets anyone "
        "who reaches it spend your provider budget", "flag", shown="on with the offline agent or a loopback HOST")

    @property
    def uses_ai(self) -> bool:
        return bool(self.deepgram_api_key and self.openai_api_key)

    @property
    def loopback(self) -> bool:
        """Listening on a loopback address: only programs on this machine can connect."""
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:  # a name, not an address
            return self.host == "localhost"

    @property
    def serves_phone(self) -> bool:
        """Anyone who can open /phone can make a call, so with the AI agent on a public address (calls
        that spend your provider budget) it is served only with PHONE=true."""
        return (not self.uses_ai or self.loopback) if self.phone is None else self.phone

    @property
    def open_door_warning(self) -> str | None:
        """What /health and the banner say when anyone can make the AI agent spend money."""
        if self.uses_ai and self.vobiz_verify_signatures == "off":
            return ("webhook verification is off and the AI agent is on: anyone who can reach /answer can "
                    "spend your provider budget. Set VOBIZ_AUTH_TOKEN and VOBIZ_VERIFY_SIGNATURES=required.")
        return None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """The variables that are set, each read by its row of SETTINGS; the rest keep their defaults."""
        env = dict(env)  # old spellings still work where the new variable is not set
        if env.get("OFFLINE_SILENCE_S") and not env.get("SILENCE_TIMEOUT_S"):
            env["SILENCE_TIMEOUT_S"] = env["OFFLINE_SILENCE_S"]
        if env.get("VOBIZ_REQUIRE_SIGNATURE") and not env.get("VOBIZ_VERIFY_SIGNATURES"):
            required = env["VOBIZ_REQUIRE_SIGNATURE"].lower() in ("true", "1", "yes")
            env["VOBIZ_VERIFY_SIGNATURES"] = "required" if required else "off"
        values = {setting.field: setting.parse(env[setting.variable])
                  for setting in SETTINGS if env.get(setting.variable)}
        # The rules that span several variables.
        if bool(values.get("deepgram_api_key")) != bool(values.get("openai_api_key")):
            missing = "DEEPGRAM_API_KEY" if values.get("openai_api_key") else "OPENAI_API_KEY"
            raise SettingsError(f"{missing} is not set: the AI agent needs both DEEPGRAM_API_KEY and "
                                f"OPENAI_API_KEY (set neither for the offline echo agent), e.g. {missing}=sk-...")
        # Verification only when asked: a token set for outbound calls must not start refusing webhooks.
        mode = values.get("vobiz_verify_signatures", "off")
        if mode != "off" and not (values.get("vobiz_auth_token") or values.get("vobiz_parent_auth_token")):
            raise SettingsError(f"VOBIZ_VERIFY_SIGNATURES={mode} needs the token Vobiz signs with: set "
                                "VOBIZ_AUTH_TOKEN (and VOBIZ_PARENT_AUTH_TOKEN for a sub-account), "
                                "e.g. VOBIZ_AUTH_TOKEN=...")
        if values.get("transfer_number") and not (values.get("vobiz_auth_id") and values.get("vobiz_auth_token")):
            raise SettingsError(f"TRANSFER_NUMBER={values['transfer_number']!r} needs VOBIZ_AUTH_ID and "
                                "VOBIZ_AUTH_TOKEN (a transfer is a Vobiz API request), "
                                "e.g. VOBIZ_AUTH_ID=MA_XXXXXXXX")
        return cls(**values, stream_secret_generated="stream_secret" not in values)


@dataclass(frozen=True)
class Setting:
    """A row of the settings table: the environment variable of a Settings field, read by `parse`."""

    field: str  # the Settings field; its variable is the name in upper case
    help: str
    kind: str = "text"
    low: float = 0  # a number's range
    high: float = 0
    choices: tuple[str, ...] = ()  # the values a choice allows, or the schemes a URL may have
    example: str = ""  # a good value for error messages, when the default is none
    shown: str = ""  # the default as --help and README show it, when its value would not do

    @property
    def variable(self) -> str:
        return self.field.upper()

    @property
    def default(self) -> object:
        return getattr(Settings, self.field, None)  # a default_factory field has none

    def shown_default(self) -> str:
        value = self.default
        if self.shown or value in ("", None):
            return self.shown or "(none)"
        if isinstance(value, bool):
            return str(value).lower()
        return f"{value:g}" if isinstance(value, float) else str(value)

    def refuse(self, value: str, why: str) -> SettingsError:
        return SettingsError(f"{self.variable}={value!r} is {why}, e.g. {self.variable}="
                             f"{self.example or self.shown_default()}")

    def parse(self, value: str) -> object:
        """The variable's text, checked and converted to the field's type."""
        match self.kind:
            case "secret":  # the HMAC key
                return value.encode()
            case "number":
                try:
                    number = type(self.default)(value)  # int or float, as the default is
                except ValueError:
                    number = None
                if number is None or not self.low <= number <= self.high:
                    raise self.refuse(value, f"not a number from {self.low:g} to {self.high:g}")
                return number
            case "url":
                parts = urlsplit(value)
                if parts.scheme not in self.choices or not parts.netloc or parts.query:
                    raise self.refuse(value, f"not a {'/'.join(self.choices)} base URL")
                return value.rstrip("/")
            case "choice":
                for choice in self.choices:
                    if value.upper() == choice.upper():
                        return choice
                raise SettingsError(f"{self.variable}={value!r} is not one of {', '.join(self.choices)}, "
                                    f"e.g. {self.variable}={self.choices[1]}")
            case "flag":
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise self.refuse(value, "not true or false")
                return value.lower() in ("true", "1", "yes")
            case _:  # "text": as it is
                return value


SETTINGS = tuple(Setting(each.name, **each.metadata) for each in fields(Settings) if each.metadata)


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
        # Observed Vobiz L16 is little-endian: a real call's frame in the vendor's example
        # (https://vobiz.ai/docs/examples/vobiz-bun-media-stream) decodes to plausible line noise only that way.
        return payload if sys.byteorder == "little" else audioop.byteswap(payload, 2)


MULAW_8K = MediaFormat("audio/x-mulaw", 8000)
MEDIA_FORMATS = frozenset({MULAW_8K, MediaFormat("audio/x-l16", 8000), MediaFormat("audio/x-l16", 16000)})  # heard


def lowpass_taps(rate: int, passband: int = 3400, stopband: int = 5000, attenuation_db: float = 50) -> list[float]:
    """A linear-phase low-pass FIR with a Kaiser window. Why: `audioop.ratecv` just interpolates, so anything
    above 4 kHz in 24 kHz speech (sibilants, a synthetic voice's hiss) folds back below 4 kHz at full strength
    (a 5 kHz tone comes out at 3 kHz). We keep the telephone band, 300-3400 Hz, flat and push 5 kHz and above
    down by `attenuation_db`; Kaiser's formulas give the length and window shape for that."""

    def bessel_i0(x: float) -> float:
        """The modified Bessel function I0 (the Kaiser window's shape), by its series."""
        total = term = 1.0
        k = 1
        while term > 1e-12 * total:
            term *= (x / (2 * k)) ** 2
            total += term
            k += 1
        return total

    transition = 2 * math.pi * (stopband - passband) / rate
    taps = math.ceil((attenuation_db - 8) / (2.285 * transition)) | 1  # odd: a whole-sample delay
    beta = 0.1102 * (attenuation_db - 8.7)
    cutoff = (passband + stopband) / 2 / rate  # cycles per sample
    middle = (taps - 1) / 2
    coefficients = []
    for n in range(taps):
        t = n - middle
        ideal = 2 * cutoff if t == 0 else math.sin(2 * math.pi * cutoff * t) / (math.pi * t)
        window = bessel_i0(beta * math.sqrt(1 - (t / middle) ** 2)) / bessel_i0(beta)
        coefficients.append(ideal * window)
    gain = sum(coefficients)
    return [c / gain for c in coefficients]  # unity gain at 0 Hz


class FrameEncoder:
    """Agent speech (16-bit PCM at `rate`) → exact 160-byte μ-law frames at 8 kHz: low-pass and decimate,
    `ratecv` the rest of the way, μ-law, cut. Each stage keeps the end of the last chunk (half a sample, the
    filter's last taps-1 samples, ratecv's state, under a frame of μ-law): chunks of any size come out as if
    whole. The filter is polyphase: when the rate is a multiple of 8 kHz it computes only the samples that
    decimation keeps (1 in 3 at 24 kHz), one audioop call per tap over a strided copy, the symmetric taps
    sharing a multiply. Samples are halved on the way in (a pair, or a running sum, can exceed 16 bits) and
    doubled at the end."""

    def __init__(self, rate: int):
        # Decimate by the largest whole step that keeps at least 8 kHz; ratecv does the rest.
        self.step = max(d for d in range(1, max(rate // TELEPHONE_RATE, 1) + 1) if rate % d == 0)
        self.decimated_rate = rate // self.step
        self.taps = lowpass_taps(rate) if rate > TELEPHONE_RATE else []
        self.history = bytes(2 * (len(self.taps) - 1)) if self.taps else b""
        self.ratecv_state = None
        self.odd_byte = b""  # a sample split across two chunks waits here
        self.ulaw = b""  # less than one frame, waiting for more

    def encode(self, pcm: bytes) -> list[bytes]:
        pcm = self.odd_byte + pcm
        whole = len(pcm) & ~1
        self.odd_byte, pcm = pcm[whole:], pcm[:whole]
        if self.taps:
            pcm = self._filter(pcm)
        if self.decimated_rate != TELEPHONE_RATE:
            pcm, self.ratecv_state = audioop.ratecv(pcm, 2, 1, self.decimated_rate, TELEPHONE_RATE,
                                                    self.ratecv_state)
        self.ulaw += audioop.lin2ulaw(pcm, 2)
        cut = len(self.ulaw) - len(self.ulaw) % FRAME_BYTES
        frames = [self.ulaw[i : i + FRAME_BYTES] for i in range(0, cut, FRAME_BYTES)]
        self.ulaw = self.ulaw[cut:]
        return frames

    def flush(self) -> list[bytes]:
        """The last, partial frame, padded with silence (Vobiz wants whole frames)."""
        rest, self.ulaw = self.ulaw, b""
        return [rest.ljust(FRAME_BYTES, ULAW_SILENCE)] if rest else []

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
        self.history = samples[2 * outputs * step :]  # from the oldest sample the next output still needs
        return audioop.mul(total, 2, 2.0)


@cache
def tones(segments: tuple[tuple[tuple[float, ...], float], ...], loudness: int, fade_in_s: float,
          fade_out_s: float) -> bytes:
    """Sound we make ourselves: `segments` one after another, each (frequencies, seconds), the
    sum of those sines (no frequencies: quiet), faded in and out so that it does not click."""
    rate = 24000  # speech's rate, so that tones travel the whole chain speech does, filter included
    samples = array.array("h")
    for frequencies, length_s in segments:
        count = int(rate * length_s)
        for i in range(count):
            fade = min(1.0, i / (fade_in_s * rate), (count - i) / (fade_out_s * rate))
            samples.append(int(loudness * fade * sum(math.sin(2 * math.pi * f * i / rate) for f in frequencies)))
    return samples.tobytes()


def chime(frequencies: tuple[float, float], seconds: tuple[float, float] = (0.18, 0.30), loudness: int = 8000,
          fade_out_s: float = 0.05) -> bytes:
    """Two soft tones in turn: the offline agent's greeting (rising) and goodbye (falling), the trouble tone."""
    return tones(tuple(((f,), s) for f, s in zip(frequencies, seconds, strict=True)), loudness, 0.01, fade_out_s)


# Two falling tones, quieter than the chimes: what the caller hears when the voice itself fails.
trouble_tone = partial(chime, (480.0, 360.0), (0.2, 0.2), 6000, 0.03)


# A keypad's tones: each key is one low (row) and one high (column) frequency at once.
DTMF_ROWS = {"123A": 697.0, "456B": 770.0, "789C": 852.0, "*0#D": 941.0}
DTMF_COLUMNS = {"147*": 1209.0, "2580": 1336.0, "369#": 1477.0, "ABCD": 1633.0}


def dtmf_tone(key: str) -> bytes:
    """The tone pair of one key, 200 ms with soft edges, then 60 ms of quiet."""
    row = next(frequency for keys, frequency in DTMF_ROWS.items() if key in keys)
    column = next(frequency for keys, frequency in DTMF_COLUMNS.items() if key in keys)
    return tones((((row, column), 0.20), ((), 0.06)), 5000, 0.005, 0.005)


# ─────────────────────────────────────────────────────────────────────────────
# The Vobiz protocol: the <Stream> answer, the frames Vobiz sends us and the ones we send
# back, the checks on who is asking, and the REST API we call. The vendor's docs are
# https://vobiz.ai/docs/xml/stream and the pages under it; simulated_vobiz.py (the tests'
# Vobiz) is their executable form, and its docstring says which page, or which real call,
# each behaviour comes from.
# ─────────────────────────────────────────────────────────────────────────────


def stream_xml(media_url: str, status_url: str, max_retries: int, recording_url: str | None = None) -> bytes:
    """The answer that connects the call's audio to our WebSocket both ways (with `recording_url`, recording
    the whole call first). Vobiz reconnects a dropped socket only if asked (`maxRetries`, default 0); when the
    stream is over for good it runs what follows <Stream>, <Hangup/>: a stream that ends in any way ends the
    call, not leaves the caller in dead air."""
    response = ET.Element("Response")
    if recording_url:
        # recordSession: the whole call, in the background; redirect="false": go on to
        # <Stream> at once. Vobiz posts the finished recording's URL to callbackUrl.
        ET.SubElement(response, "Record", recordSession="true", redirect="false", fileFormat="mp3",
                      maxLength="14400", playBeep="false", action=recording_url, method="POST",
                      callbackUrl=recording_url, callbackMethod="POST")
    stream = ET.SubElement(response, "Stream",
                           bidirectional="true",  # we may send playAudio, checkpoint, clearAudio
                           audioTrack="inbound",  # the caller only; "both" ends bidirectional calls
                           keepCallAlive="true",  # the call lasts as long as the stream
                           contentType="audio/x-mulaw;rate=8000", statusCallbackUrl=status_url,
                           statusCallbackMethod="POST",
                           maxRetries=str(max_retries))  # each retry: the same URL, a new streamId, the same callId
    stream.text = media_url  # the URL is the element's text, not an attribute
    ET.SubElement(response, "Hangup")
    return ET.tostring(response, encoding="utf-8", xml_declaration=True)


EMPTY_XML = ET.tostring(ET.Element("Response"), encoding="utf-8", xml_declaration=True)  # nothing to do
# Refuse the call unanswered: the caller hears a busy tone and nobody is billed (a <Speak> would answer it).
BUSY_XML = b"<?xml version='1.0' encoding='utf-8'?>\n<Response><Hangup reason=\"busy\" /></Response>"


class BadFrame(ValueError):
    """A frame we cannot use. `kind` groups them for the call's log."""

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind


# The frames Vobiz sends, each with the JSON shape it is read from.


@dataclass(frozen=True)
class Start:
    """{"event": "start", "start": {"callId", "streamId", "mediaFormat": {"encoding", "sampleRate"}}}:
    the stream's first frame (older docs: the ids at the top, and a flat "contentType")."""

    call_id: str
    stream_id: str
    media_format: MediaFormat

    @staticmethod
    def from_json(data: dict) -> Start:
        nested = data["start"] if isinstance(data.get("start"), dict) else {}
        call_id = nested.get("callId") or data.get("callId")
        stream_id = nested.get("streamId") or data.get("streamId")
        if not isinstance(call_id, str) or not isinstance(stream_id, str) or not call_id or not stream_id:
            raise BadFrame("fields", "start frame has no callId/streamId")
        # {"encoding", "sampleRate"}, or the old "audio/x-l16;rate=8000"; we asked for μ-law, the default.
        media_format, content_type = nested.get("mediaFormat"), data.get("contentType")
        if isinstance(media_format, dict):
            encoding, rate = media_format.get("encoding"), media_format.get("sampleRate")
        elif isinstance(content_type, str):
            encoding, _, rate = content_type.partition(";rate=")
        else:
            return Start(call_id, stream_id, MULAW_8K)
        try:
            found = MediaFormat(str(encoding).strip().lower(), int(rate))
        except (TypeError, ValueError):
            raise BadFrame("format", f"unreadable media format {media_format or content_type!r}") from None
        if found not in MEDIA_FORMATS:
            raise BadFrame("format", f"unsupported media format {found.encoding} at {found.rate} Hz")
        return Start(call_id, stream_id, found)


@dataclass(frozen=True)
class Media:
    """{"event": "media", "media": {"payload": "<base64>"}}: 20 ms of the caller, every 20 ms."""

    payload: bytes  # raw caller audio in the stream's MediaFormat

    @staticmethod
    def from_base64(payload: str) -> Media:
        try:
            return Media(binascii.a2b_base64(payload, strict_mode=True))
        except ValueError as error:  # binascii.Error is one; non-ASCII text raises the plain kind
            raise BadFrame("base64", f"media.payload is not base64 ({error})") from None


@dataclass(frozen=True)
class PlayedStream:
    """{"event": "playedStream", "name": "<checkpoint>"}: Vobiz played everything up to our checkpoint."""

    name: str


@dataclass(frozen=True)
class ClearedAudio:
    """{"event": "clearedAudio"}: Vobiz flushed its queue, as our clearAudio asked."""


DTMF_KEYS = frozenset("0123456789*#ABCD")


@dataclass(frozen=True)
class Dtmf:
    """{"event": "dtmf", "dtmf": {"digit": "5"}}: a key pressed. That is the vendor's code's shape
    (Plivo's adds track and timestamp); {"dtmf": "5"} and a top-level "digit" are read too."""

    digit: str

    @staticmethod
    def from_json(data: dict) -> Dtmf:
        dtmf = data.get("dtmf", data.get("digit"))
        digit = dtmf.get("digit") if isinstance(dtmf, dict) else dtmf
        if not isinstance(digit, str):
            raise BadFrame("fields", "dtmf frame has no digit")
        if digit.upper() not in DTMF_KEYS:
            raise BadFrame("fields", f"dtmf digit {_clean(digit, 10)!r} is not a key of a keypad")
        return Dtmf(digit.upper())


@dataclass(frozen=True)
class Stop:
    """{"event": "stop"}: the stream is over."""


Frame = Start | Media | PlayedStream | ClearedAudio | Dtmf | Stop

MAX_FRAME_BYTES = 64 * 1024  # larger frames are ignored (a 20 ms media frame is < 1 KiB)
MAX_FRAME_CONTAINERS = 32  # objects and arrays in one frame: Vobiz's have at most five


def _finite(text: str) -> float:
    """A frame's NaN, Infinity or number with a fraction or exponent, refused if not finite
    (an integer made of it would overflow)."""
    value = float(text)
    if math.isfinite(value):
        return value
    if text in ("NaN", "Infinity", "-Infinity"):
        raise ValueError(f"{text} is not a number")
    raise ValueError(f"{text[:20]} is out of range")


FRAME_DECODER = json.JSONDecoder(parse_constant=_finite, parse_float=_finite)  # one, not one per frame


def parse_frame(message: object) -> Frame:
    """Any WebSocket message from Vobiz → a typed frame, or BadFrame. Vobiz sends JSON text, so binary
    and empty messages are bad; nesting is bounded before parsing (deep JSON exhausts the recursion limit)."""
    if not isinstance(message, str):  # bytes, or None for an empty binary message
        raise BadFrame("binary", "frame is binary, not text")
    if not message:
        raise BadFrame("empty", "frame is empty")
    if len(message) > MAX_FRAME_BYTES:
        raise BadFrame("oversized", f"frame of {len(message)} bytes is over {MAX_FRAME_BYTES}")
    if message.count("{") + message.count("[") > MAX_FRAME_CONTAINERS:
        raise BadFrame("json", f"frame has more than {MAX_FRAME_CONTAINERS} objects and arrays")
    try:
        data = FRAME_DECODER.decode(message)
    except ValueError as error:
        raise BadFrame("json", f"frame is not JSON ({_clean(error)})") from None
    match data:  # media first: fifty a second, the rest a handful per call
        case {"event": "media", "media": {"payload": str(payload)}} if payload:
            return Media.from_base64(payload)
        case {"event": "media"}:
            raise BadFrame("fields", "media frame has no media.payload")
        case {"event": "start"}:
            return Start.from_json(data)
        case {"event": "playedStream", "name": str(name)}:
            return PlayedStream(name)
        case {"event": "playedStream"}:
            raise BadFrame("fields", "playedStream frame has no name")
        case {"event": "clearedAudio"}:
            return ClearedAudio()
        case {"event": "dtmf"}:
            return Dtmf.from_json(data)
        case {"event": "stop"}:
            return Stop()
        case dict():
            raise BadFrame("event", f"unknown event {data.get('event')!r}")
    raise BadFrame("json", f"frame is a JSON {type(data).__name__}, not an object")


class Outbound:
    """The frames we send to Vobiz for one stream."""

    def __init__(self, stream_id: str):
        self.stream_id = stream_id
        # playAudio goes out 50 times a second: a fixed prefix + the payload (base64 needs no JSON escaping).
        head = json.dumps({"event": "playAudio", "streamId": stream_id})[:-1]
        self.play_prefix = head + ', "media": {"contentType": "audio/x-mulaw", "sampleRate": 8000, "payload": "'

    def play_audio(self, frame: bytes) -> str:
        return self.play_prefix + base64.b64encode(frame).decode("ascii") + '"}}'

    def checkpoint(self, name: str) -> str:  # Vobiz answers playedStream once it has played up to here
        return json.dumps({"event": "checkpoint", "streamId": self.stream_id, "name": name})

    def clear_audio(self) -> str:  # drop what is queued; Vobiz answers clearedAudio
        return json.dumps({"event": "clearAudio", "streamId": self.stream_id})

    def stop(self) -> str:  # end the stream (and, after <Stream>, the call: see stream_xml)
        return json.dumps({"event": "stop", "streamId": self.stream_id})


class WebhookGuard:
    """Checks the signatures of Vobiz's webhooks and remembers recent nonces, so that a captured request
    cannot be replayed (the signature covers no timestamp). `mode` is "off", "when-signed" (a signed request
    must be signed right; Vobiz signs only callbacks that have credentials) or "required" (unsigned ones are
    refused too). A header may carry several signatures, comma-separated (a token rotation): one match will do."""

    NONCE_MEMORY_S = 300.0  # a signed request replayed within this window is refused
    # Which token signs which header: V2/V3 the account's own (a sub-account's, for its numbers), -MA-V2/-MA-V3
    # the parent (main) account's; on a main account both are one. The MA headers have no nonce of their own.
    HEADERS = (  # (header, its nonce's header, whose token, version)
        ("X-Vobiz-Signature-V3", "X-Vobiz-Signature-V3-Nonce", "account", 3),
        ("X-Vobiz-Signature-MA-V3", "X-Vobiz-Signature-V3-Nonce", "parent", 3),
        ("X-Vobiz-Signature-V2", "X-Vobiz-Signature-V2-Nonce", "account", 2),
        ("X-Vobiz-Signature-MA-V2", "X-Vobiz-Signature-V2-Nonce", "parent", 2),
    )

    def __init__(self, mode: str, auth_token: str, parent_token: str = ""):
        self.mode = mode
        self.tokens = {"account": auth_token, "parent": parent_token or auth_token}
        self.seen: dict[str, float] = {}  # nonce → when; insertion order is time order

    def refusal(self, url: str, headers: Mapping[str, str]) -> str | None:
        """Why this request must be refused, or None if it may pass."""
        if self.mode == "off":
            return None
        checked = []
        for header, nonce_header, signer, version in self.HEADERS:
            token, signatures, nonce = self.tokens[signer], headers.get(header), headers.get(nonce_header)
            if not (token and signatures and nonce):
                continue  # not sent, or signed with a token we were not given
            checked.append(header.removeprefix("X-Vobiz-Signature-"))
            # V3 signs URL + "." + nonce, V2 URL + nonce (the body is not signed): base64 of HMAC-SHA256.
            signed = f"{url}.{nonce}" if version == 3 else f"{url}{nonce}"
            expected = base64.b64encode(hmac.new(token.encode(), signed.encode(), hashlib.sha256).digest())
            if any(hmac.compare_digest(expected, each.strip().encode()) for each in signatures.split(",")):
                return self._replayed(nonce)
        if checked:  # the URL is half of what is signed: a PUBLIC_URL unlike the console's fails here
            return f"no {'/'.join(checked)} signature matches the URL checked, {_clean(url)}"
        return "no signature" if self.mode == "required" else None

    def _replayed(self, nonce: str) -> str | None:
        now = time.monotonic()
        while self.seen and next(iter(self.seen.values())) < now - self.NONCE_MEMORY_S:
            self.seen.pop(next(iter(self.seen)))
        if nonce in self.seen:
            return "replayed nonce"
        self.seen[nonce] = now
        return None


STREAM_URL_MARGIN_S = 120  # after MAX_CALL_S: the goodbye, and a reconnect racing it


class StreamToken:
    """The media WebSocket carries no authentication, so the <Stream> URL is itself the credential:
    /ws/<CallUUID>/<issued>.<nonce>.<mac>: when /answer issued it, a value made for that one answer, and a MAC
    over both and the call, keyed with STREAM_SECRET. It stays valid as long as the call may last (MAX_CALL_S
    plus STREAM_URL_MARGIN_S), so that any process sharing the secret accepts Vobiz's reconnects."""

    NONCE_BYTES = 6  # 8 URL-safe characters: unique per answer, not a secret
    MAC_BYTES = 12  # 96 bits: the capability itself
    CLOCK_SKEW_S = 30  # an "issued" this far in the future is from another host's clock

    def __init__(self, secret: bytes):
        self.secret = secret

    def issue(self, call_id: str, issued: int | None = None, nonce: str | None = None) -> str:
        """The token for a new answer of `call_id` (now, a fresh nonce), or for a given one."""
        issued = int(time.time()) if issued is None else issued
        if nonce is None:
            nonce = base64.urlsafe_b64encode(secrets.token_bytes(self.NONCE_BYTES)).decode()
        mac = hmac.new(self.secret, f"{call_id}.{issued}.{nonce}".encode(), hashlib.sha256).digest()
        return f"{issued}.{nonce}.{base64.urlsafe_b64encode(mac[: self.MAC_BYTES]).decode()}"

    def refusal(self, call_id: str, token: str, now: float, lifetime_s: float) -> str | None:
        """Why `token` opens no media socket for `call_id` at wall-clock time `now`, or None."""
        issued = self.issued_at(token)
        if issued is None:
            return "bad token"
        expected = self.issue(call_id, issued, nonce=token.partition(".")[2].partition(".")[0]).encode()
        if not hmac.compare_digest(expected, token.encode()) or issued > now + self.CLOCK_SKEW_S:
            return "bad token"
        if now > issued + lifetime_s:
            return "expired token"
        return None

    @staticmethod
    def issued_at(token: str) -> int | None:
        """When the token says it was issued (epoch seconds), or None if it has no sane shape."""
        if len(token) > 64 or not token.isascii():  # isdigit() alone would pass "²" and Arabic-Indic digits
            return None
        issued = token.partition(".")[0]
        return int(issued) if 1 <= len(issued) <= 12 and issued.isdigit() else None


class VobizAPI:
    """Vobiz's REST API, with the account's credentials: placing a call (`vobiz-agent call`; once answered, it
    proceeds like an inbound one from our answer URL) and moving a live call to other XML (a transfer)."""

    ERRORS: ClassVar[dict[int, str]] = {
        401: "Vobiz refused the credentials (HTTP 401): check VOBIZ_AUTH_ID and VOBIZ_AUTH_TOKEN",
        402: "the Vobiz account has no balance left (HTTP 402)",
        429: "Vobiz is rate limiting (HTTP 429): too many calls per second or at once; try again shortly",
    }

    def __init__(self, settings: Settings):
        # Casing and the trailing slash matter: /account/... or /Call answers 401.
        self.calls_url = f"{settings.vobiz_api_url}/Account/{settings.vobiz_auth_id}/Call/"
        self.headers = {"X-Auth-ID": settings.vobiz_auth_id, "X-Auth-Token": settings.vobiz_auth_token}

    @staticmethod
    def make_call(settings: Settings, args: argparse.Namespace) -> dict[str, str | int]:
        """The Make Call request's body, from `vobiz-agent call`'s flags; SettingsError if one is missing."""
        caller = args.caller or settings.vobiz_from
        for name, value, example in (("VOBIZ_AUTH_ID", settings.vobiz_auth_id, "VOBIZ_AUTH_ID=MA_XXXXXXXX"),
                                     ("VOBIZ_AUTH_TOKEN", settings.vobiz_auth_token, "VOBIZ_AUTH_TOKEN=..."),
                                     ("--from (or VOBIZ_FROM)", caller, "--from 918071387423")):
            if not value:
                raise SettingsError(f"{name} is needed to place a call, e.g. {example}")
        answer_url = args.answer_url or (settings.public_url and settings.public_url + "/answer")
        if not answer_url:
            raise SettingsError("--answer-url (or PUBLIC_URL) is needed, e.g. PUBLIC_URL=https://abc.ngrok.app")
        body: dict[str, str | int] = {
            "from": caller, "to": args.to, "answer_url": answer_url, "answer_method": "POST",
            "hangup_url": urljoin(answer_url, "hangup"), "hangup_method": "POST",
            "ring_url": args.ring_url or urljoin(answer_url, "ring"), "ring_method": "POST"}
        # Optional parameters only when given. No default fallback URL: ours would fail when the answer URL does.
        if args.fallback_url:
            body |= {"fallback_url": args.fallback_url, "fallback_method": "POST"}
        if args.time_limit:
            body["time_limit"] = args.time_limit  # seconds
        if args.machine_detection:
            body["machine_detection"] = args.machine_detection  # "true" or "hangup"
        return body

    async def place_call(self, body: dict[str, str | int]) -> str | None:
        """Ask Vobiz to place the call and print its request_uuid (the future CallUUID); None, or why not."""
        try:
            async with httpx.AsyncClient(timeout=15) as client:
                response = await client.post(self.calls_url, json=body, headers=self.headers)
        except httpx.HTTPError as error:
            return f"could not reach {self.calls_url}: {type(error).__name__} {error}".strip()
        if response.status_code not in (200, 201):  # the docs say 200; the API has been seen answering 201
            return (self.ERRORS.get(response.status_code)
                    or f"Vobiz answered HTTP {response.status_code}: {_clean(response.text, 200)}")
        try:
            print(response.json()["request_uuid"])
        except (ValueError, KeyError, TypeError):
            return f"Vobiz queued the call but sent no request_uuid: {_clean(response.text)}"
        return None

    async def transfer(self, call_id: str, aleg_url: str) -> str | None:
        """Move a live call to `aleg_url`'s XML (its <Stream> ends): None if Vobiz accepted, else why not."""
        body = {"legs": "aleg", "aleg_url": aleg_url, "aleg_method": "POST"}
        try:  # the caller is waiting in silence meanwhile: not long
            async with httpx.AsyncClient(timeout=5) as client:
                response = await client.post(f"{self.calls_url}{call_id}/", json=body, headers=self.headers)
        except httpx.HTTPError as error:
            return f"could not reach Vobiz: {type(error).__name__}"
        if response.status_code in (200, 202):
            return None
        return f"Vobiz answered HTTP {response.status_code}: {_clean(response.text, 120)}"


# ─────────────────────────────────────────────────────────────────────────────
# The agent: ears, brain and mouth. The call feeds the ears every inbound
# payload; the ears tell the call when the caller starts speaking (so it can
# stop talking) and when a turn is over. A responder turns a turn into
# utterances, streams of PCM, and hands each one to the call's player.
# ─────────────────────────────────────────────────────────────────────────────


@dataclass
class Turn:
    """What the caller said: their audio (16-bit PCM at `rate`) and/or its text. `marks`: when each step of
    the answer happened (trio.current_time()), for the latency line; `speech_ended`: when the caller went quiet."""

    text: str = ""
    audio: bytes = b""
    rate: int = TELEPHONE_RATE
    # "speech": the caller talked; "ears-down": speech-to-text is unreachable (no audio, no text);
    # "digits": keys pressed, e.g. text "[the caller pressed 1 2 3]" and digits "123"
    kind: str = "speech"
    digits: str = ""
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

    @classmethod
    def whole(cls, label: str, pcm: bytes, text: str, rate: int = 24000) -> Utterance:
        """One whose audio is all at hand (a chime, the caller's own words)."""
        async def once() -> AsyncIterator[bytes]:
            yield pcm

        return cls(label, rate, once(), text)


Play = Callable[[Utterance], Awaitable[None]]
CallLog = Callable[..., None]  # the call's log(level, message, *args, error=None): lines that name the call


class Ears(Protocol):
    """They report to the Call: `speech_started(onset)` (it may stop talking), `turn_ended(turn)`. `hear` is
    called for every inbound media payload and must never block; `run` is the ears' own task, for ears that
    need one (a speech-to-text socket)."""

    dropped: int  # caller frames dropped on the way to speech-to-text (a slow provider), for the call's log

    def hear(self, payload: bytes) -> None: ...
    async def run(self) -> None: ...


HANG_UP = "hang_up"  # a reply ended with this: say goodbye and end the call
TRANSFER_CALL = "transfer_call"  # or with this: hand the call to a person


class Responder(Protocol):
    """The brain and mouth of one call: they speak by awaiting `play(utterance)`. `reply` returns the tool
    the reply ended with: None (talk on), HANG_UP or TRANSFER_CALL. `resume`: a reconnect landed where the
    conversation is not known ("sorry, we were cut off"); `announce`: a fixed line ("connecting you now");
    `farewell(reason)`: the goodbye, for the reason given to Call.end ("agent": the reply ended with HANG_UP)."""

    async def greet(self, play: Play) -> None: ...
    async def resume(self, play: Play) -> None: ...
    async def reply(self, turn: Turn, play: Play) -> str | None: ...
    async def announce(self, label: str, text: str, play: Play) -> None: ...
    async def farewell(self, reason: str, play: Play) -> None: ...


@dataclass(frozen=True)
class Agent:
    """What the process's agent gives each call (make_agent builds it: the offline echo test, or the AI agent)."""

    ears: Callable[[MediaFormat, Call, CallLog], Ears]
    responder: Callable[[CallLog], Responder]
    digit_pause_s: float  # keys pressed within this of each other are one "digits" turn
    client: httpx.AsyncClient | None = None  # the providers' connection pool, closed at shutdown


class VoiceActivity:
    """Is this frame speech? Loud enough, and well above the noise floor learnt from the quiet frames (quickly
    down, slowly up). Also how long the current run of speech has lasted: dips inside a word don't end it."""

    MIN_THRESHOLD = 300  # rms of 16-bit samples, about -40 dBFS: below this nothing is speech
    ABOVE_FLOOR = 4.0  # speech is 12 dB above the noise floor
    GAP_TOLERANCE_S = 0.10  # a gap longer than this ends a run of speech

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
    """Turn-taking by loudness alone, for the offline agent. Speech must last `speech_min_s` before
    it counts (a click or a cough is not speech), and a turn ends after SILENCE_END_S of quiet. The
    turn's audio is kept, with a little from before the onset: first consonants are quiet."""

    SILENCE_END_S = 0.60
    PRE_ROLL_S = 0.10
    TAIL_S = 0.10  # keep this much of the closing quiet: words trail off below the threshold
    MAX_TURN_S = 30.0
    dropped = 0  # loudness is measured in hear(): no queue, nothing dropped

    def __init__(self, media_format: MediaFormat, listener: Call, speech_min_s: float):
        self.format = media_format
        self.listener = listener
        self.speech_min_s = speech_min_s
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

    def __init__(self, max_turns: int, transfers: bool):
        self.max_turns = max_turns
        self.turns = 0
        self.transfers = transfers  # pressing 0 hands the call to TRANSFER_NUMBER

    async def greet(self, play: Play) -> None:
        await play(Utterance.whole("greeting", chime((660.0, 880.0)), "(chime)"))

    async def resume(self, play: Play) -> None:
        await play(Utterance.whole("sorry", chime((660.0, 660.0)), "(cut-off chime)"))

    async def reply(self, turn: Turn, play: Play) -> str | None:
        if turn.kind == "digits":  # a keypad echo: each key's own tone pair
            for key in turn.digits:
                if key == "0" and self.transfers:
                    return TRANSFER_CALL
                await play(Utterance.whole("keypad", dtmf_tone(key), f"(the tone of {key})"))
            return None
        self.turns += 1
        await play(Utterance.whole("echo", turn.audio, "(the caller's own words)", rate=turn.rate))
        return HANG_UP if self.turns >= self.max_turns else None

    async def announce(self, label: str, text: str, play: Play) -> None:
        """No voice to say `text` with: a rising chime before a transfer, falling tones for an apology."""
        pcm = chime((660.0, 990.0)) if label == "transfer" else trouble_tone()
        await play(Utterance.whole(label, pcm, f"({text})"))

    async def farewell(self, reason: str, play: Play) -> None:
        await play(Utterance.whole("goodbye", chime((880.0, 660.0)), "(goodbye chime)"))


class DeepgramEars:
    """The AI agent's ears: Deepgram live transcription over a WebSocket, and turn-taking from it.

    hear() never waits: a sender task drains a short queue into Deepgram, so a slow Deepgram never delays
    reading Vobiz's frames. A transcript of older audio would end the turn that much late, so when the
    queue is full (Deepgram slow, or away) the oldest frame is dropped, counted, and logged once per burst.

    A turn ends at `speech_final`, at a `from_finalize` result, or at `UtteranceEnd` when finals are pending
    and no newer words are. When our VAD has heard silence for the endpointing time plus FINALIZE_MARGIN_S
    and no final came (noise can keep Deepgram's endpointing from firing), we send `Finalize`. A possible
    barge-in (SpeechStarted) is confirmed once our energy measure has heard `barge_in_min_s` of speech, or
    once words arrive."""

    BUFFER_S = 0.3  # the most caller audio waiting for Deepgram
    KEEPALIVE_S = 4.0  # Deepgram closes a stream that gets no audio for about 10 s
    BACKOFF_S = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
    APOLOGY_AFTER_S = 2.0  # no usable connection this long: tell the caller rather than leave them in silence
    USABLE_AFTER_S = 2.0  # a connection that stayed up this long worked; a briefer one is part of the outage
    FINALIZE_MARGIN_S = 0.5  # beyond the endpointing time, before we ask Deepgram for its final

    def __init__(self, settings: Settings, media_format: MediaFormat, listener: Call, log: CallLog):
        self.url = self.listen_url(settings, media_format)
        self.headers = [("Authorization", f"Token {settings.deepgram_api_key}")]
        self.format = media_format
        self.listener = listener
        self.log = log
        self.barge_in_min_s = settings.barge_in_min_ms / 1000
        self.finalize_after_s = settings.deepgram_endpointing_ms / 1000 + self.FINALIZE_MARGIN_S
        self.outbox: deque[bytes] = deque()  # audio for Deepgram, at most BUFFER_S of it
        self.outbox_frames = max(1, round(self.BUFFER_S / FRAME_SECONDS))
        self.queued = trio.Event()  # set when the outbox has something for the sender
        self.dropped = 0
        self.dropping = False  # in a burst of drops (logged once)
        self.finalize_due = False  # the sender owes Deepgram a Finalize, after the audio queued before it
        self.finalize_sent = False  # for the current stretch of silence
        self.vad = VoiceActivity()
        self.maybe_speaking = False  # SpeechStarted came; not yet confirmed
        self.speaking = False  # confirmed: reported to the listener
        self.finals: list[str] = []
        self.final_end: float | None = None  # when the last final word ended, on Deepgram's clock
        self.words_pending = False  # interim words newer than the last final
        self.words_at = 0.0  # when the last words came

    @staticmethod
    def listen_url(settings: Settings, media_format: MediaFormat) -> str:
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

    def hear(self, payload: bytes) -> None:
        pcm = self.format.to_pcm(payload)
        self.vad.voiced(pcm, len(pcm) / 2 / self.format.rate)
        if self.maybe_speaking and self.vad.run_s >= self.barge_in_min_s:
            self._confirm_speech()
        self._finalize_if_silent()
        if len(self.outbox) >= self.outbox_frames:
            self.outbox.popleft()
            self.dropped += 1
            if not self.dropping:
                self.dropping = True
                self.log(logging.WARNING, "speech-to-text is behind: dropping the oldest caller audio, "
                         "keeping the last %.1f s", self.BUFFER_S, error="stt_behind")
        self.outbox.append(payload)
        self.queued.set()

    def _finalize_if_silent(self) -> None:
        """Words wait for a final, but neither our VAD nor Deepgram has heard speech for a while: ask
        Deepgram to finalize, once per stretch of silence."""
        if self.vad.quiet_s == 0.0:
            self.finalize_sent = False  # speech again: a later silence may need its own Finalize
            return
        waiting = self.finals or self.words_pending
        silent_s = min(self.vad.quiet_s, trio.current_time() - self.words_at)
        if waiting and silent_s >= self.finalize_after_s and not self.finalize_sent:
            self.finalize_sent = self.finalize_due = True  # the sender sends it after the audio queued now

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
            self._on_results(message)
        elif kind == "UtteranceEnd":
            # Only when nothing newer is pending: an UtteranceEnd that overtakes words still being
            # recognised, or a late one about words before the last final, must not cut a turn in two.
            last_word_end = message.get("last_word_end")
            late = isinstance(last_word_end, (int, float)) and self.final_end is not None \
                and last_word_end < self.final_end - 0.05
            if self.finals and not self.words_pending and not late:
                self._end_turn()
        elif kind == "Error":
            description = message.get("description") or message.get("message") or message
            self.log(logging.WARNING, "speech-to-text error: %s", _clean(description, 200), error="stt")
        # Metadata (and anything new) carries nothing for the conversation.

    def _on_results(self, message: dict) -> None:
        best = next(iter(_list(_get(_get(message, "channel"), "alternatives"))), None)
        transcript = _get(best, "transcript")
        text = transcript.strip() if isinstance(transcript, str) else ""
        if text:
            self._confirm_speech()  # words are speech, however short
            self.words_at = trio.current_time()
        if message.get("is_final"):
            self.words_pending = False  # this stretch of audio is settled, words or none
            if text:
                self.finals.append(text)
                words = _list(_get(best, "words"))
                end = _get(words[-1], "end") if words else None
                self.final_end = end if isinstance(end, (int, float)) else None
        elif text:
            self.words_pending = True
        if self.finals and (message.get("speech_final") or message.get("from_finalize")):
            self._end_turn()

    def _end_turn(self) -> None:
        turn = Turn(text=" ".join(self.finals), speech_ended=self.vad.last_voiced)
        turn.mark("stt_final")
        self.finals, self.speaking, self.maybe_speaking = [], False, False
        self.final_end, self.words_pending, self.finalize_due = None, False, False
        self.listener.turn_ended(turn)

    async def run(self) -> None:
        """Stay connected for the whole call, reconnecting with backoff. An outage lasts until a connection
        has stayed up USABLE_AFTER_S (a Deepgram that accepts, then closes, every stream is as down as one
        that refuses); once it reaches APOLOGY_AFTER_S the caller hears the apology, once per outage."""
        failures, down_since, apologized = 0, trio.current_time(), False  # no usable connection yet
        while True:
            problem, lasted = await self._stream(failures)
            now = trio.current_time()
            if lasted >= self.USABLE_AFTER_S:  # it worked; a new outage starts now
                failures, down_since, apologized = 0, now, False
            delay = self.BACKOFF_S[min(failures, len(self.BACKOFF_S) - 1)]
            self.log(logging.WARNING, "speech-to-text is down (%s); reconnecting in %.2f s", problem, delay,
                     error="stt")
            failures += 1
            if not apologized and down_since + self.APOLOGY_AFTER_S < now + delay:
                await trio.sleep_until(down_since + self.APOLOGY_AFTER_S)
                apologized = True
                self.listener.turn_ended(Turn(kind="ears-down"))
            await trio.sleep_until(now + delay)

    async def _stream(self, failures: int) -> tuple[str, float]:
        """One connection to Deepgram, until it ends: returns why it ended, and how long it was up."""
        opened = None
        try:
            async with trio_websocket.open_websocket_url(
                self.url, extra_headers=self.headers, connect_timeout=5, disconnect_timeout=1
            ) as socket:
                opened = trio.current_time()
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
                problem, closed = "Deepgram closed the stream", socket.closed
                if closed:  # it says why in its close frame (e.g. 1011 NET-0001)
                    problem += f" with {closed.code} {_clean(closed.reason or closed.name)}"
        except* (trio_websocket.HandshakeError, OSError, trio.TooSlowError) as group:
            problem = _describe(group.exceptions[0])
        return problem, 0.0 if opened is None else trio.current_time() - opened

    async def _send_audio(self, socket: trio_websocket.WebSocketConnection) -> None:
        with suppress(trio_websocket.ConnectionClosed):
            while True:
                with trio.move_on_after(self.KEEPALIVE_S) as idle:
                    await self.queued.wait()
                if idle.cancelled_caught:
                    await socket.send_message(json.dumps({"type": "KeepAlive"}))
                    continue
                self.queued = trio.Event()
                while self.outbox:
                    await socket.send_message(self.outbox.popleft())
                self.dropping = False  # caught up: a later overflow is a new burst
                if self.finalize_due:
                    self.finalize_due = False
                    await socket.send_message(json.dumps({"type": "Finalize"}))

    async def _receive(self, socket: trio_websocket.WebSocketConnection) -> None:
        with suppress(trio_websocket.ConnectionClosed):
            while True:
                message = await socket.get_message()
                try:
                    data = json.loads(message)
                except (ValueError, RecursionError):
                    self.log(logging.WARNING, "speech-to-text sent something that is not JSON")
                    continue
                if isinstance(data, dict):
                    self.on_message(data)


# The AI agent's brain and mouth: an OpenAI-compatible chat model and voice, streamed.


class ProviderError(Exception):
    """A provider (LLM or TTS) failed: bad status, timeout, network error, or an error in its stream."""


HANG_UP_TOOL = {"type": "function", "function": {
    "name": HANG_UP,
    "description": "End the phone call. Use it only after the caller says goodbye and you have said goodbye too.",
    "parameters": {"type": "object", "properties": {}},
}}

# Offered with TRANSFER_NUMBER set. The call says "connecting you now" itself: the model need say nothing first.
TRANSFER_TOOL = {"type": "function", "function": {
    "name": TRANSFER_CALL,
    "description": "Transfer the phone call to a person. Use it when the caller asks for a human, "
                   "or when you cannot help them. The caller is told that they are being connected.",
    "parameters": {"type": "object", "properties": {}},
}}

TTS_RATE = 24000  # the voice's speech comes as raw 16-bit PCM at this rate
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


class ProviderAPI:
    """The OpenAI-compatible HTTP API: chat completions streamed as server-sent events (one JSON chunk each),
    speech as raw PCM, and how to read them. One for the process: what one call learns of the chat server
    (that its model takes no tools), the next call knows."""

    def __init__(self, settings: Settings, client: httpx.AsyncClient):
        self.settings = settings
        self.client = client
        self.tools = [HANG_UP_TOOL, TRANSFER_TOOL] if settings.transfer_number else [HANG_UP_TOOL]
        self.takes_tools = True  # until the chat server refuses them; then they are never offered again

    async def chat(self, messages: list[dict], tools_called: set[str], log: CallLog) -> AsyncIterator[str]:
        """The model's reply, text as it arrives; the names of tools it calls go into `tools_called`.
        A model that refuses our tools (HTTP 400 naming them) is asked again without."""
        url, key = f"{self.settings.openai_base_url}/chat/completions", self.settings.openai_api_key
        try:
            while True:
                body = {"model": self.settings.openai_model, "messages": messages, "stream": True}
                if offered := self.takes_tools:
                    body["tools"] = self.tools
                async with self.client.stream("POST", url, json=body,
                                              headers={"Authorization": f"Bearer {key}"}) as response:
                    failure = await self._failure(response, "LLM")
                    if failure and offered and response.status_code == 400 \
                            and ("tool" in str(failure).lower() or "function" in str(failure).lower()):
                        if self.takes_tools:  # (another call may have learnt it meanwhile)
                            self.takes_tools = False
                            log(logging.WARNING, "%s: asking without tools from now on (the model cannot end "
                                "calls)", failure, error="llm_no_tools")
                        continue
                    if failure:
                        raise failure
                    async for data in self.server_sent_events(response.aiter_lines()):
                        if data == "[DONE]":
                            return
                        if text := self.chat_delta(data, tools_called):
                            yield text
                    return
        except httpx.HTTPError as error:
            raise ProviderError(f"LLM: {type(error).__name__} {error}".strip()) from None

    async def speech(self, text: str) -> AsyncIterator[bytes]:
        """`text` spoken, raw PCM at TTS_RATE as it arrives. The voice may live elsewhere than the
        model (TTS_BASE_URL): most chat servers have no speech."""
        settings = self.settings
        url = f"{settings.tts_base_url or settings.openai_base_url}/audio/speech"
        key = settings.tts_api_key or settings.openai_api_key
        body = {"model": settings.tts_model, "voice": settings.tts_voice, "input": text, "response_format": "pcm"}
        try:
            async with self.client.stream("POST", url, json=body,
                                          headers={"Authorization": f"Bearer {key}"}) as response:
                if failure := await self._failure(response, "TTS"):
                    raise failure
                async for chunk in response.aiter_bytes():
                    yield chunk  # any size: the player's FrameEncoder carries an odd byte over to the next
        except httpx.HTTPError as error:
            raise ProviderError(f"TTS: {type(error).__name__} {error}".strip()) from None

    @classmethod
    async def _failure(cls, response: httpx.Response, who: str) -> ProviderError | None:
        """None for HTTP 200; else the error, in the provider's own words when its body has them."""
        if response.status_code == 200:
            return None
        body = (await response.aread())[:2000]
        parsed = cls._json(body)
        detail = cls._error_message(parsed) if parsed is not None else _clean(body.decode("utf-8", "replace"), 200)
        return ProviderError(f"{who}: HTTP {response.status_code} {detail}")

    @classmethod
    async def server_sent_events(cls, lines: AsyncIterator[str]) -> AsyncIterator[str]:
        """The data of each event in a text/event-stream (lines already split at \\n, \\r\\n or \\r): `field: value`
        lines ended by a blank line; lines starting with ":" are comments (keep-alives such as ": OPENROUTER
        PROCESSING"). `event: error` is the provider reporting a failure mid-stream (Groq does): a ProviderError."""
        event, data = "", []
        async for line in lines:
            if line:
                name, _, value = line.partition(":")
                value = value.removeprefix(" ")  # "data: x" and "data:x" are the same line
                if name == "data":
                    data.append(value)
                elif name == "event":
                    event = value
                continue
            text, kind = "\n".join(data), event
            event, data = "", []
            if kind == "error":
                raise ProviderError(f"LLM: {cls._error_message(cls._json(text) or text)}")
            if text:
                yield text

    @classmethod
    def chat_delta(cls, data: str, tools_called: set[str]) -> str:
        """The text one streamed chunk adds to the reply (of choice 0); the names of tools it calls go into
        `tools_called`. An error object in the chunk (OpenRouter sends them) raises ProviderError; any other
        shape, however odd, adds nothing. `content` is a string, null, or (Mistral's reasoning models) a list
        of typed parts, of which only the `text` parts are the answer. Reasoning fields are never read."""
        chunk = cls._json(data)
        if _get(chunk, "error"):
            raise ProviderError(f"LLM: {cls._error_message(chunk)}")
        first = [choice for choice in _list(_get(chunk, "choices"))
                 if isinstance(choice, dict) and choice.get("index", 0) == 0]
        delta = _get(first[0], "delta") if first else None
        for call in _list(_get(delta, "tool_calls")):
            name = _get(_get(call, "function"), "name")
            if isinstance(name, str) and name:  # later chunks of the same call carry only its arguments
                tools_called.add(name)
        content = _get(delta, "content")
        if isinstance(content, list):
            return "".join(part["text"] for part in content
                           if _get(part, "type") == "text" and isinstance(part.get("text"), str))
        return content if isinstance(content, str) else ""

    @staticmethod
    async def without_reasoning(tokens: AsyncIterator[str]) -> AsyncIterator[str]:
        """Leave out the <think>…</think> that R1/QwQ-style models open their content with (Together, the
        Hugging Face router, Ollama and vLLM pass it on), however the chunks cut the tags. A reply that opens
        otherwise is passed on untouched, held back only while it could still be the opening tag."""
        state, held = "opening", ""  # opening → (thinking → after) → answer
        async for token in tokens:
            if state == "answer":
                yield token
                continue
            held += token
            if state == "opening":
                start = held.lstrip()
                if THINK_OPEN.startswith(start):
                    continue  # "", "<", "<th"…: could still be the tag
                if not start.startswith(THINK_OPEN):
                    state = "answer"
                    yield held
                    continue
                state, held = "thinking", start[len(THINK_OPEN):]
            if state == "thinking":
                end = held.find(THINK_CLOSE)
                if end < 0:
                    held = held[-len(THINK_CLOSE):]  # drop the reasoning; keep what may be a cut tag
                    continue
                state, held = "after", held[end + len(THINK_CLOSE):]
            held = held.lstrip()  # the blank lines between the reasoning and the answer
            if held:
                state = "answer"
                yield held

    @staticmethod
    def _json(data: str | bytes) -> object:
        try:
            return json.loads(data)
        except (ValueError, RecursionError):  # not JSON, or nested too deep to parse
            return None

    @staticmethod
    def _error_message(body: object) -> str:
        """The provider's own words from an error body: {"error": {"message": …}}, {"error": "…"}, …"""
        error = _get(body, "error") or body
        message = _get(error, "message") or error
        return _clean(message if isinstance(message, str) else json.dumps(message), 200)


SENTENCE_ENDS = ".!?"
CLAUSE_ENDS = ",;:"
FIRST_PIECE_MIN_CHARS = 4  # "Sure," can go to TTS at once; "Dr." cannot
SENTENCE_MIN_CHARS = 20  # later pieces: whole sentences, not fragments
ABBREVIATIONS = {"dr", "mr", "mrs", "ms", "st", "jr", "sr", "prof", "vs", "etc", "e.g", "i.e", "no"}


def speakable_end(text: str, first: bool) -> int | None:
    """Where the first piece ready for speech ends in `text`, or None if it isn't complete. The first piece
    of a reply may end at a comma (the caller hears the agent a few hundred milliseconds sooner); later
    pieces are whole sentences."""
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


LLM_APOLOGY = "Sorry, I'm having trouble thinking right now. Could you say that again?"
TRANSFER_LINE = "Connecting you now, please hold."
TRANSFER_APOLOGY = "Sorry, I couldn't connect you to a person just now. Let's carry on."
EARS_APOLOGY = "Sorry, I'm having trouble hearing you. Please hold on a moment."
FAREWELL = "Sorry, I have to end our call now. Goodbye!"
CUT_OFF = "Sorry, we were cut off. Could you tell me again what you need?"
GOODBYE = "Thank you for calling. Goodbye!"  # when the model hangs up without a word
INTERRUPTED = "[the caller interrupted]"


@dataclass
class Reply:
    """What the agent said in one go (a reply, the greeting, an apology), utterance by utterance as each was
    made, and the caller's words it answers. An utterance cut off before it played is not heard."""

    caller_said: str | None = None  # None: words of the agent's own, not an answer
    utterances: list[Utterance] = field(default_factory=list)

    def heard_any(self) -> bool:
        return any(utterance.heard for utterance in self.utterances)

    def heard_text(self) -> str:
        """What the caller heard of it, marked if they cut it short."""
        heard = [utterance.text for utterance in self.utterances if utterance.heard]
        text = " ".join(heard)
        return text if len(heard) == len(self.utterances) else f"{text} {INTERRUPTED}".strip()


class AIResponder:
    """One call's conversation with the language model, spoken sentence by sentence.

    A reply is three things at once, inside the call's reply scope: the LLM stream is cut into sentences;
    each sentence's TTS request starts as soon as it is complete, before it goes to the player; the player
    plays them in order. Handing over waits while PREFETCH sentences are queued, so while one plays up to
    PREFETCH + 1 more are being synthesized (the queued ones and the one waiting to join them), and the LLM
    stream is read no further until the player takes the next. Cancelling the scope closes every stream.

    History is the call's Replies; the model is told only what the caller heard of each, read when the next
    request is built, after Vobiz has acknowledged or voided each checkpoint."""

    PREFETCH = 1  # sentences queued for the player

    def __init__(self, settings: Settings, api: ProviderAPI, log: CallLog):
        self.settings = settings
        self.api = api
        self.log = log
        self.history: list[Reply] = []

    async def greet(self, play: Play) -> None:
        await self._speak("greeting", self.settings.greeting, play, Turn())

    async def resume(self, play: Play) -> None:
        await self._speak("sorry", CUT_OFF, play, Turn())

    async def reply(self, turn: Turn, play: Play) -> str | None:
        if turn.kind == "ears-down":
            await self._speak("apology", EARS_APOLOGY, play, turn)
            return None
        messages, answer = self._conversation(turn.text)
        tools_called: set[str] = set()  # this reply's only: a goodbye talked over ends nothing later
        async with trio.open_nursery() as nursery:
            ready_in, ready_out = trio.open_memory_channel[Utterance](self.PREFETCH)
            nursery.start_soon(self._think, messages, answer, turn, ready_in, nursery, tools_called)
            async for utterance in ready_out:
                await play(utterance)
        return next((tool for tool in (TRANSFER_CALL, HANG_UP) if tool in tools_called), None)

    async def announce(self, label: str, text: str, play: Play) -> None:
        await self._speak(label, text, play, Turn())

    async def farewell(self, reason: str, play: Play) -> None:
        if reason != "agent":
            await self._speak("goodbye", FAREWELL, play, Turn())
        elif not self.history or not self.history[-1].utterances:
            # The model hung up without a word (the reply was only the tool call): never end in silence.
            await self._speak("goodbye", GOODBYE, play, Turn())

    async def _speak(self, label: str, text: str, play: Play, turn: Turn) -> None:
        """Fixed words (the greeting, an apology): synthesized and played."""
        said = Reply()
        self.history.append(said)
        async with trio.open_nursery() as nursery:
            await play(self._utterance(text, turn, nursery, said, label))

    def _conversation(self, text: str) -> tuple[list[dict], Reply]:
        """The request for the model (the history, then the caller's `text`), and its Reply, now last in history."""
        # The caller went on talking before hearing any of the last reply: one turn with a pause; answer all of it.
        if self.history and self.history[-1].caller_said is not None and not self.history[-1].heard_any():
            text = f"{self.history.pop().caller_said} {text}"
        messages = [{"role": "system", "content": self.settings.system_prompt}]
        for reply in self.history:
            if reply.caller_said is not None:
                messages.append({"role": "user", "content": reply.caller_said})
            messages.append({"role": "assistant", "content": reply.heard_text()})
        messages.append({"role": "user", "content": text})
        self.history.append(Reply(caller_said=text))
        return messages, self.history[-1]

    async def _think(self, messages: list[dict], answer: Reply, turn: Turn,
                     ready: trio.MemorySendChannel[Utterance], nursery: trio.Nursery,
                     tools_called: set[str]) -> None:
        async with ready:
            try:
                text = self.api.without_reasoning(self.api.chat(messages, tools_called, self.log))
                async with aclosing(speakable_pieces(self._marking(text, turn))) as pieces:
                    async for piece in pieces:
                        turn.mark("first_sentence")
                        await ready.send(self._utterance(piece, turn, nursery, answer))
                if not answer.utterances and not tools_called & {HANG_UP, TRANSFER_CALL}:
                    raise ProviderError("LLM: the reply was empty")
            except ProviderError as error:
                self.log(logging.WARNING, "%s", error, error="llm")
                if not answer.utterances:  # never leave the caller in silence
                    await ready.send(self._utterance(LLM_APOLOGY, turn, nursery, answer, "apology"))

    @staticmethod
    async def _marking(tokens: AsyncIterator[str], turn: Turn) -> AsyncIterator[str]:
        async for token in tokens:
            turn.mark("llm_first_token")
            yield token

    def _utterance(self, text: str, turn: Turn, nursery: trio.Nursery, reply: Reply,
                   label: str = "sentence") -> Utterance:
        """Start synthesizing `text` now, as part of `reply`; the utterance plays its audio as it arrives."""
        pcm_in, pcm_out = trio.open_memory_channel[bytes](math.inf)
        nursery.start_soon(self._synthesize, text, turn, pcm_in)
        utterance = Utterance(label, TTS_RATE, pcm_out, text=text)
        reply.utterances.append(utterance)
        return utterance

    async def _synthesize(self, text: str, turn: Turn, pcm: trio.MemorySendChannel[bytes]) -> None:
        async with pcm:
            try:
                async with aclosing(self.api.speech(text)) as chunks:
                    async for chunk in chunks:
                        turn.mark("tts_first_byte")
                        pcm.send_nowait(chunk)
            except ProviderError as error:
                self.log(logging.WARNING, "%s", error, error="tts")
                pcm.send_nowait(trouble_tone())


def make_agent(settings: Settings) -> Agent:
    """With both keys set, the AI agent: Deepgram ears, an OpenAI-compatible brain, OpenAI TTS
    for a mouth. Otherwise the offline echo test: loudness for ears, the caller's own words back."""
    if not settings.uses_ai:
        speech_min_s = settings.barge_in_min_ms / 1000
        transfers = bool(settings.transfer_number)
        return Agent(ears=lambda media_format, listener, _: EnergyEars(media_format, listener, speech_min_s),
                     responder=lambda _: EchoResponder(settings.offline_max_turns, transfers),
                     digit_pause_s=0.3)  # keys typed in a quick run are echoed together, just after it
    # One client for the process: its pool keeps TLS sessions warm between turns. Each call may stream one
    # LLM reply and the speech of PREFETCH + 1 sentences ahead of the one playing (whose speech has usually
    # all come: it comes faster than it plays); httpx's default pool of 100, shared, makes the 34th call's
    # speech wait for a connection. All are kept warm (httpx keeps 20: the rest redo TCP and TLS every turn).
    streams = (1 + 1 + AIResponder.PREFETCH) * settings.max_calls
    pool = httpx.Limits(max_connections=streams, max_keepalive_connections=streams)
    client = httpx.AsyncClient(timeout=httpx.Timeout(settings.openai_timeout_s), limits=pool)
    api = ProviderAPI(settings, client)
    return Agent(ears=lambda media_format, listener, log: DeepgramEars(settings, media_format, listener, log),
                 responder=lambda log: AIResponder(settings, api, log),
                 digit_pause_s=1.0,  # a menu choice, or a number typed: sent to the model after a pause or #
                 client=client)


# ─────────────────────────────────────────────────────────────────────────────
# The call: one WebSocket from Vobiz, one nursery. The inbound task reads frames and feeds
# the ears; the conversation task (converse: the call's life) greets and replies, and speaks
# through the Player, which paces the frames and keeps what the caller heard. Each reply runs
# in a cancel scope, so barge-in is one cancel(): whatever the reply was doing (thinking,
# fetching speech, pacing frames) stops at once. When the socket closes the nursery is
# cancelled and every task of the call ends with it.
# ─────────────────────────────────────────────────────────────────────────────


class Transcript:
    """What was said in one call, logged as one record at its end: turns, keys, a transfer, and each
    agent line, heard or cut off. No audio, no secrets. LOG_FORMAT=json has it as fields."""

    def __init__(self) -> None:
        self.entries: list[dict] = []  # an agent's line is {"utterance": …} until the end: it may yet be heard

    def agent_said(self, utterance: Utterance) -> None:
        self.entries.append({"utterance": utterance})  # as it begins to play

    def cut_off(self) -> None:
        for entry in self.entries:  # a barge-in: whatever had not played yet is lost
            if "utterance" in entry and not entry["utterance"].heard:
                entry.setdefault("cut_off", True)

    def transferred(self, problem: str | None) -> None:
        self.entries.append({"event": "transfer", "outcome": f"failed: {problem}" if problem else "ok"})

    def caller_said(self, turn: Turn) -> None:
        """Words (or, with no speech-to-text, how long they spoke), keys, or why a turn had neither."""
        entry: dict[str, object] = {"who": "caller", "kind": turn.kind}
        if turn.kind == "digits":
            entry["digits"] = turn.digits
        elif turn.text:
            entry["text"] = turn.text
        elif turn.audio:
            entry["seconds"] = round(len(turn.audio) / 2 / turn.rate, 1)
        self.entries.append(entry)

    def log(self, call_id: str, ended_by: str, seconds: float) -> None:
        entries = []
        for entry in self.entries:
            if "utterance" in entry:
                said = entry["utterance"]
                heard = "heard" if said.heard else "cut off" if entry.get("cut_off") else "not heard"
                entry = {"who": "agent", "label": said.label, "text": said.text, "heard": heard}
            entries.append(entry)
        ended = {"ended_by": ended_by, "seconds": round(seconds, 1)}
        summary = " | ".join(self._line(entry) for entry in entries) or "(nothing said)"
        log.info("call %s: transcript (%s after %.1f s): %s", call_id, ended_by, ended["seconds"],
                 summary, extra={"fields": {"call": call_id, "transcript": entries, **ended}})

    @staticmethod
    def _line(entry: dict) -> str:
        if entry.get("event") == "transfer":
            return f"transfer {entry['outcome']}"
        if entry["who"] == "agent":
            return f"agent: {json.dumps(entry['text'], ensure_ascii=False)} ({entry['heard']})"
        if entry["kind"] == "digits":
            return f"caller pressed {' '.join(entry['digits'])}"
        if "text" in entry:
            return f"caller: {json.dumps(entry['text'], ensure_ascii=False)}"
        return f"caller: ({entry['seconds']} s of speech)" if "seconds" in entry else f"({entry['kind']})"


class Player:
    """The agent's voice on one stream: paced playAudio frames, a checkpoint after each utterance,
    and what the caller heard (Vobiz acks a checkpoint once it has played it).

    Pacing keeps at least LEAD_S queued at Vobiz, to ride out network jitter. Late wake-ups (a busy
    event loop) grow the lead to cover them, up to LEAD_MAX_S; on time again, its excess halves every
    LEAD_HALF_LIFE_S. A barge-in's clearAudio flushes the queue, so a longer lead is not longer overlap."""

    LEAD_S = 0.08
    LEAD_MAX_S = 0.40
    LEAD_HALF_LIFE_S = 1.0
    LEAD_SHRINK = 0.5 ** (FRAME_SECONDS / LEAD_HALF_LIFE_S)  # per frame sent
    CLEARED_TIMEOUT_S = 1.0  # clearedAudio can be lost: never wait longer than this

    def __init__(self, send: Callable[[str], Awaitable[None]], log: CallLog, transcript: Transcript):
        self.send = send  # the call's own: a send to a caller who hung up ends the call
        self.log = log
        self.transcript = transcript
        self.outbound: Outbound | None = None  # the stream's frames, from its `start`
        self.play_clock = 0.0  # when Vobiz will have played everything we sent
        self.lead = self.LEAD_S  # how far ahead of Vobiz's playout we send
        self.cleared = trio.Event()  # unset between our clearAudio and Vobiz's clearedAudio
        self.cleared.set()
        self.turn: Turn | None = None  # the turn being answered, for its latency marks
        self.unheard: dict[str, tuple[Utterance, Turn | None, int]] = {}  # checkpoint → (utterance, turn, frames)
        self.acked = trio.Event()  # set (and renewed) whenever a checkpoint is acknowledged
        self.utterances = self.frames = 0

    async def play(self, utterance: Utterance) -> None:
        """Send one utterance as paced playAudio frames, then a checkpoint."""
        self.utterances += 1
        name = f"{utterance.label}-{self.utterances}"  # unique within the call
        turn, first_frame = self.turn, self.frames
        self.transcript.agent_said(utterance)
        encoder = FrameEncoder(utterance.rate)
        async with aclosing(utterance.pcm) as chunks:
            async for pcm in chunks:
                for frame in encoder.encode(pcm):
                    await self.send_frame(frame)
        for frame in encoder.flush():
            await self.send_frame(frame)
        self.unheard[name] = (utterance, turn, self.frames - first_frame)
        await self.send(self.outbound.checkpoint(name))

    def heard(self, checkpoint: str) -> None:
        """Vobiz played `checkpoint`: the one place an utterance becomes heard (all a history keeps)."""
        utterance, turn, frames = self.unheard.pop(checkpoint, (None, None, 0))
        if utterance is not None:
            utterance.heard = True
            self.acked.set()
            self.acked = trio.Event()
        if turn is not None:  # it began playing `frames` frames before this ack, but not before we
            # sent its first frame: a Vobiz that catches up after a stall plays faster than real time.
            began = trio.current_time() - frames * FRAME_SECONDS
            turn.mark("first_frame_heard", max(began, turn.marks.get("first_frame_sent", began)))

    async def until_heard(self, timeout_s: float) -> None:
        """Wait until Vobiz has played everything we sent, or `timeout_s` (an ack can be lost)."""
        with trio.move_on_after(timeout_s):
            while self.unheard:
                await self.acked.wait()

    def interrupt(self, onset: float) -> Turn | None:
        """A barge-in: what was queued is never played nor acked. New audio waits for clearedAudio, or it
        would race the flush and lose its start. Returns the turn being answered, for its latency marks."""
        self.transcript.cut_off()
        self.unheard.clear()
        self.play_clock = trio.current_time()
        self.cleared = trio.Event()
        if self.turn is not None:
            self.turn.mark("barge_in_onset", onset)
        return self.turn

    async def clear_audio(self, turn: Turn | None) -> None:
        await self.send(self.outbound.clear_audio())
        if turn is not None:
            turn.mark("clear_audio_sent")
        self.log(logging.INFO, "barge-in: the caller spoke over the agent, clearAudio sent")

    async def send_frame(self, frame: bytes) -> None:
        if not self.cleared.is_set():
            with trio.move_on_after(self.CLEARED_TIMEOUT_S) as waited:
                await self.cleared.wait()
            if waited.cancelled_caught:
                self.log(logging.WARNING, "no clearedAudio after %.1f s; speaking anyway", self.CLEARED_TIMEOUT_S)
                self.cleared.set()
        # Real time with a lead, never a burst: all that Vobiz has queued, a barge-in must flush.
        now = trio.current_time()
        starts = max(self.play_clock, now)
        self.play_clock = starts + FRAME_SECONDS
        await self.send(self.outbound.play_audio(frame))
        self._follow_lateness(trio.current_time() - now)  # a send is near instant, unless the loop stalls
        if self.turn is not None and "first_frame_sent" not in self.turn.marks:
            self.turn.mark("first_frame_sent")
            self.turn.mark("first_frame_due", starts)  # when it should play: the estimate, until acked
        self.frames += 1
        await self._pace()

    async def _pace(self) -> None:
        """Wait until Vobiz has only `lead` left to play. Two frames go out per wake-up (half the timers
        of one per frame), and how late it comes sets the lead: the next stall of that size is covered."""
        self.lead = self.LEAD_S + (self.lead - self.LEAD_S) * self.LEAD_SHRINK
        wake = self.play_clock - self.lead
        if wake - trio.current_time() < 1.5 * FRAME_SECONDS:
            return  # less than lead + 1.5 frames queued: send the next frame now
        await trio.sleep_until(wake)
        self._follow_lateness(trio.current_time() - wake)

    def _follow_lateness(self, late: float) -> None:
        """A stall delays the wake-up due in it by some of its length: cover half as much again."""
        self.lead = min(self.LEAD_MAX_S, max(self.lead, self.LEAD_S + 1.5 * late))


class Call:
    """One media WebSocket of one call: its tasks (run), what Vobiz sends (listen_to_vobiz),
    what the ears report (speech_started, turn_ended), and its life (converse, end)."""

    BAD_FRAMES_LOGGED = 3  # per kind; the rest are counted in the call's last line
    FAREWELL_ACK_TIMEOUT_S = 5.0  # how long a goodbye may take to play before we stop the stream
    STOP_CLOSE_WAIT_S = 1.0  # after our stop, for Vobiz to close the socket before we do
    TRANSFER_ACK_TIMEOUT_S = 5.0  # how long "connecting you now" may take to play before the transfer
    START_TIMEOUT_S = 5.0  # a socket that has not sent a valid `start` by then holds no slot

    def __init__(self, socket: Websocket, switchboard: Switchboard, call_id: str, *, fresh: bool,
                 ends_in: float, public_base: str):
        self.socket = socket
        self.switchboard = switchboard
        self.call_id = call_id  # the CallUUID this socket's URL was issued for
        self.public_base = public_base  # where Vobiz reaches us (for /transfer)
        self.responder: Responder | None = None  # the conversation, chosen at `start`
        self.fresh = fresh  # the call's first socket (else a reconnect)
        self.opening = "greet"  # set at `start`: or "go on" (a reconnect here), "apologise" (one we can't go on)
        self.start: Start | None = None
        self.caller_bytes_per_s = 1  # set at `start`, from its media format
        self.ears: Ears | None = None
        self.media_flowing = trio.Event()
        self.begun = trio.Event()  # a valid start has arrived
        self.reply_scope: trio.CancelScope | None = None
        self.caller_audio_s = 0.0  # seconds of caller audio read so far, and the earliest
        self.caller_audio_origin = math.inf  # time it could have started: read on time, origin + s = now
        self.turns_in, self.turns_out = trio.open_memory_channel[Turn](4)
        self.keys_in: trio.MemorySendChannel[str] | None = None  # opened at the first key press
        self.bad_frames: Counter[str] = Counter()
        self.turns = self.barge_ins = 0  # for the call's last line (and /metrics)
        self.transcript = Transcript()
        self.player = Player(self.send, self.log, self.transcript)
        self.ended_by = "hang-up"  # until end(reason), a stop frame or a cut says otherwise
        self.began = self.last_media = self.last_speech = trio.current_time()
        self.ends_at = self.began + ends_in  # MAX_CALL_S from the first answer, across reconnects

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as self.nursery:
                self.nursery.start_soon(self.listen_to_vobiz, name=f"call {self.call_id} inbound")
                self.nursery.start_soon(self.converse, name=f"call {self.call_id} conversation")
                self.nursery.start_soon(self.watch_for_silence, name=f"call {self.call_id} idle watch")
        finally:  # the call's last line, its transcript, its count
            bad = ", ".join(f"{kind} ×{n}" for kind, n in self.bad_frames.items())
            dropped = self.ears.dropped if self.ears else 0
            self.log(logging.INFO, "ended by %s after %.1f s: %d turns, %d barge-ins, %d frames sent%s%s",
                     self.ended_by, trio.current_time() - self.began, self.turns,
                     self.barge_ins, self.player.frames, f"; bad frames: {bad}" if bad else "",
                     f"; {dropped} frames dropped on the way to speech-to-text" if dropped else "")
            if self.start is not None:  # else no conversation: the socket was refused or never started
                self.transcript.log(self.call_id, self.ended_by, trio.current_time() - self.began)
            self.switchboard.metrics.count("calls_total", ended=self.ended_by)
            # The player and the ears hold the call's methods, and the call holds them: a reference
            # cycle. Broken, the call's memory goes now, not at Python's next full collection.
            del self.player, self.ears

    # Inbound: everything Vobiz sends. Nothing here waits but for the next frame: acks are seen while talking.

    async def listen_to_vobiz(self) -> None:
        try:
            while True:
                message = await self.socket.receive()
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
        match frame:
            case Media(payload):
                self._hear(payload)
            case Start():
                self._begin(frame)
            case PlayedStream(checkpoint):
                self.player.heard(checkpoint)
            case ClearedAudio():
                self.player.cleared.set()
            case Dtmf(digit):
                self._key_pressed(digit)
            case Stop():
                self.ended_by = "stop frame"
                return True
        return False

    def _begin(self, start: Start) -> None:
        if self.start is not None:
            raise BadFrame("start", f"second start (streamId {_clean(start.stream_id)}) ignored")
        if start.call_id != self.call_id:
            self.switchboard.metrics.count("calls_refused_total", reason="wrong call")
            why = f"start is for call {_clean(start.call_id)}, not the call this URL was issued for"
            return self._cut("refused", why, then="closing")
        self.start = start
        self.begun.set()
        # The responder outlives this Call in the resume window: give it a log that does not hold the Call.
        detached_log = partial(log_for_call, self.call_id, self.switchboard.metrics)
        self.responder, known = self.switchboard.conversation(start.call_id, detached_log)
        # A reconnect where the conversation is unknown (another process, a restart) cannot go on: it says so.
        self.opening = "go on" if known else "greet" if self.fresh else "apologise"
        self.player.outbound = Outbound(start.stream_id)
        self.caller_bytes_per_s = start.media_format.rate * start.media_format.sample_width
        self.ears = self.switchboard.agent.ears(start.media_format, self, self.log)
        self.nursery.start_soon(self.ears.run, name=f"call {self.call_id} ears")
        self.log(logging.INFO, "stream %s %s, caller audio %s at %d Hz", _clean(start.stream_id),
                 {"greet": "started", "go on": "reconnected: the conversation goes on",
                  "apologise": "reconnected here without its conversation: the caller hears we were cut off"}
                 [self.opening], start.media_format.encoding, start.media_format.rate)

    def _hear(self, payload: bytes) -> None:
        if self.ears is None:
            raise BadFrame("early", "media before start")
        if len(payload) % self.start.media_format.sample_width:
            raise BadFrame("length", f"media payload of {len(payload)} bytes is not whole samples")
        self.last_media = trio.current_time()  # only real caller audio keeps a call alive
        self.ears.hear(payload)
        self.media_flowing.set()
        self.caller_audio_s += len(payload) / self.caller_bytes_per_s
        self.caller_audio_origin = min(self.caller_audio_origin, self.last_media - self.caller_audio_s)

    def behind_s(self) -> float:
        """How far behind real time we read the caller's audio (Vobiz sends it in real time)."""
        return self.last_media - self.caller_audio_s - self.caller_audio_origin if self.caller_audio_s else 0.0

    def _key_pressed(self, key: str) -> None:
        self.log(logging.INFO, "caller pressed %s", key)
        if self.keys_in is None:
            self.keys_in, keys_out = trio.open_memory_channel[str](32)
            self.nursery.start_soon(self.collect_keys, keys_out, name=f"call {self.call_id} keypad")
        try:
            self.keys_in.send_nowait(key)
        except trio.WouldBlock:
            self._complain("keypad", "key press dropped: too many are waiting")

    async def collect_keys(self, keys: trio.MemoryReceiveChannel[str]) -> None:
        """Key presses → "digits" turns: the keys until '#' (not one of them) or a pause of `digit_pause_s`."""
        async for key in keys:
            digits = key
            while digits[-1] != "#":
                with trio.move_on_after(self.switchboard.agent.digit_pause_s) as waited:
                    digits += await keys.receive()
                if waited.cancelled_caught:
                    break
            digits = digits.removesuffix("#") or "#"  # a lone '#' is a key pressed, too
            self.turn_ended(Turn(kind="digits", digits=digits, text=f"[the caller pressed {' '.join(digits)}]"))

    # What the ears report.

    def speech_started(self, onset: float) -> None:
        self.log(logging.DEBUG, "caller started speaking")
        self.last_speech = trio.current_time()
        if self.last_speech < self.player.play_clock:  # Vobiz is still playing: barge-in, stop and flush
            self.barge_ins += 1
            self.switchboard.metrics.count("barge_ins_total")
            if self.reply_scope is not None:
                self.reply_scope.cancel()
            turn = self.player.interrupt(onset)
            self.nursery.start_soon(self.player.clear_audio, turn)
        elif self.reply_scope is not None:
            # Still thinking, nothing heard: the caller had only paused. The responder hears it all as one turn.
            self.log(logging.INFO, "the caller went on talking: reply dropped before it was heard")
            self.reply_scope.cancel()

    def turn_ended(self, turn: Turn) -> None:
        self.log(logging.DEBUG, "turn ended (%s)", turn.kind)
        if turn.kind == "speech":
            self.last_speech = trio.current_time()
        try:
            self.turns_in.send_nowait(turn)
        except trio.WouldBlock:
            self.log(logging.WARNING, "dropped a turn: too many are waiting for a reply")
        except trio.ClosedResourceError:
            pass  # the call is ending: a goodbye is on its way, or a person answers now

    # The call's life: greet, answer turns one at a time, say goodbye, stop. Whatever ends a call from our
    # side (hang_up, the caller's silence, MAX_CALL_S, a drain, a transfer) calls end(reason).

    async def converse(self) -> None:
        # Audio sent before the caller's audio flows is lost on real calls.
        await self.media_flowing.wait()
        if self.opening == "greet":
            await self.respond(self.responder.greet)
        elif self.opening == "apologise":
            await self.respond(self.responder.resume)
        async for turn in self.turns_out:  # until end() closes the turns (those already in are answered)
            outcome = await self.answer(turn)
            if outcome == HANG_UP:
                self.log(logging.INFO, "the agent ends the call")
                self.end("agent")
            elif outcome == TRANSFER_CALL and await self.transfer():
                return  # Vobiz moves the call and closes this stream: no goodbye, no stop
        # Wait (a little) for Vobiz to play the farewell: a `stop` drops whatever is queued, last words included.
        await self.respond(partial(self.responder.farewell, self.ended_by))
        await self.player.until_heard(self.FAREWELL_ACK_TIMEOUT_S)
        await self.send(self.player.outbound.stop())
        # Vobiz answers a stop by closing the socket (1000): closing ours at that same moment races
        # it, and Hypercorn can then drop the close frame (the peer sees 1006). So wait a little.
        await trio.sleep(self.STOP_CLOSE_WAIT_S)
        self.nursery.cancel_scope.cancel()

    def end(self, reason: str) -> None:
        """End the call from our side for `reason` (its last log line names it): stop talking, take no
        more turns, so `converse` goes on to the goodbye. The first reason wins, but a transfer wins over any."""
        if self.ended_by == "hang-up" or reason == "transfer":
            self.ended_by = reason
            if self.reply_scope is not None:
                self.reply_scope.cancel()
            self.turns_in.close()

    async def answer(self, turn: Turn) -> str | None:
        self.player.turn = turn
        self.transcript.caller_said(turn)
        if turn.kind == "speech":
            self.turns += 1
            self.switchboard.metrics.count("turns_total")
        outcome = await self.respond(partial(self.responder.reply, turn))
        self._log_latency(turn)
        self.player.turn = None
        return outcome

    async def transfer(self) -> bool:
        """Say so, let it play (a little), ask Vobiz to move the call to our /transfer XML. True if it did."""
        await self.respond(partial(self.responder.announce, "transfer", TRANSFER_LINE))
        await self.player.until_heard(self.TRANSFER_ACK_TIMEOUT_S)
        api = VobizAPI(self.switchboard.settings)
        problem = await api.transfer(self.call_id, self.public_base + "/transfer")
        self.switchboard.metrics.count("transfers_total", outcome="failed" if problem else "ok")
        self.transcript.transferred(problem)
        if problem is None:
            self.log(logging.INFO, "transfer: Vobiz is moving the call to a person")
            self.end("transfer")
            return True
        self.log(logging.WARNING, "transfer failed (%s): the conversation goes on", problem, error="transfer")
        await self.respond(partial(self.responder.announce, "apology", TRANSFER_APOLOGY))
        return False

    async def respond(self, responder: Callable[[Play], Awaitable[object]]) -> object:
        """Run one reply in a cancel scope, which barge-in (or hang-up) cancels. None if it was cut off."""
        result = None
        with trio.CancelScope() as self.reply_scope:
            result = await responder(self.player.play)
        self.reply_scope = None
        return result

    async def send(self, message: str) -> None:
        # Hypercorn shields its socket writes, so no deadline of ours could cut this short;
        # the kernel's (SEND_TIMEOUT_S, see ServerConfig) aborts a peer that stopped reading.
        try:
            await self.socket.send(message)
        except ClientDisconnectedError:
            self.nursery.cancel_scope.cancel()

    # The watchdog: a call that carries nothing, or goes on too long, is ended.

    async def watch_for_silence(self) -> None:
        """No valid `start` soon, or no valid media for IDLE_TIMEOUT_S: a stuck or hostile peer, cut at once.
        SILENCE_TIMEOUT_S after the caller or the agent last spoke, or MAX_CALL_S: a goodbye, then `stop`."""
        settings = self.switchboard.settings
        with trio.move_on_at(self.began + min(self.START_TIMEOUT_S, settings.idle_timeout_s)):
            await self.begun.wait()
        if self.start is None:
            return self._cut("no start", "no valid start frame in time")
        while True:
            now, idle_at = trio.current_time(), self.last_media + settings.idle_timeout_s
            if now >= idle_at:
                return self._cut("idle timeout", f"no media from Vobiz for {settings.idle_timeout_s:.0f} s")
            wake = idle_at
            if self.ended_by == "hang-up":  # not ending yet: the caller's silence, the time limit
                quiet_until = max(self.last_speech, self.player.play_clock) + settings.silence_timeout_s
                if now >= self.ends_at or now >= quiet_until:
                    over = now >= self.ends_at
                    self.log(logging.INFO, "%s: saying goodbye", "the call reached MAX_CALL_S" if over else
                             f"the caller has been silent for {settings.silence_timeout_s:.0f} s")
                    self.end("time limit" if over else "silence")
                    continue
                wake = min(idle_at, quiet_until, self.ends_at)
            await trio.sleep_until(wake)

    def replaced(self) -> None:
        """A reconnect of this call is at the door, and this socket has gone quiet: it is dead."""
        self._cut("reconnect", f"no media for {trio.current_time() - self.last_media:.1f} s and a reconnect came")

    def _cut(self, reason: str, why: str, then: str = "ending the call") -> None:
        self.ended_by = reason
        self.log(logging.WARNING, "%s: %s", why, then)
        self.nursery.cancel_scope.cancel()

    # The call's log: every line names the call.

    def log(self, level: int, message: str, *args: object, error: str | None = None) -> None:
        """A line in the call's log; `error` also counts it in /metrics under that kind."""
        log_for_call(self.call_id, self.switchboard.metrics, level, message, *args, error=error)

    def _complain(self, kind: str, detail: str) -> None:
        self.bad_frames[kind] += 1
        self.switchboard.metrics.count("errors_total", kind=f"bad_frame_{kind}")
        if self.bad_frames[kind] <= self.BAD_FRAMES_LOGGED:
            self.log(logging.WARNING, "ignored a bad frame: %s", _clean(detail, 200))

    def _log_latency(self, turn: Turn) -> None:
        """One line per turn: how long each step took, from the end of the caller's speech."""
        if turn.kind != "speech" or not turn.speech_ended:
            return
        marks = dict(turn.marks)
        heard, due = marks.pop("first_frame_heard", None), marks.pop("first_frame_due", None)
        onset, cleared = marks.pop("barge_in_onset", None), marks.pop("clear_audio_sent", None)
        steps: dict[str, int | bool] = {step: round((at - turn.speech_ended) * 1000) for step, at in marks.items()}
        if heard or due:
            latency = (heard or due) - turn.speech_ended
            self.switchboard.metrics.turn_latency.observe(latency)
            steps["first_frame_heard"] = round(latency * 1000)
            steps["heard_is_estimate"] = heard is None
        if onset and cleared:
            steps["barge_in"] = round((cleared - onset) * 1000)
        text = " ".join(f"{step}={value}ms" for step, value in steps.items() if not isinstance(value, bool))
        log.info("call %s: turn %d latency: %s%s", self.call_id, self.turns, text,
                 " (heard: estimated)" if steps.get("heard_is_estimate") else "",
                 extra={"fields": {"call": self.call_id, "turn": self.turns, **steps}})


def log_for_call(call_id: str, metrics: Metrics, level: int, message: str, *args: object,
                 error: str | None = None) -> None:
    log.log(level, "call %s: " + message, call_id, *args)
    if error:
        metrics.count("errors_total", kind=error)


# ─────────────────────────────────────────────────────────────────────────────
# The web app: what the calls of one process share (metrics, the measured load, the
# switchboard), then Vobiz's webhooks and the media WebSocket, on one Quart-Trio app.
# ─────────────────────────────────────────────────────────────────────────────


class Metrics:
    """The app's Prometheus metrics (/metrics), in a registry per app so that servers sharing a process
    (the tests start many) keep their own counts. `name` is the metric's name without `vobiz_agent_`."""

    HELP: ClassVar[dict[str, str]] = {
        "calls_total": "Calls ended, by who or what ended them",
        "calls_refused_total": "Calls and media sockets refused, by reason",
        "webhooks_refused_total": "Webhooks other than /answer refused, by reason",
        "turns_total": "Caller turns answered",
        "barge_ins_total": "Times the caller interrupted the agent",
        "errors_total": "Provider failures and bad frames, by kind",
        "calls_live": "Calls in progress",
        "draining": "1 while shutting down (no new calls), else 0",
    }

    def __init__(self) -> None:
        self.registry = prometheus_client.CollectorRegistry()
        self.counters: dict[str, prometheus_client.Counter] = {}
        self.gauges: dict[str, prometheus_client.Gauge] = {}
        self.turn_latency = prometheus_client.Histogram(
            "vobiz_agent_turn_latency_seconds", "End of the caller's speech to the first agent audio heard",
            buckets=(0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0), registry=self.registry)

    def count(self, name: str, **labels: str) -> None:
        if name not in self.counters:  # its label names are fixed by its first use
            self.counters[name] = prometheus_client.Counter(
                f"vobiz_agent_{name}", self._help(name), labelnames=sorted(labels), registry=self.registry)
        counter = self.counters[name]
        (counter.labels(**labels) if labels else counter).inc()

    def set_gauge(self, name: str, value: float) -> None:
        if name not in self.gauges:
            self.gauges[name] = prometheus_client.Gauge(f"vobiz_agent_{name}", self._help(name),
                                                        registry=self.registry)
        self.gauges[name].set(value)

    def _help(self, name: str) -> str:
        return self.HELP.get(name, name.replace("_", " "))


prometheus_client.disable_created_metrics()  # no `_created` series beside every counter: nobody reads them


class LoadMonitor:
    """How loaded this process is, measured: what admission decides on, and /health shows. Past one
    core's capacity every live call degrades at once (gappy audio, late replies), so a new call must be
    refused *before* that. Over the last WINDOW_S:
    - lag: how late a task that wakes every TICK_S woke (the worst): every call's timers wait in that queue.
    - CPU: the process's share of one core. A new call must keep it under the threshold, each live call
      counted at the cost per call measured while most calls were settled, so a burst of new ones
      (which have cost only part of the window) does not look cheap.
    - behind: how far behind real time the median call reads its caller's audio (not one bad network).
    And over the last second, starts: a burst of set-ups stalls the loop before the CPU figure shows it."""

    TICK_S = 0.05
    WINDOW_S = 3.0
    LEARN_FROM_CALLS = 5

    def __init__(self, settings: Settings, calls: set[Call], expected: dict[str, float], metrics: Metrics):
        self.settings, self.calls, self.metrics = settings, calls, metrics
        self.expected = expected  # answered calls whose socket is on the way: they will cost as much
        self.starts: deque[float] = deque()  # when each call of the last second was answered
        self.wakes: deque[tuple[float, float]] = deque()  # (when, how late)
        self.cpu_samples: deque[tuple[float, float]] = deque()  # (when, process CPU seconds)
        self.ended: deque[tuple[float, float]] = deque()  # (began, ended) of calls that ended in the window
        self.lag_s = self.cpu = self.behind_s = 0.0
        self.cpu_per_call = 1 / settings.max_calls  # until measured: MAX_CALLS calls fill a core
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
        start = now - self.WINDOW_S
        for window in (self.wakes, self.cpu_samples):
            while window and window[0][0] < start:
                window.popleft()
        while self.ended and self.ended[0][1] < start:
            self.ended.popleft()
        self.lag_s = max((late for _, late in self.wakes), default=0.0)
        self.cpu_samples.append((now, time.process_time()))
        (began, cpu_then), (_, cpu_now) = self.cpu_samples[0], self.cpu_samples[-1]
        self.cpu = (cpu_now - cpu_then) / (now - began) if now > began else 0.0
        # How many calls the window's CPU was spent on: one live for a second of it counts 1/3.
        live = sum(now - max(call.began, start) for call in self.calls) / self.WINDOW_S
        gone = sum(end - max(began, start) for began, end in self.ended) / self.WINDOW_S
        new = sum(call.began > start for call in self.calls)
        # Learnt only from settled calls: new ones cost more at first, a window of calls that have
        # gone is mostly idle time, and a handful would each carry the process's own upkeep.
        if live >= self.LEARN_FROM_CALLS and new <= len(self.calls) / 4 and gone <= live / 4:
            self.cpu_per_call = self.cpu / (live + gone)
        behind = sorted(call.behind_s() for call in self.calls)
        self.behind_s = behind[len(behind) // 2] if behind else 0.0
        for name, value in (("event_loop_lag_seconds", self.lag_s), ("cpu_share", self.cpu),
                            ("cpu_share_per_call", self.cpu_per_call), ("inbound_behind_seconds", self.behind_s)):
            self.metrics.set_gauge(name, value)

    def overload(self) -> str | None:
        """Why the measured load leaves no room for one more call, or None."""
        settings, calls = self.settings, len(self.calls) + len(self.expected)
        if self.lag_s * 1000 > settings.load_max_lag_ms:
            return "overloaded: event loop late"
        # The CPU now, or what the live calls will cost once none of them is new, plus one more call.
        if max(self.cpu, self.cpu_per_call * calls) + self.cpu_per_call > settings.load_max_cpu:
            return "overloaded: CPU"
        if self.behind_s * 1000 > settings.load_max_behind_ms:
            return "overloaded: calls behind"
        # Setting a call up (answer, sockets, a greeting's speech) costs a burst of CPU at once: many
        # in one second stall the loop before the CPU figure shows it, and every live call hears it.
        while self.starts and self.starts[0] < trio.current_time() - 1.0:
            self.starts.popleft()
        if len(self.starts) >= settings.load_max_starts_per_s:
            return "overloaded: calls starting"
        return None

    def figures(self) -> dict[str, float]:
        return {"event_loop_lag_ms": round(self.lag_s * 1000, 1), "cpu": round(self.cpu, 3),
                "cpu_per_call": round(self.cpu_per_call, 4),
                "inbound_behind_ms": round(self.behind_s * 1000, 1)}


class Switchboard:
    """What the calls of one process share: the agent, the live calls, their conversations (kept a
    while after a socket closes, so a Vobiz reconnect with the same callId goes on), the counters,
    and whether we are draining. A call holds a slot from /answer on, so a burst of answers cannot
    overshoot MAX_CALLS; a slot whose socket never comes is released after SOCKET_WAIT_S."""

    RESUME_WINDOW_S = 120.0
    SOCKET_WAIT_S = 10.0  # Vobiz opens the socket within a second or two of our answer
    DEAD_SOCKET_S = 1.0  # Vobiz sends media every 20 ms: a socket quiet this long is a dead one

    def __init__(self, settings: Settings, agent: Agent):
        self.settings, self.agent = settings, agent
        self.calls: set[Call] = set()
        self.emptied = trio.Event()
        self.emptied.set()
        self.conversations: dict[str, tuple[Responder, float]] = {}  # callId → (responder, last seen)
        self.expected: dict[str, float] = {}  # callId → until when its answered socket is waited for
        self.hung_up: set[str] = set()  # live calls Vobiz has told us are over
        self.metrics = Metrics()
        self.load = LoadMonitor(settings, self.calls, self.expected, self.metrics)
        self.draining = False

    def __len__(self) -> int:
        return len(self.calls)

    def busy(self) -> str | None:
        """Why a new call can't be taken now, or None."""
        if self.draining:
            return "draining"
        self._forget_old()
        if len(self.calls) + len(self.expected) >= self.settings.max_calls:
            return "busy"
        return self.load.overload()

    def holds(self, call_id: str) -> bool:
        """Is this call live, expected, or resumable here? Then a new /answer for it is not a new call."""
        self._forget_old()
        return self.live(call_id) or call_id in self.expected or call_id in self.conversations

    def issue_media_url(self, call_id: str, base: str) -> str:
        """The media WebSocket URL for one answer of one call; its slot is held until the socket comes (or not)."""
        token = StreamToken(self.settings.stream_secret).issue(call_id)
        self.expected[call_id] = trio.current_time() + self.SOCKET_WAIT_S
        self.load.starts.append(trio.current_time())
        return base.replace("http", "ws", 1) + f"/ws/{call_id}/{token}"  # http→ws, https→wss

    def admit(self, call_id: str, token: str, now: float) -> tuple[str | None, int, bool]:
        """At a socket's door, before it is accepted: (why it is refused or None, the HTTP status that
        says so, whether this process answered the call). Its URL must carry a valid token for the call.
        While a socket of the call is live, another is refused; but after a network drop the old one may
        never see a FIN: one without media for DEAD_SOCKET_S makes way for the reconnect."""
        if not CALL_ID_CHARACTERS.issuperset(call_id) or len(call_id) > 64:
            return "bad call id", 403, False
        lifetime_s = self.settings.max_call_s + STREAM_URL_MARGIN_S  # valid as long as the call may last
        if problem := StreamToken(self.settings.stream_secret).refusal(call_id, token, now, lifetime_s):
            return problem, 403, False
        for call in [call for call in self.calls if call.call_id == call_id]:
            if trio.current_time() - call.last_media < self.DEAD_SOCKET_S:
                return "already connected", 409, False
            call.replaced()
            return None, 200, False  # it takes over the old socket's slot
        self._forget_old()
        if self.expected.pop(call_id, None) is not None:
            return None, 200, True  # its slot was taken at /answer
        if self.draining and call_id in self.conversations:
            return None, 200, False  # a reconnect of a call we hold: its conversation goes on here
        return self.busy(), 503, False

    def add(self, call: Call) -> None:
        if not self.calls:
            self.emptied = trio.Event()
        self.calls.add(call)

    def conversation(self, call_id: str, log: CallLog) -> tuple[Responder, bool]:
        """The call's responder, and whether it is the one it had before a reconnect (else a new one)."""
        self._forget_old()
        resumed = call_id in self.conversations
        responder = self.conversations.pop(call_id)[0] if resumed else self.agent.responder(log)
        self.conversations[call_id] = (responder, trio.current_time())  # last: the dict stays in time order
        return responder, resumed

    def remove(self, call: Call) -> None:
        self.calls.discard(call)
        self.load.ended.append((call.began, trio.current_time()))
        self._forget_old()
        # Only a socket that closed on us may come back (or has: a reconnect replaced it); not a call
        # we or a stop ended, or that Vobiz already said is over (its hangup webhook may come first).
        over = call.call_id in self.hung_up
        self.hung_up.discard(call.call_id)
        if call.responder is not None and call.ended_by in ("hang-up", "reconnect") and not over:
            self.conversations.pop(call.call_id, None)  # re-inserted last: the dict stays in time order
            self.conversations[call.call_id] = (call.responder, trio.current_time())
        else:
            self.forget(call.call_id)
        if not self.calls:
            self.emptied.set()

    def forget(self, call_id: str) -> None:
        """The call is over for good (Vobiz said so, or we ended it): no reconnect will resume it, and
        a socket it never opened holds no slot (a caller may hang up before the stream connects)."""
        if self.live(call_id):
            self.hung_up.add(call_id)  # its socket has yet to close: forget it then
        else:
            self.conversations.pop(call_id, None)
            self.expected.pop(call_id, None)

    def live(self, call_id: str) -> bool:
        return any(call.call_id == call_id for call in self.calls)

    def _forget_old(self) -> None:
        """Release the slots of answers whose socket never came; drop conversations unseen for RESUME_WINDOW_S."""
        now = trio.current_time()
        for call_id, until in list(self.expected.items()):
            if until < now:
                del self.expected[call_id]
                # Its socket may have gone to another replica: nothing to warn about, by itself.
                log.info("call %s: answered, but no media socket came here: slot released", call_id)
                self.metrics.count("answers_without_socket_total")
        live = {call.call_id for call in self.calls}
        for call_id, (_, seen) in list(self.conversations.items()):
            if seen >= now - self.RESUME_WINDOW_S:
                break  # the dict is in time order: the rest are newer
            if call_id not in live:
                del self.conversations[call_id]

    async def wait_until_empty(self) -> None:
        await self.emptied.wait()

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


WEBHOOK_PATHS = ("/answer", "/hangup", "/stream-status", "/ring", "/recording", "/transfer")
WEBHOOK_MAX_BYTES = 8 * 1024  # Vobiz posts forms of well under 1 KiB
CALL_ID_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")
XML = {"Content-Type": "application/xml"}  # the headers of a webhook's XML answer


def create_app(settings: Settings) -> QuartTrio:
    """Vobiz's webhooks, health and metrics, the media WebSocket, and the softphone (settings.serves_phone)."""
    app = QuartTrio(__name__)
    app.switchboard = switchboard = Switchboard(settings, make_agent(settings))
    app.config["MAX_CONTENT_LENGTH"] = WEBHOOK_MAX_BYTES  # Vobiz's forms are small: a bigger body gets 413
    app.config["BODY_TIMEOUT"] = settings.http_read_timeout_s
    app.webhook_guard = WebhookGuard(settings.vobiz_verify_signatures, settings.vobiz_auth_token,
                                     settings.vobiz_parent_auth_token)
    app.before_request(check_signature)
    for path in WEBHOOK_PATHS:  # Vobiz may use GET or POST; the webhooks but two only tell us something
        view = {"/answer": answer, "/transfer": transfer}.get(path, notice)
        app.add_url_rule(path, view_func=view, methods=["GET", "POST"])
    app.add_url_rule("/health", view_func=health)
    app.add_url_rule("/metrics", view_func=prometheus_metrics)
    app.add_websocket("/ws/<call_id>/<token>", view_func=media_stream)
    if settings.serves_phone:
        app.add_url_rule("/phone", view_func=phone)
        app.add_url_rule("/phone/call", view_func=phone_call, methods=["POST"])

    @app.before_serving
    async def start_load_monitor() -> None:
        app.add_background_task(switchboard.load.run)

    @app.after_serving
    async def release_agent() -> None:
        switchboard.load.scope.cancel()  # a background task: it would hold shutdown up
        if client := switchboard.agent.client:
            await client.aclose()

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


async def answer() -> Response | tuple[bytes, int, dict[str, str]]:
    switchboard, params = current_app.switchboard, await _webhook_params()
    if params.get("Event") == "Hangup":  # the answer URL doubles as hangup URL when none is set
        return await notice()
    call_id = params.get("CallUUID", "")
    if not call_id or len(call_id) > 64 or not CALL_ID_CHARACTERS.issuperset(call_id):
        log.warning("answer without a usable CallUUID (%s): refused", _clean(call_id) or "none")
        return Response("a CallUUID is required\n", 400)
    if switchboard.holds(call_id):  # knowing a CallUUID must not be a way into its conversation
        log.warning("call %s: a second answer for a call that is live or resumable here: refused", call_id)
        switchboard.metrics.count("calls_refused_total", reason="duplicate")
        return BUSY_XML, 200, XML
    if reason := switchboard.busy():
        log.warning("call %s: refused (%s), the caller hears a busy tone", call_id, reason)
        switchboard.metrics.count("calls_refused_total", reason=reason)
        # Draining, this replica is going away, not the service: 503 tells a load balancer
        # (and Vobiz, which retries) to try another replica. Full is a real "busy": 200.
        return BUSY_XML, 503 if reason == "draining" else 200, XML
    settings = switchboard.settings
    base = settings.public_url or _request_base()
    media_url = switchboard.issue_media_url(call_id, base)
    log.info("call %s: answering, %s → %s (%s)", call_id, _clean(params.get("From")),
             _clean(params.get("To")), _clean(params.get("Direction")))
    return stream_xml(media_url, base + "/stream-status", settings.stream_max_retries,
                      base + "/recording" if settings.record_calls else None), 200, XML


# The recording's URL, under the names Plivo-derived platforms have used for it.
RECORDING_URL_FIELDS = ("RecordUrl", "RecordingUrl", "RecordFile", "recording_url")


async def notice() -> tuple[bytes, int, dict[str, str]]:
    """The webhooks that only tell us something: each is one line in the log."""
    params = await _webhook_params()
    call_id = _clean(params.get("CallUUID"))
    match request.path:
        case "/hangup" | "/answer":  # /answer: its Event=Hangup, when the call has no hangup URL
            log.info("call %s: hung up after %s s, cause %s (%s), by %s", call_id, _clean(params.get("Duration")),
                     _clean(params.get("HangupCause")), _clean(params.get("HangupCauseName")),
                     _clean(params.get("HangupSource")))
            current_app.switchboard.forget(params.get("CallUUID", ""))  # the call is over: nothing to resume
        case "/ring":  # an outbound call's ring_url: the callee's phone is ringing
            log.info("call %s: ringing %s", call_id, _clean(params.get("To")))
        case "/stream-status":
            fields = " ".join(f"{key}={_clean(params[key])}" for key in ("Name", "Error") if params.get(key))
            log.info("call %s: stream %s %s %s", call_id, _clean(params.get("StreamID")),
                     _clean(params.get("Event")), fields)
        case "/recording":  # <Record>'s action and callback: where the call's recording is. Fetching
            # it needs the account's X-Auth-ID/X-Auth-Token, so the URL alone gives nothing away.
            url = _clean(next((params[key] for key in RECORDING_URL_FIELDS if params.get(key)), ""), 300)
            recording_id = _clean(params.get("RecordingID"))
            if url:
                log.info("call %s: recording %s (%s s): %s", call_id, recording_id,
                         _clean(params.get("RecordingDuration", "?")), url,
                         extra={"fields": {"call": call_id, "recording_url": url, "recording_id": recording_id}})
            else:
                log.info("call %s: recording started", call_id)
    return EMPTY_XML, 200, XML  # nothing for the call to do (<Record redirect="false">)


async def transfer() -> tuple[bytes, int, dict[str, str]]:
    """Where a transfer sends the call (the aleg_url): dial the person. The caller ID is ours on
    this call unless TRANSFER_CALLER_ID says otherwise: carriers refuse caller IDs we don't own."""
    settings, params = current_app.switchboard.settings, await _webhook_params()
    if not settings.transfer_number:
        log.warning("call %s: /transfer, but TRANSFER_NUMBER is not set", _clean(params.get("CallUUID")))
        return EMPTY_XML, 200, XML
    log.info("call %s: dialling TRANSFER_NUMBER", _clean(params.get("CallUUID")))
    response = ET.Element("Response")
    dial = ET.SubElement(response, "Dial")
    ours = params.get("From") if params.get("Direction") == "outbound" else params.get("To")
    if caller_id := settings.transfer_caller_id or ours:
        dial.set("callerId", caller_id)
    ET.SubElement(dial, "Number").text = settings.transfer_number
    return ET.tostring(response, encoding="utf-8", xml_declaration=True), 200, XML


# The browser softphone: phone.html plays Vobiz's part (microphone → 20 ms μ-law frames, playAudio →
# speaker), so anyone can call the agent without a phone number. It asks /phone/call, not /answer (so
# it works when webhooks must be signed), for a media URL issued as /answer issues them: the same token
# check, Call, logs, metrics and limits.


async def phone() -> Response:
    """The page, phone.html: beside this file in a checkout; where `pip install` put it otherwise
    (pyproject.toml's data-files, found through the package's list of installed files)."""
    page = Path(__file__).with_name("phone.html")
    if not page.is_file():
        with suppress(importlib.metadata.PackageNotFoundError):
            installed = importlib.metadata.files("vobiz-agent") or ()
            page = next((file.locate() for file in installed if file.name == "phone.html"), page)
    if not page.is_file():
        log.warning("GET /phone: phone.html is not installed beside vobiz_agent.py or with the package")
        return Response("phone.html is not installed\n", 404)
    return Response(page.read_bytes(), content_type="text/html; charset=utf-8")


async def phone_call() -> tuple[dict, int]:
    """The softphone's incoming call: a new CallUUID and its media URL, on the page's own origin."""
    switchboard = current_app.switchboard
    if reason := switchboard.busy():
        log.warning("softphone call refused (%s)", reason)
        switchboard.metrics.count("calls_refused_total", reason=reason)
        return {"error": reason}, 503
    call_id = str(uuid.uuid4())
    log.info("call %s: answering the browser softphone at %s", call_id, _clean(request.remote_addr))
    return {"callId": call_id, "mediaUrl": switchboard.issue_media_url(call_id, _request_base())}, 200


async def health() -> tuple[dict, int]:
    switchboard = current_app.switchboard
    # Overloaded is still 200: the process is healthy, it only takes no new calls for now.
    load = {**switchboard.load.figures(), "refusing": switchboard.load.overload()}
    report = {"status": "draining" if switchboard.draining else "ok", "calls": len(switchboard), "load": load}
    if warning := switchboard.settings.open_door_warning:
        report["warning"] = warning
    return report, 503 if switchboard.draining else 200


async def prometheus_metrics() -> Response:
    switchboard = current_app.switchboard
    switchboard.metrics.set_gauge("calls_live", len(switchboard))
    switchboard.metrics.set_gauge("draining", int(switchboard.draining))
    metrics = prometheus_client.generate_latest(switchboard.metrics.registry)
    return Response(metrics, content_type=prometheus_client.CONTENT_TYPE_LATEST)


async def media_stream(call_id: str, token: str) -> Response | None:
    """The media WebSocket. Checked before it is accepted (a refused peer gets an HTTP status, not a
    call): the URL's MAC, that no socket of this call is live, and room for it (MAX_CALLS, draining)."""
    switchboard, now = current_app.switchboard, time.time()
    problem, status, answered_here = switchboard.admit(call_id, token, now)
    if problem:
        log.warning("refused a media WebSocket for call %s from %s: %s", _clean(call_id),
                    _clean(websocket.remote_addr), problem)
        switchboard.metrics.count("calls_refused_total", reason="token" if status == 403 else problem)
        return Response(f"{problem}\n", status)
    if "audio.drachtio.org" in websocket.requested_subprotocols:  # mod_audio_fork's: Vobiz may offer it
        await websocket.accept(subprotocol="audio.drachtio.org")  # and a client that offers one may insist
    issued = StreamToken.issued_at(token)
    fresh = answered_here or now - issued < Switchboard.SOCKET_WAIT_S  # its first socket, not a reconnect
    # The socket itself, not Quart's context-local proxy to it: the call sends and receives
    # fifty frames a second each way, and through the proxy each would look the socket up again.
    call = Call(websocket._get_current_object(), switchboard, call_id, fresh=fresh,
                ends_in=issued + switchboard.settings.max_call_s - now,
                public_base=switchboard.settings.public_url or _request_base(websocket))
    switchboard.add(call)
    try:
        await call.run()
    except Exception as error:  # a bug, not bad input: ours to log, never Quart's (it logs the raw path)
        log.error("call %s: ended by an internal error: %s", _clean(call_id), _clean(_describe(error)),
                  exc_info=error)
    except BaseExceptionGroup as group:
        if group.split(trio.Cancelled)[1] is not None:
            raise
        # A hang-up: Quart cancelled the route, and the call's nursery raised a group of Cancelled.
        # Quart's handler keeps a group it catches in a reference cycle, and the call's frames with
        # it, until Python's next full collection; a bare Cancelled passes through it.
        await trio.lowlevel.checkpoint()  # the route is cancelled: this raises a bare Cancelled
        raise
    finally:
        switchboard.remove(call)
    return None


async def _webhook_params() -> dict[str, str]:
    """Vobiz posts a form, or sends the same fields in the query string with GET."""
    params = request.args.to_dict()
    if request.method == "POST":
        params.update((await request.form).to_dict())
    return params


def _request_base(incoming=request) -> str:
    """The public base URL as the client (a webhook, or the media WebSocket: ws → http) sees it through a proxy."""
    proto = incoming.headers.get("X-Forwarded-Proto", incoming.scheme).split(",")[0].strip()
    host = incoming.headers.get("X-Forwarded-Host", incoming.host).split(",")[0].strip()
    proto = {"ws": "http", "wss": "https"}.get(proto, proto)
    return f"{proto}://{host}"


# ─────────────────────────────────────────────────────────────────────────────
# The command line: logging, Hypercorn's settings, the banner, the flags, `vobiz-agent call`
# (through VobizAPI), and serving until a signal.
# ─────────────────────────────────────────────────────────────────────────────

MAX_MESSAGE_BYTES = 1024 * 1024  # Hypercorn closes a socket that sends more; we ignore > 64 KiB
SEND_TIMEOUT_S = 5  # a peer that takes none of our bytes for this long is cut off by the kernel


class JsonLogFormatter(logging.Formatter):
    """LOG_FORMAT=json: one JSON object per line; structured fields (a turn's latency) merged in."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name,
                 "message": record.getMessage()}
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class ServerConfig(HypercornConfig):
    """Hypercorn's settings, plus a deadline on every send. Hypercorn shields its socket writes from
    cancellation, so a peer that stops reading would hold its call, its slot and the shutdown for good.
    TCP_USER_TIMEOUT on the listening sockets (inherited when accepted) makes the kernel abort it: the
    write fails and the call ends like any hang-up. Linux only."""

    def __init__(self, settings: Settings):
        super().__init__()
        host = f"[{settings.host}]" if ":" in settings.host else settings.host
        self.bind = [f"{host}:{settings.port}"]
        self.websocket_max_message_size = MAX_MESSAGE_BYTES
        # A request that sends nothing for this long is closed: unfinished ones can't use up the descriptors.
        self.read_timeout = settings.http_read_timeout_s
        self.errorlog = logging.getLogger("hypercorn.error")  # through our logging setup, once
        accept_log = logging.getLogger("trio.serve_listeners")
        if not any(isinstance(each, AcceptTrouble) for each in accept_log.filters):
            accept_log.addFilter(AcceptTrouble())

    def create_sockets(self):  # returns hypercorn.config.Sockets
        sockets = super().create_sockets()
        if hasattr(socket, "TCP_USER_TIMEOUT"):
            for listener in sockets.insecure_sockets + sockets.secure_sockets:
                if listener.family in (socket.AF_INET, socket.AF_INET6):
                    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, SEND_TIMEOUT_S * 1000)
        return sockets


class AcceptTrouble(logging.Filter):
    """Out of file descriptors, trio's accept loop logs a traceback ten times a second.
    This turns a burst of them into one line, and says what to do about it."""

    QUIET_S = 60.0
    until = 0.0  # quiet until then,
    hidden = 0  # and how many lines it has hidden since the last one

    def filter(self, record: logging.LogRecord) -> bool:
        now = time.monotonic()
        if now < self.until:
            self.hidden += 1
            return False
        record.msg = ("cannot accept connections: %s (%s); new calls wait until descriptors free up. "
                      "Raise the limit (ulimit -n, see README)%s")
        record.args = (*record.args[:2], f"; {self.hidden} more times since the last line" if self.hidden else "")
        record.exc_info = record.exc_text = None
        self.until, self.hidden = now + self.QUIET_S, 0
        return True


VERIFICATION_BANNER = {
    "off": "Webhook signatures: off (VOBIZ_VERIFY_SIGNATURES=off): the webhooks answer anyone who can reach "
           "them. Set VOBIZ_VERIFY_SIGNATURES=when-signed or required, with VOBIZ_AUTH_TOKEN.",
    "when-signed": "Webhook signatures: when-signed: a signed webhook must be signed right; "
                   "unsigned ones pass.",
    "required": "Webhook signatures: required: unsigned or wrongly signed webhooks get 403.",
}


def banner(settings: Settings) -> str:
    agent = (f"AI agent: Deepgram {settings.deepgram_model} → {settings.openai_model} → {settings.tts_model}"
             if settings.uses_ai else "offline echo agent")
    lines = [f"vobiz-agent ({agent}) listening on http://{settings.host}:{settings.port}"]
    if settings.public_url:
        lines += [f"Answer URL (Vobiz console → your application, method POST): {settings.public_url}/answer",
                  f"Hangup URL: {settings.public_url}/hangup"]
    else:
        port = settings.port
        lines += [f"PUBLIC_URL is not set. Expose port {port} with a tunnel (e.g. `ngrok http {port}`),",
                  "then start again with PUBLIC_URL=https://<your-tunnel-host> to see the Answer URL to paste",
                  "into the Vobiz console. Until then /answer builds URLs from the request's Host header."]
    if settings.stream_secret_generated:
        lines.append("STREAM_SECRET is not set: media URLs are signed with a random per-process secret. "
                     "Replicas behind one URL need one shared STREAM_SECRET.")
    lines.append(VERIFICATION_BANNER[settings.vobiz_verify_signatures])
    if warning := settings.open_door_warning:
        lines.append(f"WARNING: {warning}")
    # Browsers give the microphone only to https pages and to localhost.
    local = settings.host in ("0.0.0.0", "::", "") or settings.loopback
    if settings.serves_phone:
        url = f"http://{'localhost' if local else settings.host}:{settings.port}/phone"
        lines.append(f"Try it in your browser: {url}"
                     + ("" if local else " (the microphone needs https or localhost)"))
        if settings.uses_ai and not settings.loopback:
            lines.append("PHONE=true on a public address: anyone who can reach /phone can call the AI agent "
                         "and spend your provider budget.")
    elif settings.phone is None:
        lines.append("The browser softphone (/phone) is off: the AI agent listens on a public address. "
                     "PHONE=true turns it on.")
    return "\n".join(lines)


def command_line() -> argparse.ArgumentParser:
    """The flags; --help ends with every setting, what it does and its default."""
    table = ["settings (environment variables, or a .env file in this directory; set variables win),",
             "each with its default:"]
    for setting in SETTINGS:
        table.append(f"  {setting.variable:<26} {setting.shown_default()}")
        table += textwrap.wrap(setting.help.replace("`", ""), 96, initial_indent=" " * 6,
                               subsequent_indent=" " * 6)
    parser = argparse.ArgumentParser(prog="vobiz-agent", description="Answer Vobiz calls with a voice agent.",
                                     epilog="\n".join(table), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", help="address to listen on (default $HOST or 0.0.0.0)")
    parser.add_argument("--port", help="port to listen on (default $PORT or 5000)")
    commands = parser.add_subparsers(dest="command", metavar="call", help="place an outbound call (else: serve)")
    call = commands.add_parser("call", help="ask Vobiz to call a number and connect it to this agent")
    call.add_argument("--to", required=True, help="the number to call, e.g. +919876543210")
    call.add_argument("--from", dest="caller", help="your Vobiz number (default $VOBIZ_FROM)")
    call.add_argument("--answer-url", help="default $PUBLIC_URL/answer")
    call.add_argument("--ring-url", help="told when the phone rings (default: our /ring, which logs it)")
    call.add_argument("--fallback-url", help="fetched for XML if the answer URL fails (default: none)")
    call.add_argument("--time-limit", type=int, metavar="SECONDS", help="end the call after this long")
    call.add_argument("--machine-detection", choices=("true", "hangup"),
                      help="detect an answering machine: report it (true) or hang up on it (hangup)")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = command_line()
    args = parser.parse_args(argv)
    dotenv.load_dotenv(".env")  # a developer's settings file, if there is one; set variables win
    flags = {"HOST": args.host, "PORT": args.port}  # flags win over variables
    try:
        settings = Settings.from_env({**os.environ, **{name: v for name, v in flags.items() if v is not None}})
        if args.command == "call" and args.time_limit is not None and not 1 <= args.time_limit <= 86_400:
            parser.error("--time-limit must be 1 to 86400 seconds, e.g. --time-limit 600")
        call = VobizAPI.make_call(settings, args) if args.command == "call" else None
    except SettingsError as error:
        sys.exit(f"vobiz-agent: {error}")
    if call:  # prints the request_uuid, or stops with one line saying why not
        if refusal := trio.run(VobizAPI(settings).place_call, call):
            sys.exit(f"vobiz-agent: {refusal}")
        return
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLogFormatter() if settings.log_format == "json"
                         else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=settings.log_level, handlers=[handler])
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per TTS request is noise
    print(banner(settings), flush=True)
    trio.run(serve_until_signalled, create_app(settings), ServerConfig(settings))


async def serve_until_signalled(app: QuartTrio, config: HypercornConfig) -> None:
    """Serve until SIGINT (Ctrl-C) or SIGTERM (docker stop), drain, then exit 0. In a container we are
    process 1, and the kernel drops signals that process 1 has not asked for."""
    # Asked for before Hypercorn listens: a SIGTERM just after "Running on" is a drain, not a kill.
    # Ignored after the receiver closes: Trio re-raises the signals still queued in it then
    # (a second one during the drain), and they must not turn a clean exit into a kill.
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, signal.SIG_IGN)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:

        async def signalled() -> None:
            async for number in signals:
                log.info("%s received: shutting down", signal.Signals(number).name)
                break
            await app.switchboard.drain()

        await serve(app, config, shutdown_trigger=signalled)


if __name__ == "__main__":
    main()
