"""Where a ContinuousGenerator step's time goes: host stages against the GPU's span of each step.

Host stages (``time.perf_counter``): schedule, forward (metadata build + launches; on a CUDA-graph
step, the replay), sample (on-device sampling, ending in the one ``.tolist()`` sync of the step, so
it also absorbs waiting for the GPU), update (append tokens, stop checks, frees). The GPU span of a
step is measured with CUDA events from just before the forward to the end of sampling; the rest of
the wall time is the GPU waiting for the host.
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
    schedule_s: float = 0.0
    forward_s: float = 0.0
    sample_s: float = 0.0
    update_s: float = 0.0
    gpu_span_s: float = 0.0
    decode_gpu_span_s: float = 0.0  # the part of gpu_span_s spent in decode-only steps
    _events: list = field(default_factory=list)

    def gpu_start(self) -> None:
        if self.device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            self._events.append([start, None, False])

    def add(self, batch, t0: float, t1: float, t2: float, t3: float, t4: float) -> None:
        if self._events and self._events[-1][1] is None:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events[-1][1] = end
        decode = all(s.num_scheduled_tokens == 1 for s in batch.requests)
        if self._events:
            self._events[-1][2] = decode
        self.steps += 1
        self.decode_steps += decode
        self.tokens += batch.num_scheduled_tokens
        self.schedule_s += t1 - t0
        self.forward_s += t2 - t1
        self.sample_s += t3 - t2
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
        return self.schedule_s + self.forward_s + self.sample_s + self.update_s

    def render(self) -> str:
        wall = self.wall_s or 1e-12
        per = 1e3 / max(1, self.steps)
        rows = [
            ("schedule (host)", self.schedule_s),
            ("forward launch + metadata (host)", self.forward_s),
            ("sample + sync (host)", self.sample_s),
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
