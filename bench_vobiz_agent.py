"""Benchmarks for vobiz_agent: they print figures, they assert nothing.

    python bench_vobiz_agent.py            # everything
    python bench_vobiz_agent.py audio      # just the audio chain

The audio chain: how well the anti-alias filter works (passband flatness,
rejection of tones that would fold into the band) and what the whole
PCM → 8 kHz μ-law frames conversion costs in CPU per 20 ms frame.
"""

from __future__ import annotations

import array
import math
import sys
import time

import vobiz_agent
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


if __name__ == "__main__":
    wanted = sys.argv[1:] or ["audio"]
    if "audio" in wanted:
        audio_chain()
