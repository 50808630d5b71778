"""Benchmarks for vobiz_agent: they print figures, they assert nothing.

    python bench_vobiz_agent.py            # audio, latency, capacity and memory (about 5 minutes)
    python bench_vobiz_agent.py audio      # just the audio chain
    python bench_vobiz_agent.py latency    # just the AI agent's turn latency and barge-in
    python bench_vobiz_agent.py capacity   # concurrent AI calls per core within the SLO, then overload
    python bench_vobiz_agent.py memory     # server RSS over 600 short calls (--trace: tracemalloc)
    python bench_vobiz_agent.py profile    # where the server's CPU goes under 25 AI calls (needs py-spy)

--quick (or BENCH_QUICK=1) shortens the capacity steps from 16 s to 8 s of calls.
BENCH_SERVER_SCRIPT=/path/to/vobiz_agent.py measures another copy (capacity,
memory, profile), to compare a change.

The audio chain: how well the anti-alias filter works (passband flatness,
rejection of tones that would fold into the band) and what the whole
PCM → 8 kHz μ-law frames conversion costs in CPU per 20 ms frame.

Latency: the real server, the tests' simulated Vobiz and their Deepgram and
OpenAI stand-ins (simulated_vobiz.py), all on loopback in one process. A turn's latency runs from
the end of the caller's speech (the last voiced 20 ms frame Vobiz sent) to the
first agent frame *heard*: played out at the simulated Vobiz.

Capacity: `python vobiz_agent.py` (the AI agent) as its own process, pinned to core 0
(taskset); this process, pinned to core 1, is the load: N simulated Vobiz calls (the test
suite's, 50 media frames a second each way) and the Deepgram and OpenAI stand-ins, with the
issue's realistic delays: endpointing 300 ms, LLM first token 300 ms then 50 tokens/s, TTS
first byte 150 ms, then 100 ms chunks of speech at twice real time (BENCH_TTS_CHUNK_S). A
reply is three pieces (a first clause, two sentences: 5 s of speech). Each caller hears the
greeting, then over and over: says a 1 s phrase, hears the whole reply, pauses 0.5-2 s. N
steps up (1, 10, 20, 30, ...; BENCH_STEPS=1,25 to choose) with admission by load off, until
two steps in a row fail the SLO. Per step:
  admitted/refused  calls the server took, and those that heard "busy" (and why, from /metrics)
  underruns  frames that reached Vobiz after everything before them had played: a gap the
             caller hears (Vobiz's playout modelled as in the tests' simulator: utterances
             play back to back, one that finds the queue empty starts 20 ms after its first
             frame; BENCH_JITTER_MS). Frames read while this process's own loop was stalled
             over 30 ms are counted apart (they may be the generator's fault, not the server's).
  turn       end of the caller's speech (its last voiced frame sent) → the first reply frame
             heard: p50 and p90. Floor: 750 ms of provider delays.
  inbound    a caller frame sent by the simulated Vobiz → the same frame at the stand-in
             speech-to-text (each call's line noise is its own, so frames are recognised).
  CPU        server user + system time (/proc) while all callers are in, as a share of one
             core and per call-second; "lag" is the server's own event-loop lag (its /health);
             the generator's CPU and lag: if it nears 100% the figures are the generator's.
The SLO (the issue's): no underrun in any call, inbound p99 ≤ 250 ms, turn p50 within +500 ms
of a single call's, no failed call or missed reply. The largest N whose step and all smaller
ones pass is the capacity per core. Then an overload step on a fresh server with admission by
load at its default thresholds: half the capacity first (the server learns what a call costs),
then twice the capacity offered at once; the admitted calls should stay within the SLO.

Memory: the offline server as its own process; 600 short calls, 17 at a time (answer,
connect, start, 5 media frames, the greeting's first frame, hang up and post /hangup);
VmRSS from /proc/<pid>/status after 17, 100, 300 and 600. `memory --trace` runs the server
under tracemalloc and prints where Python objects grew from 100 to 600 calls.

Profile: py-spy samples the server (AI agent, 25 calls of the capacity
load) for 10 s: own time by module and by function, and the time spent in
vobiz_agent's per-message functions with everything they call.
"""

from __future__ import annotations

import array
import itertools
import json
import logging
import math
import os
import random
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass, field
from functools import cache, partial

import httpx
import trio
import trio_websocket
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

import vobiz_agent
from simulated_vobiz import (
    TICK,
    DeepgramStandIn,
    OpenAIStandIn,
    SimulatedVobiz,
    free_port,
    greeted,
    speech,
    start_providers,
    streaming,
    tone,
    vobiz_call,
)
from vobiz_agent import audioop


def level_db(frequency: float, rate: int) -> float:
    """A tone's level after the whole chain (filter, ratecv, μ-law), relative to before."""
    encoder = vobiz_agent.FrameEncoder(rate)
    frames = encoder.encode(tone(frequency, 1.0, rate)) + encoder.flush()
    heard = audioop.ulaw2lin(b"".join(frames), 2)[2 * 800 :]
    return 20 * math.log10(max(audioop.rms(heard, 2), 1) / (10000 / math.sqrt(2)))


def cpu_per_frame(rate: int, chunk_ms: int, seconds: float = 20.0) -> float:
    """CPU µs to turn 20 ms of speech into a μ-law frame, fed in chunks of chunk_ms."""
    speech = tone(440, 1.0, rate) * int(seconds)
    chunk = rate * chunk_ms // 1000 * 2
    encoder = vobiz_agent.FrameEncoder(rate)
    frames = 0
    began = time.process_time()
    for start in range(0, len(speech), chunk):
        frames += len(encoder.encode(speech[start : start + chunk]))
    return (time.process_time() - began) / frames * 1e6


