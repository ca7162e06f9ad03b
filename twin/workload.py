"""Request generators for the core: open-loop arrivals (Poisson, bursty, trace) and closed loops.

numpy only. Every draw comes from the one `numpy.random.Generator` that the caller owns, so the
same seed gives the same arrivals. Arrival times are absolute simulated seconds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

F64 = NDArray[np.float64]
I64 = NDArray[np.int64]

ARRIVALS = ("poisson", "bursty", "trace", "closed")
DISTS = ("fixed", "uniform", "lognormal")
_BLOCK = 512
MIN_RATE_PER_S = 1e-9  # below this a rate means no arrivals at all
_EMPTY_F: F64 = np.empty(0)
_EMPTY_I: I64 = np.empty(0, dtype=np.int64)


@dataclass(frozen=True, kw_only=True)
class LengthSpec:
    """A token-length distribution: fixed `value`, uniform [`low`, `high`], or log-normal."""

    dist: str
    value: int = 0
    low: int = 0
    high: int = 0
    median: float = 0.0
    sigma: float = 0.0
    min: int = 1
    max: int = 1 << 20

    def draw(self, rng: np.random.Generator, n: int) -> I64:
        if self.dist == "fixed":
            return np.full(n, self.value, dtype=np.int64)
        if self.dist == "uniform":
            return rng.integers(self.low, self.high + 1, size=n, dtype=np.int64)
        if self.dist == "lognormal":
            x = rng.lognormal(np.log(self.median), self.sigma, size=n)
            return np.clip(np.rint(x), max(1, self.min), self.max).astype(np.int64)
        raise ValueError(f"unknown length distribution {self.dist!r}; expected one of {DISTS}")


@dataclass(frozen=True, kw_only=True)
class WorkloadSpec:
    """What a workload generates. `closed` keeps `users` requests in flight (predict)."""

    arrivals: str
    rate_per_s: float = 1.0
    prompt: LengthSpec
    output: LengthSpec
    burst_factor: float = 1.0
    burst_on_s: float = 0.0
    burst_off_s: float = 0.0
    trace_t_s: tuple[float, ...] = ()
    trace_prompt: tuple[int, ...] = ()
    trace_output: tuple[int, ...] = ()
    users: int = 0
    stagger_s: float = 0.0  # closed loop: first requests spread uniformly over this window
    max_requests: int = -1  # stop after this many arrivals (-1: never)


class Workload:
    """Mutable arrival source. `take_until(t)` returns every arrival with time <= t, in order."""

    def __init__(self, spec: WorkloadSpec, rng: np.random.Generator, t0: float = 0.0) -> None:
        if spec.arrivals not in ARRIVALS:
            raise ValueError(
                f"unknown arrival process {spec.arrivals!r}; expected one of {ARRIVALS}"
            )
        self.spec = spec
        self.rng = rng
        self.rate_per_s = float(spec.rate_per_s)
        self.burst_factor = float(spec.burst_factor)
        self.burst_until_s = -1.0  # a temporary burst (chaos, operator): rate x factor until then
        self.burst_extra = 1.0
        self.emitted = 0
        self._t: F64 = np.empty(0)
        self._p: I64 = np.empty(0, dtype=np.int64)
        self._o: I64 = np.empty(0, dtype=np.int64)
        self._cursor_t = t0  # candidate generation has covered time up to here
        self._trace_pos = 0
        if spec.arrivals == "closed":
            n = spec.users
            # Stagger the users' first requests so the loop does not run in lockstep (real clients
            # never do); predict spreads them over about one request's duration.
            starts = t0 + np.sort(rng.uniform(0.0, spec.stagger_s, size=n))
            self._push(starts, spec.prompt.draw(rng, n), spec.output.draw(rng, n))

    # -- queue of pending arrivals ---------------------------------------------------------------
    def _push(self, t: F64, p: I64, o: I64) -> None:
        if t.size == 0:
            return
        t_all = np.concatenate([self._t, t])
        order = np.argsort(t_all, kind="stable")
        self._t = t_all[order]
        self._p = np.concatenate([self._p, p])[order]
        self._o = np.concatenate([self._o, o])[order]

    def _rate_at(self, t: F64) -> F64:
        rate = np.full(t.shape, self.rate_per_s)
        s = self.spec
        if s.arrivals == "bursty" and s.burst_on_s > 0:
            phase = np.mod(t, s.burst_on_s + s.burst_off_s)
            rate = np.where(phase < s.burst_on_s, rate * self.burst_factor, rate)
        return np.where(t < self.burst_until_s, rate * self.burst_extra, rate)

    def _peak_rate(self) -> float:
        peak = self.rate_per_s
        if self.spec.arrivals == "bursty":
            peak *= max(1.0, self.burst_factor)
        if self._cursor_t < self.burst_until_s:
            peak *= max(1.0, self.burst_extra)
        return peak

    def _generate_block(self) -> None:
        """Extend the pending queue by one block of candidates (thinning for time-varying rates)."""
        s = self.spec
        if s.arrivals == "trace":
            n = min(_BLOCK, len(s.trace_t_s) - self._trace_pos)
            if n <= 0:
                self._cursor_t = np.inf
                return
            sl = slice(self._trace_pos, self._trace_pos + n)
            t = np.asarray(s.trace_t_s[sl], dtype=np.float64)
            self._trace_pos += n
            self._push(
                t,
                np.asarray(s.trace_prompt[sl], np.int64),
                np.asarray(s.trace_output[sl], np.int64),
            )
            self._cursor_t = float(t[-1])
            return
        peak = self._peak_rate()
        if peak <= MIN_RATE_PER_S:  # no arrivals (a rate this small would overflow the gaps)
            self._cursor_t = np.inf
            return
        gaps = self.rng.exponential(1.0 / peak, size=_BLOCK)
        t = self._cursor_t + np.cumsum(gaps)
        keep = self.rng.random(_BLOCK) * peak < self._rate_at(t)
        self._cursor_t = float(t[-1])
        t = t[keep]
        n = t.size
        self._push(t, s.prompt.draw(self.rng, n), s.output.draw(self.rng, n))

    def _fill_to(self, t_end: float) -> None:
        if self.spec.arrivals == "closed":
            return
        while self._cursor_t <= t_end:
            self._generate_block()

    def _cap(self, n: int) -> int:
        if self.spec.max_requests < 0:
            return n
        return max(0, min(n, self.spec.max_requests - self.emitted))

    # -- public ---------------------------------------------------------------------------------
    def next_time(self) -> float:
        """Time of the next arrival (inf when none will come)."""
        if self._cap(1) == 0:
            return float("inf")
        if self.spec.arrivals != "closed":
            while self._t.size == 0 and np.isfinite(self._cursor_t):
                self._generate_block()
        return float(self._t[0]) if self._t.size else float("inf")

    def take_until(self, t_end: float) -> tuple[F64, I64, I64]:
        """Remove and return all arrivals at or before `t_end`."""
        if self._t.size and self._t[0] > t_end:  # the common case: nothing due yet
            return _EMPTY_F, _EMPTY_I, _EMPTY_I
        self._fill_to(t_end)
        n = self._cap(int(np.searchsorted(self._t, t_end, side="right")))
        t, p, o = self._t[:n], self._p[:n], self._o[:n]
        self._t, self._p, self._o = self._t[n:], self._p[n:], self._o[n:]
        self.emitted += n
        return t, p, o

    def on_done(self, t_done: F64) -> None:
        """Closed loop: each finished request's user sends the next one at once."""
        if self.spec.arrivals != "closed" or t_done.size == 0:
            return
        n = t_done.size
        s = self.spec
        self._push(t_done.copy(), s.prompt.draw(self.rng, n), s.output.draw(self.rng, n))

    def set_rate(self, rate_per_s: float, now: float) -> None:
        """Change the mean arrival rate from `now` on (memoryless: pending draws are redrawn)."""
        if self.spec.arrivals == "closed":
            raise ValueError("a closed-loop workload has no arrival rate")
        if self.spec.arrivals == "trace":
            raise ValueError("a trace replays its own timestamps; its rate cannot be set")
        self.rate_per_s = rate_per_s
        self._drop_after(now)

    def burst(self, factor: float, until_s: float, now: float) -> None:
        """Multiply the arrival rate by `factor` until `until_s`."""
        self.burst_extra = factor
        self.burst_until_s = until_s
        if self.spec.arrivals not in ("closed", "trace"):
            self._drop_after(now)

    def _drop_after(self, now: float) -> None:
        keep = self._t <= now
        self._t, self._p, self._o = self._t[keep], self._p[keep], self._o[keep]
        self._cursor_t = now
