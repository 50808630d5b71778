"""Benchmarks for vobiz_agent: they print figures, they assert nothing.

    python bench_vobiz_agent.py            # everything
    python bench_vobiz_agent.py audio      # just the audio chain
    python bench_vobiz_agent.py latency    # just the AI agent's turn latency and barge-in

The audio chain: how well the anti-alias filter works (passband flatness,
rejection of tones that would fold into the band) and what the whole
PCM → 8 kHz μ-law frames conversion costs in CPU per 20 ms frame.

Latency: the real server, the test suite's simulated Vobiz and its Deepgram and
OpenAI stand-ins, all on loopback in one process. A turn's latency runs from
the end of the caller's speech (the last voiced 20 ms frame Vobiz sent) to the
first agent frame *heard*: played out at the simulated Vobiz.
"""

from __future__ import annotations

import array
import math
import statistics
import sys
import time

import trio

import vobiz_agent
from test_vobiz_agent import TICK, greeted, speech, start_providers, vobiz_call
from vobiz_agent import audioop


def tone(frequency: float, seconds: float, rate: int, amplitude: int = 10000) -> bytes:
    count = int(seconds * rate)
    return array.array(
        "h", (int(amplitude * math.sin(2 * math.pi * frequency * i / rate)) for i in range(count))
    ).tobytes()


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


if __name__ == "__main__":
    wanted = sys.argv[1:] or ["audio", "latency"]
    if "audio" in wanted:
        audio_chain()
    if "latency" in wanted:
        latency()