def audio_chain() -> None:
    print("== audio chain: speech PCM → anti-alias filter → ratecv → μ-law → 160-byte frames")
    for rate in (24000, 16000):
        taps = len(vobiz_agent.lowpass_taps(rate))
        band = [level_db(f, rate) for f in range(300, 3401, 100)]
        aliases = {f: level_db(f, rate) for f in (4600, 5000, 6000, 7000, 8000, 11000) if f < rate / 2}
        print(f"{rate} Hz in ({taps} taps): passband 300-3400 Hz within "
              f"{min(band):+.2f} .. {max(band):+.2f} dB")
        print("   tones that would alias: " + ", ".join(f"{f} Hz {db:.1f} dB" for f, db in aliases.items()))
        for chunk_ms in (20, 100):
            print(f"   CPU per 20 ms frame, fed {chunk_ms} ms chunks: {cpu_per_frame(rate, chunk_ms):.1f} µs")


def last_voiced_frame(pcm: bytes) -> int:
    """Index of the last 20 ms frame of `pcm` (8 kHz) that is speech, not trailing quiet."""
    frames = [pcm[i : i + 320] for i in range(0, len(pcm), 320)]
    return max(i for i, frame in enumerate(frames) if audioop.rms(frame, 2) > 300)


async def turn_latencies(delays: bool, turns: int = 8) -> tuple[list[float], list[float]]:
    """Seconds from the end of each caller turn to the first agent audio (heard, received)."""
    heard, received = [], []
    async with trio.open_nursery() as nursery:
        ai = await start_providers(nursery, [f"Question {n}." for n in range(turns)],
                                   deepgram_options={"endpointing_ms": 300 if delays else GAP_ENDPOINTING_MS})
        ai.openai.replies = [["Sure, ", "here ", "is ", "the ", "answer ", "you ", "asked ", "for."]] * turns
        if delays:
            ai.openai.first_token_delay, ai.openai.token_interval = 0.300, 0.020  # 50 tokens/s
            ai.openai.tts_first_byte_delay = 0.150
        async with vobiz_call(ai.server.url, limit_s=300) as vobiz:
            await greeted(vobiz)
            for n in range(turns):
                words = speech(0.8, seed=60 + n)
                said, played = vobiz.say(words), len(vobiz.played_names)
                with trio.move_on_after(10) as waited:
                    await vobiz.until(lambda: len(vobiz.played_names) >= played + 2)  # noqa: B023
                if waited.cancelled_caught:  # the stand-in heard no words in it: not a turn
                    print(f"   (turn {n}: no reply in 10 s, left out)")
                    continue
                spoke_until = said + last_voiced_frame(words)  # that frame was sent at this tick
                first_heard = vobiz.agent_ticks(spoke_until + 1)[0]
                heard.append((first_heard - spoke_until) * TICK)
                end = vobiz.began + spoke_until * TICK
                received.append(min(t for t in vobiz.audio_arrivals if t > end) - end)
        nursery.cancel_scope.cancel()
    return heard, received


async def barge_in_times(rounds: int = 6) -> list[tuple[float, float]]:
    """(onset → clearAudio arrives, onset → last agent frame played) for each interruption."""
    results = []
    async with trio.open_nursery() as nursery:
        ai = await start_providers(nursery, ["Tell me a long story.", "Stop."] * rounds)
        story = ["Once upon a time there was a story that went on and on for a very long while indeed."]
        ai.openai.replies = [story, ["Okay."]] * rounds
        async with vobiz_call(ai.server.url, limit_s=300) as vobiz:
            await greeted(vobiz)
            for _ in range(rounds):
                said = vobiz.say(speech(0.8, seed=70))
                playing = said + 40 + last_voiced_frame(speech(0.8, seed=70))
                await vobiz.until(lambda: len(vobiz.agent_ticks(playing)) >= 25)  # noqa: B023
                clears, played = len(vobiz.event_ticks("clearAudio")), len(vobiz.played_names)
                onset = vobiz.say(speech(0.6, seed=71))
                await vobiz.until(lambda: len(vobiz.event_ticks("clearAudio")) > clears)  # noqa: B023
                clear_tick = vobiz.event_ticks("clearAudio")[-1]
                last_played = max(t for t in vobiz.agent_ticks(onset) if t <= clear_tick)
                results.append(((clear_tick - onset) * TICK, (last_played - onset + 1) * TICK))
                await vobiz.until(lambda: len(vobiz.played_names) > played)  # noqa: B023  ("Okay." heard)
        nursery.cancel_scope.cancel()
    return results


# With no delays, the Deepgram stand-in still needs some quiet to end a turn, or
# it would end one at every 40 ms gap between the synthetic syllables.
GAP_ENDPOINTING_MS = 120


def percentiles(values: list[float]) -> str:
    ms = sorted(v * 1000 for v in values)
    p95 = statistics.quantiles(ms, n=20, method="inclusive")[-1]
    return f"p50 {statistics.median(ms):.0f} ms, p95 {p95:.0f} ms (n={len(ms)})"


def latency() -> None:
    print("== AI agent turn latency: end of caller speech → first agent audio at the simulated Vobiz")
    with_delays = "stand-in delays: endpointing 300 ms, LLM first token 300 ms at 50 tok/s, TTS first byte 150 ms"
    without = f"all stand-in delays 0 (endpointing {GAP_ENDPOINTING_MS} ms, subtracted): the agent's own overhead"
    for delays, label in ((True, with_delays + " (floor 750 ms)"), (False, without)):
        heard, received = trio.run(turn_latencies, delays)
        if not delays:
            heard = [t - GAP_ENDPOINTING_MS / 1000 for t in heard]
            received = [t - GAP_ENDPOINTING_MS / 1000 for t in received]
        print(f"{label}\n   heard:    {percentiles(heard)}\n   received: {percentiles(received)}")
    print("== barge-in: caller speech onset → agent audio stops at the simulated Vobiz "
          f"(detection needs {vobiz_agent.Settings().barge_in_min_ms} ms of speech)")
    times = trio.run(barge_in_times)
    print(f"   onset → clearAudio received:     {percentiles([t[0] for t in times])}")
    print(f"   onset → end of last frame played: {percentiles([t[1] for t in times])}")


# ── Capacity, memory and profile: the server as a separate process on its own core ──

