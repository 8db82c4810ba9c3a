"""Where an engine step's time goes: host stages against the GPU's span of each step.

Host stages (``time.perf_counter``) of each ``EngineCore.step()`` call:

- launch: schedule the step and queue its forward and sampling (metadata build + launches; on a
  CUDA-graph step, the replay); zero when the previous call scheduled it ahead;
- launch ahead: schedule and queue the next decode step before this one's tokens are read back
  (async scheduling; zero when the scheduler could not decide it yet);
- wait + read back: wait for this step's sampled tokens (so it absorbs the GPU time not overlapped);
- update: append tokens, stop checks, frees.

The GPU span of a step is measured with CUDA events from just before its forward is queued to the end
of its sampling; the stream runs steps one after another, so the rest of the wall time is the GPU
waiting for the host.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class StepProfile:
    device: torch.device
    steps: int = 0
    decode_steps: int = 0  # steps in which every request brought one token (CUDA-graph candidates)
    tokens: int = 0  # packed tokens forwarded
    launch_s: float = 0.0  # schedule + launch of steps not scheduled ahead
    ahead_s: float = 0.0  # schedule + launch of the steps scheduled ahead
    wait_s: float = 0.0  # waiting for the sampled tokens
    update_s: float = 0.0
    gpu_span_s: float = 0.0
    decode_gpu_span_s: float = 0.0  # the part of gpu_span_s spent in decode-only steps
    _events: list = field(default_factory=list)

    def gpu_start(self) -> None:
        """Before a step's forward is queued."""
        if self.device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            self._events.append([start, None, False])

    def gpu_end(self, batch) -> None:
        """After the step's sampling is queued (events time the stream, so steps queued ahead do not overlap)."""
        if self._events and self._events[-1][1] is None:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events[-1][1] = end
            self._events[-1][2] = all(s.num_scheduled_tokens == 1 for s in batch.requests)

    def add(self, batch, t0: float, t1: float, t2: float, t3: float, t4: float) -> None:
        """One applied step's host stages (with a step scheduled ahead, ``t1..t2`` queues the next one)."""
        decode = all(s.num_scheduled_tokens == 1 for s in batch.requests)
        self.steps += 1
        self.decode_steps += decode
        self.tokens += batch.num_scheduled_tokens
        self.launch_s += t1 - t0
        self.ahead_s += t2 - t1
        self.wait_s += t3 - t2
        self.update_s += t4 - t3

    def finish(self) -> None:
        if self._events:
            torch.cuda.synchronize(self.device)
            spans = [(s.elapsed_time(e) / 1e3, decode) for s, e, decode in self._events if e is not None]
            self.gpu_span_s = sum(t for t, _ in spans)
            self.decode_gpu_span_s = sum(t for t, decode in spans if decode)
            self._events.clear()

    @property
    def wall_s(self) -> float:
        return self.launch_s + self.ahead_s + self.wait_s + self.update_s

    def render(self) -> str:
        wall = self.wall_s or 1e-12
        per = 1e3 / max(1, self.steps)
        rows = [
            ("schedule + launch (host)", self.launch_s),
            ("schedule + launch ahead (host)", self.ahead_s),
            ("wait + read back (host)", self.wait_s),
            ("update (host)", self.update_s),
        ]
        lines = [f"{self.steps} steps ({self.decode_steps} decode-only), {self.tokens} tokens, {self.wall_s:.2f} s"]
        lines += [f"  {name:<34} {t:8.3f} s {t * per:8.3f} ms/step {t / wall:6.1%}" for name, t in rows]
        if self.device.type == "cuda":
            lines.append(
                f"  {'forward..sampled span (GPU + gaps)':<34} {self.gpu_span_s:8.3f} s {self.gpu_span_s * per:8.3f} ms/step "
                f"{self.gpu_span_s / wall:6.1%} of wall"
            )
            other = self.steps - self.decode_steps
            lines.append(
                f"    of which decode-only steps       {self.decode_gpu_span_s:8.3f} s "
                f"{self.decode_gpu_span_s * 1e3 / max(1, self.decode_steps):8.3f} ms/step; other steps "
                f"{self.gpu_span_s - self.decode_gpu_span_s:.3f} s "
                f"{(self.gpu_span_s - self.decode_gpu_span_s) * 1e3 / max(1, other):.3f} ms/step"
            )
        return "\n".join(lines)