HERE = os.path.dirname(os.path.abspath(__file__))
# Which server to measure; point it at a modified copy of vobiz_agent.py to compare a change.
SERVER_SCRIPT = os.environ.get("BENCH_SERVER_SCRIPT", os.path.join(HERE, "vobiz_agent.py"))
SERVER_LOG = os.path.join(tempfile.gettempdir(), "bench_vobiz_agent_server.log")
SERVER_CORE, LOAD_CORE = 0, 1
QUICK = bool(os.environ.get("BENCH_QUICK"))  # or --quick: shorter capacity steps
OFFLINE_ENV = {"DEEPGRAM_API_KEY": "", "OPENAI_API_KEY": ""}


@contextmanager
def server_process(traced: bool = False, **env: str) -> Iterator[tuple[int, str]]:
    """vobiz_agent.py serving on loopback, pinned to SERVER_CORE: yields (pid, base URL).
    `traced`: under tracemalloc, dumping a snapshot to SNAPSHOT_PATH.<n> at each SIGUSR1."""
    port = free_port()
    env = {**os.environ, "MAX_CALLS": "10000", "OFFLINE_MAX_TURNS": "10000", "IDLE_TIMEOUT_S": "60", **env}
    python = [sys.executable, "-X", "tracemalloc=12", "-c", TRACED_SERVER] if traced else [sys.executable]
    command = ["taskset", "-c", str(SERVER_CORE), *python, SERVER_SCRIPT,  # taskset execs: same pid
               "--host", "127.0.0.1", "--port", str(port)]
    with open(SERVER_LOG, "wb") as log_file:  # the last server's log
        process = subprocess.Popen(command, env=env, cwd=HERE, stdout=subprocess.DEVNULL, stderr=log_file)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            with suppress(httpx.HTTPError):
                if httpx.get(url + "/health").status_code == 200:
                    break
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode}: see {SERVER_LOG}")
            time.sleep(0.05)
        yield process.pid, url
    finally:
        process.terminate()  # SIGTERM: it drains (no calls are left) and exits
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def on_load_core() -> Iterator[None]:
    """This process (the load: simulated Vobiz calls, stand-ins) on LOAD_CORE only, meanwhile."""
    affinity = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {LOAD_CORE})
    try:
        yield
    finally:
        os.sched_setaffinity(0, affinity)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far: /proc/<pid>/stat fields 14 and 15."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()  # the name may hold spaces; field 3 on
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        kb = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    return kb / 1024


async def until_idle(url: str, client: httpx.AsyncClient, limit_s: float = 30) -> None:
    """Until the server counts no live calls (sockets we closed may take a moment)."""
    with trio.move_on_after(limit_s):
        while (await client.get(url + "/health")).json()["calls"]:
            await trio.sleep(0.05)


CALL_NUMBERS = itertools.count()  # every call of a run gets its own CallUUID: no "reconnects"
NOISE_PERIOD = 99  # the simulator's line noise repeats every 99 ticks (32,000 bytes, 320 a tick)


class LoadedVobiz(SimulatedVobiz):
    """The test suite's simulated Vobiz as one call of many: it answers through a shared
    HTTP client (a new client costs some 40 ms of CPU), hears "busy" as a refusal, notes
    when it sent each tick's media, and has line noise of its own, so that the stand-in
    speech-to-text can tell which call a frame of audio came from."""

    # A phone starts playing an utterance this long after its first frame arrives when its
    # queue is empty (the tests' simulator: one frame, 20 ms); BENCH_JITTER_MS to try others.
    JITTER_BUFFER_S = float(os.environ.get("BENCH_JITTER_MS", "20")) / 1000

    def __init__(self, client: httpx.AsyncClient, known: dict | None = None):
        number = next(CALL_NUMBERS)
        super().__init__(call_id=f"bench-{os.getpid()}-{number}", stream_id=f"stream-{number}")
        self.client = client
        self.sent_at: dict[int, float] = {}  # tick → when its media frame went out
        if known is not None:  # this call's noise, made known to the stand-in speech-to-text
            noise = random.Random(number)
            self.noise = array.array("h", (noise.randint(-40, 40) for _ in range(8000 * 2))).tobytes()
            known.update(self.noise_frames())

    async def answer(self, base_url: str, method: str = "POST") -> str | None:
        """The media URL, or None when the server answered that it is busy."""
        self.session_fields = self.answer_fields()
        response = await self.client.post(base_url + "/answer", data=self.session_fields)
        return self.run_xml(ET.fromstring(response.content))

    async def _send_media(self) -> None:
        self.sent_at[self.tick] = trio.current_time()
        await super()._send_media()

    def noise_frames(self) -> dict[bytes, tuple[LoadedVobiz, int]]:
        """Each μ-law frame of this call's line noise → (this call, tick modulo NOISE_PERIOD)."""
        frames = {}
        for tick in range(NOISE_PERIOD):
            start = (tick * 320) % (len(self.noise) - 320)
            frames[audioop.lin2ulaw(self.noise[start : start + 320], 2)] = (self, tick)
        return frames


class TimedDeepgram(DeepgramStandIn):
    """The Deepgram stand-in, noting how late each frame of caller audio reaches it:
    from the moment the simulated Vobiz sent it to the moment it arrives here."""

    def __init__(self, delays: list[float], **options):
        super().__init__(**options)
        self.delays = delays
        self.window = (0.0, math.inf)  # only frames sent meanwhile count (not those of a step's ramp or end)
        self.known: dict[bytes, tuple[LoadedVobiz, int]] = {}  # every call's noise frames

    async def _transcribe(self, ws, query, record) -> None:
        await super()._transcribe(_TimedSocket(ws, self), query, record)


class _TimedSocket:
    """One stand-in connection's socket; get_message() times the audio as it arrives."""

    def __init__(self, ws, deepgram: TimedDeepgram):
        self.ws, self.deepgram = ws, deepgram
        self.opened = trio.current_time()
        self.vobiz: LoadedVobiz | None = None
        self.tick = 0  # the tick of the next frame expected

    def __getattr__(self, name):
        return getattr(self.ws, name)

    async def get_message(self):
        message = await self.ws.get_message()
        if isinstance(message, bytes):
            now = trio.current_time()
            for i in range(0, len(message) - 159, 160):
                self._arrived(message[i : i + 160], now)
        return message

    def _arrived(self, frame: bytes, now: float) -> None:
        vobiz, residue = self.deepgram.known.get(frame, (None, None))
        if vobiz is not None and (self.vobiz is None or vobiz is self.vobiz):
            self.vobiz = vobiz  # line noise tells the call and the tick (frames may have been dropped)
            self.tick += (residue - self.tick) % NOISE_PERIOD
        sent = self.vobiz.sent_at.get(self.tick) if self.vobiz else None
        start, end = self.deepgram.window
        if sent is not None and sent > self.opened and start <= sent <= end:  # not audio queued at connect
            self.deepgram.delays.append(now - sent)
        self.tick += 1


@asynccontextmanager
async def loaded_call(vobiz: LoadedVobiz, base_url: str) -> AsyncIterator[LoadedVobiz | None]:
    """vobiz_call's steps, for a LoadedVobiz: answer, media socket, clock; leaving hangs up.
    Yields None if the server answered busy."""
    if await vobiz.answer(base_url) is None:
        yield None
        return
    async with streaming(vobiz):
        yield vobiz


RAMP_S = 2.0  # the calls of a step start spread over this long
REPLY_TIMEOUT_S = 15.0
# The realistic provider delays (and the latency bench's): endpointing 300 ms,
# LLM first token 300 ms then 50 tokens/s, TTS first byte 150 ms. TTS audio then
# streams in 100 ms chunks at twice real time, as a streaming voice does.
ENDPOINTING_MS, FIRST_TOKEN_S, TOKEN_S, TTS_FIRST_BYTE_S = 300, 0.300, 0.020, 0.150
TTS_CHUNK_S, TTS_SPEED = float(os.environ.get("BENCH_TTS_CHUNK_S", "0.1")), 2.0
# A typical spoken answer: three pieces (a first clause, then sentences), 5 s of speech.
AI_REPLY_TEXT = ("Sure, I can help with that. Your order left our warehouse this morning and "
                 "should arrive by Friday.")
AI_REPLY = [word + " " for word in AI_REPLY_TEXT.split(" ")]  # the tokens the stand-in LLM streams
AI_REPLY[-1] = AI_REPLY[-1].rstrip()
AI_REPLY_UTTERANCES = 3


@cache
def phrases() -> list[bytes]:
    return [speech(1.0, seed=80 + n) for n in range(4)]


@dataclass
class Load:
    """What the callers of one step saw."""

    calls: list[LoadedVobiz] = field(default_factory=list)  # the admitted ones
    refused: int = 0  # answered busy
    failed: list[str] = field(default_factory=list)  # why, for each call that failed
    turns: int = 0
    missed: int = 0  # turns that got no whole reply within REPLY_TIMEOUT_S
    latencies: list[float] = field(default_factory=list)  # end of speech → first reply frame heard
    inbound: list[float] = field(default_factory=list)  # frame sent → frame at the stand-in STT
    known: dict = field(default_factory=dict)  # the callers' noise frames, for the stand-in STT
    stalls: list[tuple[float, float]] = field(default_factory=list)  # when this process itself was late


def heard_at(vobiz: LoadedVobiz, after: float) -> float | None:
    """When the caller heard the first agent frame that arrived after `after`: real-time
    playout from arrival times (JITTER_BUFFER_S after an utterance's first frame)."""
    arrival = next((t for t in vobiz.audio_arrivals if t > after), None)
    return None if arrival is None else arrival + vobiz.JITTER_BUFFER_S


async def conversation(vobiz: LoadedVobiz, stop: float, load: Load, rng: random.Random) -> int:
    """Hear the greeting, then say a phrase, hear the whole reply, pause, until `stop`; the replies heard."""
    replies = 0
    with trio.move_on_after(REPLY_TIMEOUT_S):
        await greeted(vobiz)
    await trio.sleep(rng.uniform(0, 1.5))  # callers out of step, as real ones are
    while vobiz.played_names and trio.current_time() < stop and not vobiz.closed.is_set():
        played = len(vobiz.played_names)
        words = rng.choice(phrases())
        first = vobiz.say(words)
        load.turns += 1
        with trio.move_on_after(REPLY_TIMEOUT_S):
            await vobiz.until(lambda: len(vobiz.played_names) >= played + AI_REPLY_UTTERANCES)  # noqa: B023
        whole = len(vobiz.played_names) >= played + AI_REPLY_UTTERANCES
        spoke_until = vobiz.sent_at.get(first + last_voiced_frame(words))
        heard = heard_at(vobiz, spoke_until) if spoke_until else None
        if whole and heard:
            load.latencies.append(heard - spoke_until)
        replies += whole
        load.missed += not whole
        await trio.sleep(rng.uniform(0.5, 2.0))  # the caller thinks, then talks again
    return replies


async def caller(client: httpx.AsyncClient, base_url: str, start: float, stop: float, load: Load,
                 rng: random.Random) -> None:
    """One call, answered or refused; a failed call is a figure, not a crash."""
    await trio.sleep_until(start)
    vobiz = LoadedVobiz(client, load.known)
    try:
        async with loaded_call(vobiz, base_url) as admitted:
            if admitted is None:
                load.refused += 1
                return
            load.calls.append(vobiz)
            replies = await conversation(vobiz, stop, load, rng)
    except Exception as error:  # noqa: BLE001
        load.failed.append(f"{type(error).__name__} {error}"[:100])
        return
    problem = (vobiz.protocol_errors[:1] or (["no greeting"] if not vobiz.played_names else [])
               or (["the server hung up"] if vobiz.closed.is_set() and vobiz.hangup_reason != "caller" else [])
               or (["no reply heard"] if not replies else []))
    load.failed += problem


GENERATOR_STALL_S = 0.030  # this process woke this late: arrival times read meanwhile are that late too


async def loop_lag(lags: list[float], stalls: list[tuple[float, float]]) -> None:
    """How late this process's own event loop wakes a 5 ms sleeper: a busy generator shows here,
    and would show in the arrival times too."""
    while True:
        due = trio.current_time() + 0.005
        await trio.sleep_until(due)
        lags.append(trio.current_time() - due)
        if lags[-1] > GENERATOR_STALL_S:
            stalls.append((due, trio.current_time()))


def core_busy(core: int) -> float:
    """Seconds a core has been busy (anyone's work), from /proc/stat."""
    with open("/proc/stat") as stat:
        fields = next(line for line in stat if line.startswith(f"cpu{core} ")).split()[1:]
    idle = int(fields[3]) + int(fields[4])  # idle, iowait
    return (sum(int(f) for f in fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


async def cpu_window(pid: int, start: float, stop: float, figures: dict) -> None:
    """The server's and this process's CPU (share of one core) from `start` to `stop`, and
    how much of their two cores anything else took meanwhile (it would skew the figures)."""
    await trio.sleep_until(start)
    server, own, began = cpu_seconds(pid), time.process_time(), trio.current_time()
    cores = core_busy(SERVER_CORE), core_busy(LOAD_CORE)
    await trio.sleep_until(stop)
    wall = trio.current_time() - began
    server, own = (cpu_seconds(pid) - server) / wall, (time.process_time() - own) / wall
    others = max((core_busy(SERVER_CORE) - cores[0]) / wall - server, (core_busy(LOAD_CORE) - cores[1]) / wall - own)
    figures.update(server_cpu=server, load_cpu=own, others=others)


async def server_lag(client: httpx.AsyncClient, base_url: str, start: float, lags: list[float]) -> None:
    """The server's own event-loop lag (its load monitor's, worst of the last seconds), from /health."""
    await trio.sleep_until(start)
    while True:
        with suppress(httpx.HTTPError, KeyError, ValueError):
            lags.append((await client.get(base_url + "/health")).json()["load"]["event_loop_lag_ms"] / 1000)
        await trio.sleep(1.0)


async def load_step(base_url: str, pid: int, calls: int, seconds: float, deepgram: TimedDeepgram) -> dict:
    """`calls` callers offered over RAMP_S, talking for about `seconds` more; the figures of what they heard.
    CPU is measured while all of them are in their calls: from the end of the ramp to `seconds` later."""
    load, lags, server_lags, figures = Load(), [], [], {"calls": calls}
    deepgram.delays, deepgram.known = load.inbound, load.known
    began = trio.current_time()
    stop = began + RAMP_S + seconds
    deepgram.window = (began + RAMP_S, stop)  # while every caller is in, as for the CPU
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(loop_lag, lags, load.stalls)
            nursery.start_soon(cpu_window, pid, began + RAMP_S, stop, figures)
            nursery.start_soon(server_lag, client, base_url, began + RAMP_S + 1, server_lags)
            async with trio.open_nursery() as callers:
                for n in range(calls):
                    callers.start_soon(caller, client, base_url, began + RAMP_S * n / calls, stop, load,
                                       random.Random(n))  # the same phrases and pauses every run
            nursery.cancel_scope.cancel()
        figures.update(load_lag=max(lags), server_lag=max(server_lags, default=math.nan),
                       **load_figures(load))
        figures["refusals"] = refusals((await client.get(base_url + "/metrics")).text)
        await until_idle(base_url, client)
    return figures


def refusals(metrics: str) -> Counter:
    """calls_refused_total by reason, from /metrics."""
    found = Counter()
    for line in metrics.splitlines():
        if line.startswith("vobiz_agent_calls_refused_total{"):
            labels, _, value = line.rpartition(" ")
            found[labels.split('reason="', 1)[1].rsplit('"', 1)[0]] = int(float(value))
    return found


def quantile(values: list[float], q: int) -> float:
    if len(values) < 2:
        return values[0] if values else math.nan
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def underruns(vobiz: LoadedVobiz, stalls: list[tuple[float, float]]) -> tuple[int, int]:
    """(underruns, those read while this process was stalled): a frame read late by a
    stalled generator looks like a frame sent late; those are counted apart, not passed over."""
    late = [arrived for arrived, queued in vobiz.playout() if queued < 0]
    ours = sum(any(start <= arrived <= end + TICK for start, end in stalls) for arrived in late)
    return len(late) - ours, ours


def load_figures(load: Load) -> dict:
    counts = [underruns(vobiz, load.stalls) for vobiz in load.calls]
    dry, dry_calls = sum(n for n, _ in counts), sum(bool(n) for n, _ in counts)
    return {"admitted": len(load.calls), "refused": load.refused, "turns": load.turns, "missed": load.missed,
            "failed": len(load.failed), "why": load.failed[:3], "underruns": dry, "underrun_calls": dry_calls,
            "generator_underruns": sum(n for _, n in counts),
            "turn_p50": quantile(load.latencies, 50), "turn_p90": quantile(load.latencies, 90),
            "in_p50": quantile(load.inbound, 50), "in_p99": quantile(load.inbound, 99),
            "in_max": max(load.inbound, default=math.nan)}


CAPACITY_STEPS = (1, 10, 20, 30, 40, 50, 60, 70, 80)
INBOUND_P99_LIMIT_S = 0.250
TURN_P50_MARGIN_S = 0.500  # over a single call's


def passes(row: dict, single: dict) -> bool:
    """The SLO: no underrun in any call, inbound p99 ≤ 250 ms, turn p50 within +500 ms of one call's,
    every call in and answered (a refusal in a capacity step means admission was not off)."""
    return (not row["underruns"] and row["in_p99"] <= INBOUND_P99_LIMIT_S and not row["failed"]
            and not row["missed"] and row["turn_p50"] <= single["turn_p50"] + TURN_P50_MARGIN_S)


TLS = bool(os.environ.get("BENCH_TLS"))  # the stand-ins on wss:// and https://, as the real providers are


@cache
def tls_files() -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 (openssl), and its key: (certificate, key) paths."""
    folder = tempfile.mkdtemp(prefix="bench_vobiz_agent_tls")
    cert, key = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", key, "-out", cert],
                   check=True, capture_output=True)
    return cert, key


class TlsDeepgram(TimedDeepgram):
    async def serve(self, task_status=trio.TASK_STATUS_IGNORED):
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(*tls_files())
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                partial(trio_websocket.serve_websocket, self._handle, "127.0.0.1", 0, context))
            task_status.started(f"wss://127.0.0.1:{server.port}/v1/listen")


class TlsOpenAI(OpenAIStandIn):
    async def serve(self, task_status=trio.TASK_STATUS_IGNORED):
        config = HypercornConfig()
        config.bind = ["127.0.0.1:0"]
        config.certfile, config.keyfile = tls_files()
        async with trio.open_nursery() as nursery:
            urls = await nursery.start(partial(serve, self._asgi, config, mode="asgi"))
            task_status.started(urls[0] + "/v1")


async def stand_ins(nursery: trio.Nursery) -> tuple[dict[str, str], TimedDeepgram]:
    """The Deepgram and OpenAI stand-ins with the realistic delays, in this process: the server's env."""
    deepgram = (TlsDeepgram if TLS else TimedDeepgram)([], endpointing_ms=ENDPOINTING_MS)
    openai = TlsOpenAI() if TLS else OpenAIStandIn()
    openai.replies = [AI_REPLY] * 100_000
    openai.first_token_delay, openai.token_interval = FIRST_TOKEN_S, TOKEN_S
    openai.tts_first_byte_delay = TTS_FIRST_BYTE_S
    openai.tts_chunk_bytes = int(TTS_CHUNK_S * OpenAIStandIn.RATE) * 2
    openai.tts_interval = TTS_CHUNK_S / TTS_SPEED
    env = {"DEEPGRAM_API_KEY": "dg-bench", "DEEPGRAM_URL": await nursery.start(deepgram.serve),
           "OPENAI_API_KEY": "sk-bench", "OPENAI_BASE_URL": await nursery.start(openai.serve)}
    if TLS:
        env["SSL_CERT_FILE"] = tls_files()[0]  # the server trusts the stand-ins' certificate
    return env, deepgram


ADMISSION_OFF = {"LOAD_MAX_LAG_MS": "60000", "LOAD_MAX_CPU": "64", "LOAD_MAX_BEHIND_MS": "60000",
                 "LOAD_MAX_STARTS_PER_S": "10000"}


async def offered(steps: list[int], seconds: float, admission: dict[str, str], single: dict | None = None,
                  stop_early: bool = True) -> list[dict]:
    """Steps of offered calls against one server; stops after two failing steps in a row."""
    rows = []
    async with trio.open_nursery() as nursery:
        env, deepgram = await stand_ins(nursery)
        with server_process(**env, **admission) as (pid, url):
            for calls in steps:
                rows.append(await load_step(url, pid, calls, seconds, deepgram))
                single = single or rows[0]
                print_row(rows[-1], passes(rows[-1], single))
                if stop_early and len(rows) >= 2 and not any(passes(row, single) for row in rows[-2:]):
                    break
        nursery.cancel_scope.cancel()
    return rows


CAPACITY_HEADER = ("offered admitted refused  turns missed failed  underruns (calls)  turn p50   p90  "
                   "inbound p50   p99   max   server CPU  per call-s  lag  generator CPU, lag")


def print_row(row: dict, passed: bool) -> None:
    ms = {key: row[key] * 1000 for key in ("turn_p50", "turn_p90", "in_p50", "in_p99", "in_max")}
    per_call = row["server_cpu"] / max(row["admitted"], 1) * 1000
    reasons = ", ".join(f"{reason} ×{n}" for reason, n in row["refusals"].items())
    print(f"{row['calls']:7d} {row['admitted']:8d} {row['refused']:7d} {row['turns']:6d} {row['missed']:6d}"
          f" {row['failed']:6d} {row['underruns']:10d} ({row['underrun_calls']:3d})  {ms['turn_p50']:8.0f}"
          f" {ms['turn_p90']:5.0f}  {ms['in_p50']:11.0f} {ms['in_p99']:5.0f} {ms['in_max']:5.0f}"
          f"   {row['server_cpu']:9.0%}  {per_call:6.1f} ms {row['server_lag'] * 1000:4.0f}"
          f"  {row['load_cpu']:8.0%} {row['load_lag'] * 1000:4.0f} ms"
          f"  {'pass' if passed else 'FAIL'}"
          + ("  ← generator saturated" if row["load_cpu"] >= 0.9 else "")
          + (f"  (+{row['generator_underruns']} underruns read while the generator stalled)"
             if row["generator_underruns"] else "")
          + (f"  ← other processes took {row['others']:.0%} of a core" if row["others"] >= 0.15 else "")
          + (f"  (refused: {reasons})" if reasons else "")
          + (f"  ({'; '.join(row['why'])})" if row["why"] else ""), flush=True)


def capacity() -> None:
    seconds = 8.0 if QUICK else 16.0
    steps = [int(n) for n in os.environ.get("BENCH_STEPS", "").split(",") if n] or list(CAPACITY_STEPS)
    print(f"== capacity: concurrent AI calls on one core (server pinned to core {SERVER_CORE}; simulated "
          f"Vobiz and stand-ins on core {LOAD_CORE}); calls offered over {RAMP_S:.0f} s, then {seconds:.0f} s")
    print(f"   stand-ins: endpointing {ENDPOINTING_MS} ms, LLM first token {FIRST_TOKEN_S * 1000:.0f} ms at "
          f"{1 / TOKEN_S:.0f} tokens/s, TTS first byte {TTS_FIRST_BYTE_S * 1000:.0f} ms, then "
          f"{TTS_CHUNK_S * 1000:.0f} ms chunks at {TTS_SPEED:.0f}× real time; replies of "
          f"{AI_REPLY_UTTERANCES} pieces, 5 s of speech")
    print("   callers talk 1 s, hear the whole reply, pause 0.5-2 s, talk again; turn = end of speech → "
          "first reply frame heard; inbound = frame sent → at the stand-in speech-to-text")
    print(f"   SLO: no underrun in any call, inbound p99 ≤ {INBOUND_P99_LIMIT_S * 1000:.0f} ms, turn p50 ≤ "
          f"one call's + {TURN_P50_MARGIN_S * 1000:.0f} ms, no failed or missed turn")
    phrases()  # made now: making them takes this process 0.2 s
    logging.getLogger("hypercorn.error").disabled = True  # the stand-ins' "Running on" lines
    with on_load_core():
        print(f"-- admission by load off (its thresholds set out of reach)\n{CAPACITY_HEADER}")
        rows = trio.run(offered, steps, seconds, ADMISSION_OFF)
        single = rows[0]
        passing = [row for row in itertools.takewhile(lambda row: passes(row, single), rows)]
        found = passing[-1]["calls"] if passing else 0
        best = max((row["calls"] for row in rows if passes(row, single)), default=0)
        print(f"   capacity: {found} AI calls on one core within the SLO"
              + (f" (a larger step passed too: {best})" if best > found else ""))
        if found and not os.environ.get("BENCH_NO_OVERLOAD"):
            print(f"-- overload: admission by load with its default thresholds; {found // 2} calls first, "
                  f"as a server that has been taking calls (it learns what a call costs), then "
                  f"{2 * found} offered at once\n{CAPACITY_HEADER}")
            trio.run(offered, [n for n in (found // 2, 2 * found) if n], seconds, {}, single, False)


MEMORY_CALLS = (17, 100, 300, 600)  # RSS is read after this many calls
MEMORY_PARALLEL = 17
SNAPSHOT_PATH = os.path.join(tempfile.gettempdir(), "bench_vobiz_agent_memory.snapshot")
# The server under tracemalloc: the script, with a SIGUSR1 handler that writes a snapshot.
TRACED_SERVER = """
import gc, runpy, signal, sys, tracemalloc
dumps = iter(range(1000))
def dump(number, frame):
    gc.collect()
    tracemalloc.take_snapshot().dump(f"{SNAPSHOT_PATH}.{next(dumps)}")
signal.signal(signal.SIGUSR1, dump)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
""".replace("{SNAPSHOT_PATH}", SNAPSHOT_PATH.replace("\\", "/"))


async def short_call(client: httpx.AsyncClient, url: str) -> bool:
    """Answer, connect, start, five media frames, the greeting's first frame back, hang up
    (close the socket, then post to /hangup, as Vobiz does)."""
    vobiz = LoadedVobiz(client)
    media_url = await vobiz.answer(url)
    async with trio_websocket.open_websocket_url(media_url) as ws:
        await ws.send_message(json.dumps(vobiz.start_frame()))
        vobiz.ws = ws
        for vobiz.tick in range(1, 6):
            await vobiz._send_media()  # line noise, as the simulated Vobiz sends it
        greeted = False
        with trio.move_on_after(5):
            greeted = json.loads(await ws.get_message())["event"] == "playAudio"
    # Vobiz then tells the hangup URL that the call is over.
    await client.post(url + "/hangup", data={"CallUUID": vobiz.call_id, "Event": "Hangup", "Duration": "1"})
    return greeted


async def snapshot(pid: int, number: int) -> None:
    """Ask the traced server for snapshot `number`, and wait until it is written."""
    path = f"{SNAPSHOT_PATH}.{number}"
    with suppress(FileNotFoundError):
        os.remove(path)
    os.kill(pid, signal.SIGUSR1)
    with trio.fail_after(60):
        while not os.path.exists(path) or time.time() - os.path.getmtime(path) < 1:
            await trio.sleep(0.2)


async def rss_over_calls(pid: int, url: str, traced: bool) -> tuple[dict[int, float], int]:
    """RSS (MB) after each count in MEMORY_CALLS of short calls, MEMORY_PARALLEL at a time; failures.
    Traced: a tracemalloc snapshot at each count too."""
    rss, outcomes = {}, []

    async def one(client: httpx.AsyncClient) -> None:
        try:
            outcomes.append(await short_call(client, url))
        except Exception:  # noqa: BLE001
            outcomes.append(False)

    async with httpx.AsyncClient(timeout=30) as client:
        for target in MEMORY_CALLS:
            while len(outcomes) < target:
                async with trio.open_nursery() as nursery:
                    for _ in range(min(MEMORY_PARALLEL, target - len(outcomes))):
                        nursery.start_soon(one, client)
            await until_idle(url, client)
            rss[target] = rss_mb(pid)
            if traced:
                await snapshot(pid, MEMORY_CALLS.index(target))
    return rss, outcomes.count(False)


def print_growth(first: int, last: int) -> None:
    """Where traced memory grew between two snapshots, by allocating line (with its callers)."""
    import tracemalloc
    old, new = (tracemalloc.Snapshot.load(f"{SNAPSHOT_PATH}.{MEMORY_CALLS.index(n)}") for n in (first, last))
    ignore = [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, "<frozen *>")]
    old, new = old.filter_traces(ignore), new.filter_traces(ignore)
    total = sum(s.size for s in new.statistics("filename")) - sum(s.size for s in old.statistics("filename"))
    print(f"   traced (Python objects) from {first} to {last} calls: {total / 1024:+.0f} kB; the largest growth:")
    for stat in new.compare_to(old, "traceback")[:8]:
        frames = [f"{os.path.basename(frame.filename)}:{frame.lineno}" for frame in reversed(stat.traceback)]
        print(f"   {stat.size_diff / 1024:+8.1f} kB {stat.count_diff:+6d} blocks  " + " ← ".join(frames[:4]))


def memory() -> None:
    traced = "--trace" in sys.argv
    print(f"== memory: server RSS over {MEMORY_CALLS[-1]:,} short calls to the offline agent "
          f"({MEMORY_PARALLEL} at a time: answer, start, 5 media frames, first greeting frame, hang-up)"
          + (", under tracemalloc" if traced else ""))
    with server_process(traced, **OFFLINE_ENV, **ADMISSION_OFF) as (pid, url):
        started = rss_mb(pid)
        rss, failed = trio.run(rss_over_calls, pid, url, traced)
    print(f"   at start {started:.1f} MB; " + ", ".join(f"after {n:,}: {mb:.1f} MB" for n, mb in rss.items()))
    first, last = MEMORY_CALLS[0], MEMORY_CALLS[-1]
    print(f"   growth over the whole run: {rss[last] - started:+.1f} MB; from {first} to {last:,} calls: "
          f"{rss[last] - rss[first]:+.1f} MB ({(rss[last] - rss[first]) * 1024 / (last - first):.2f} kB per call); "
          f"failed calls: {failed}")
    if failed:
        print(f"   !! {failed} of {last:,} calls failed: these figures are not of real calls")
    if traced:
        print_growth(MEMORY_CALLS[1], last)


PROFILE_CALLS, PROFILE_SECONDS, PROFILE_RATE = 25, 10, 100
PROFILE_OUTPUT = os.path.join(tempfile.gettempdir(), "bench_vobiz_agent_profile.txt")
# The per-message path: what vobiz_agent.py does for each frame in and out, with what it calls.
PER_MESSAGE = ("Call.listen_to_vobiz", "parse_frame", "Call._hear", "DeepgramEars.hear",
               "DeepgramEars._send_audio", "DeepgramEars._receive", "Player.send_frame", "Outbound.play_audio",
               "Call.send", "TrioWebsocket.send", "FrameEncoder.encode", "ProviderAPI.chat", "ProviderAPI.speech")


async def profiled_load(py_spy: str) -> float:
    """PROFILE_CALLS AI callers (the capacity load); py-spy samples the server for PROFILE_SECONDS
    once they are all in. Returns the server's CPU (share of one core) while it was sampled."""
    async with trio.open_nursery() as nursery:
        env, deepgram = await stand_ins(nursery)
        with server_process(**env, **ADMISSION_OFF) as (pid, url):
            nursery.start_soon(load_step, url, pid, PROFILE_CALLS, PROFILE_SECONDS + 2, deepgram)
            await trio.sleep(RAMP_S + 1)
            began, cpu = trio.current_time(), cpu_seconds(pid)
            await trio.run_process([py_spy, "record", "--pid", str(pid), "--duration", str(PROFILE_SECONDS),
                                    "--rate", str(PROFILE_RATE), "--format", "raw", "--function",
                                    "--output", PROFILE_OUTPUT], capture_stdout=True, capture_stderr=True)
            cpu = (cpu_seconds(pid) - cpu) / (trio.current_time() - began)
            nursery.cancel_scope.cancel()
    return cpu


def read_profile(path: str) -> tuple[int, Counter, Counter]:
    """py-spy's raw stacks → (samples, own samples per function, samples per function on the stack)."""
    own, inclusive, samples = Counter(), Counter(), 0
    with open(path) as raw:
        for line in raw:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            frames = stack.split(";")
            samples += int(count)
            own[frames[-1]] += int(count)
            for frame in set(frames):
                inclusive[frame] += int(count)
    return samples, own, inclusive


def layer(frame: str) -> str:
    """'XorMaskerSimple.process (wsproto/frame_protocol.py:29)' → 'wsproto'."""
    where = frame.rpartition(" (")[2]
    return where.split("/")[0].split(".py")[0].split(":")[0]


def print_profile(cpu: float) -> None:
    samples, own, inclusive = read_profile(PROFILE_OUTPUT)
    share = cpu / samples  # one sample's share of a core: the shares below add up to the CPU
    layers = Counter()
    for frame, count in own.items():
        layers[layer(frame)] += count
    print(f"   server CPU {cpu:.0%} of one core ({samples} busy samples); by module, own time: "
          + ", ".join(f"{name} {count * share:.1%}" for name, count in layers.most_common(9)))
    print("   functions, own time (C calls such as json.loads or audioop count in their caller):")
    for frame, count in own.most_common(12):
        print(f"   {count * share:6.1%}  {frame}")
    print("   vobiz_agent's per-message path, with all it calls:")
    for name in PER_MESSAGE:
        count = sum(n for frame, n in inclusive.items() if frame.startswith(name + " ("))
        print(f"   {count * share:6.1%}  {name}")


def profile() -> None:
    py_spy = shutil.which("py-spy") or shutil.which("py-spy", path=os.path.dirname(sys.executable))
    if not py_spy:
        print("== profile: skipped, py-spy is not installed (pip install py-spy: a dev tool only)")
        return
    print(f"== profile: the server (AI agent, the capacity load) under {PROFILE_CALLS} calls, sampled by "
          f"py-spy for {PROFILE_SECONDS} s; percentages are of one core; raw stacks in {PROFILE_OUTPUT}")
    phrases()
    logging.getLogger("hypercorn.error").disabled = True
    with on_load_core():
        cpu = trio.run(profiled_load, py_spy)
    print_profile(cpu)


SECTIONS = {"audio": lambda: audio_chain(), "latency": lambda: latency(),
            "capacity": lambda: capacity(), "memory": lambda: memory(), "profile": lambda: profile()}
DEFAULT_SECTIONS = ["audio", "latency", "capacity", "memory"]

if __name__ == "__main__":
    if {"-h", "--help"} & set(sys.argv[1:]):
        print(__doc__)  # the sections and settings; without this, --help would run the whole bench
        sys.exit(0)
    wanted = [arg for arg in sys.argv[1:] if not arg.startswith("--")] or DEFAULT_SECTIONS
    QUICK = QUICK or "--quick" in sys.argv
    for name in wanted:
        began = time.monotonic()
        SECTIONS[name]()
        print(f"   ({name}: {time.monotonic() - began:.0f} s)", flush=True)
