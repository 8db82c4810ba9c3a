"""Load generator for OpenAI-compatible servers: ``hf-paged serve``, ``transformers serve``, others.

Sends requests with Poisson arrivals at each given request rate (``inf``: all at once), streams every
response, and reports per rate: request and output-token throughput, TTFT, TPOT, ITL and end-to-end
latency (p50 / p99) and goodput (requests per second that met every SLO); a markdown table, a JSON file,
and with ``plot`` a PNG of latency against rate for one or several runs side by side.

    # prompts of 64..1024 tokens (counted with the tokenizer), 256 new tokens each, four rates
    python benchmarks/bench_serve.py run --base-url http://127.0.0.1:8000 --tokenizer hf_paged/default_model \\
        --num-prompts 200 --input-len 64:1024 --output-len 256 --rates 2,8,32,inf --ignore-eos \\
        --label hf-paged --out hf_paged.json
    python benchmarks/bench_serve.py plot hf_paged.json transformers.json --out latency.png
    # the same requests through ContinuousGenerator in one process (the offline ceiling)
    python benchmarks/bench_serve.py offline --model /tmp/model --requests hf_paged.json --output-len 256
    # a random-weight shape saved as a model folder with the embedded tokenizer (for servers to load)
    python benchmarks/bench_serve.py save-model --shape llama-8b --out /tmp/llama8b

Requests go out from several processes (``--client-processes``, default one per 48 requests of a rate):
one Python process parsing thousands of SSE chunks a second saturates its core, and would then measure
itself rather than the server. The parent draws every arrival time; the processes send on that shared
schedule and the parent merges their outcomes. ``--server-pid`` adds a line per rate with the CPU use of
the server process (and its busiest threads), of its child processes and of each client process.

Only loopback addresses are accepted: this is a benchmark of a local server, never a load test of
someone else's. Every request count and duration is bounded (``--num-prompts``, ``--max-duration``,
``--request-timeout``).

Definitions (as ``vllm bench serve``): TTFT = send to first generated text; ITL = gaps between
consecutive streamed chunks that carry text; TPOT = (e2e - TTFT) / (output tokens - 1); output tokens
come from the final usage chunk when the server sends one, else from the chunk count.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


# ---- workload ------------------------------------------------------------------------------------
def parse_range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    lo_i, hi_i = int(lo), int(hi or lo)
    if not 1 <= lo_i <= hi_i:
        raise argparse.ArgumentTypeError(f"expected N or LO:HI with 1 <= LO <= HI, got {text!r}")
    return lo_i, hi_i


def make_prompts(num: int, input_len: tuple[int, int], seed: int, tokenizer_path: str | None,
                 vocab_size: int | None) -> tuple[list[str | list[int]], list[int]]:
    """Random prompts and their lengths in tokens (without the BOS a server may add).

    With a tokenizer: text whose encoding has exactly the drawn length (random vocabulary tokens decoded,
    re-encoded and trimmed until it fits), so servers that only take strings get the same work.
    Without: random token ids in [3, vocab_size) (the completions endpoint accepts id lists).
    """
    rng = random.Random(seed)
    lengths = [rng.randint(*input_len) for _ in range(num)]
    if tokenizer_path is None:
        if vocab_size is None:
            raise SystemExit("give --tokenizer (text prompts) or --vocab-size (token-id prompts)")
        return [[rng.randrange(3, vocab_size) for _ in range(n)] for n in lengths], lengths
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    special = set(tok.all_special_ids)
    candidates = [i for i in range(len(tok)) if i not in special]
    prompts = []
    for k, n in enumerate(lengths):
        ids = [rng.choice(candidates) for _ in range(n)]
        for _ in range(20):
            text = tok.decode(ids)
            ids = tok(text, add_special_tokens=False)["input_ids"]
            if len(ids) == n:
                break
            ids = ids[:n] if len(ids) > n else ids + [rng.choice(candidates) for _ in range(n - len(ids))]
        text = tok.decode(ids)
        lengths[k] = len(tok(text, add_special_tokens=False)["input_ids"])  # exact even when the fit did not converge
        prompts.append(text)
    return prompts, lengths


def rate_prompt_seed(seed: int, rate: float) -> int:
    """The prompts' seed at one rate: ``seed`` itself at rate inf (the saturation point every comparison
    uses), a different one per finite rate."""
    return seed if math.isinf(rate) else seed + 7919 * (1 + round(rate * 1000))


# ---- one request ---------------------------------------------------------------------------------
@dataclass
class RequestOutcome:
    ok: bool
    prompt_tokens: int
    output_tokens: int = 0
    ttft_s: float | None = None
    e2e_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    error: str | None = None
    # time.perf_counter() at send and at the end (success or failure). On Linux it is CLOCK_MONOTONIC, one
    # clock for every process of the machine, so outcomes from several client processes share a time line.
    sent_at: float = 0.0
    ended_at: float = 0.0

    @property
    def tpot_s(self) -> float | None:
        if self.ttft_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


async def send(client, url: str, body: dict, prompt_tokens: int, chat: bool, timeout: float) -> RequestOutcome:
    out = RequestOutcome(ok=False, prompt_tokens=prompt_tokens)
    start = time.perf_counter()
    state = {"last": None, "chunks": 0, "usage": None}

    async def stream() -> None:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                out.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    out.error = str(chunk["error"])[:200]
                    return
                if chunk.get("usage"):
                    state["usage"] = chunk["usage"]
                now = time.perf_counter()
                if any((c.get("delta", {}).get("content") if chat else c.get("text")) for c in chunk.get("choices", ())):
                    state["chunks"] += 1
                    if state["last"] is None:
                        out.ttft_s = now - start
                    else:
                        out.itl_s.append(now - state["last"])
                    state["last"] = now

    out.sent_at = start
    try:
        await asyncio.wait_for(stream(), timeout)
    except asyncio.TimeoutError:
        out.error = f"timed out after {timeout} s"
    except Exception as err:  # connection refused / reset: counted as a failed request
        out.error = f"{type(err).__name__}: {err}"[:200]
    out.ended_at = time.perf_counter()
    if out.error:
        return out
    out.e2e_s = out.ended_at - start
    usage, chunks = state["usage"], state["chunks"]
    if usage is not None:
        out.output_tokens = int(usage.get("completion_tokens", chunks))
        out.prompt_tokens = int(usage.get("prompt_tokens", prompt_tokens))
    else:
        out.output_tokens = chunks
    out.ok = out.ttft_s is not None
    if not out.ok:
        out.error = f"no text was streamed (usage: {usage})"
    return out


def request_body(args, model: str, prompt: str | list[int]) -> dict:
    body: dict = {"model": model, "stream": True, "temperature": 0.0,
                  "stream_options": {"include_usage": True}}
    if args.endpoint == "chat":
        if not isinstance(prompt, str):
            raise SystemExit("the chat endpoint needs text prompts: give --tokenizer")
        body["messages"] = [{"role": "user", "content": prompt}]
        body["max_completion_tokens"] = args.output_len
    else:
        body["prompt"] = prompt
        body["max_tokens"] = args.output_len
    if args.ignore_eos:
        body["ignore_eos"] = True  # not OpenAI's field: hf-paged serve and vLLM accept it
    if args.extra_body:
        body.update(json.loads(args.extra_body))
    return body


# ---- one rate ------------------------------------------------------------------------------------
def arrival_offsets(num: int, rate: float, seed: int, max_duration: float) -> list[float]:
    """Seconds after the rate's start at which each request is sent: Poisson arrivals (exponential gaps)
    at ``rate``, all at 0 for ``inf``; requests that would arrive after ``max_duration`` are not sent."""
    rng = random.Random(seed + 1)
    offsets: list[float] = []
    t = 0.0
    for _ in range(num):
        if t > max_duration:
            break
        offsets.append(t)
        if math.isfinite(rate):
            t += rng.expovariate(rate)
    return offsets


def split_round_robin(items: list, parts: int) -> list[list]:
    """``parts`` interleaved shares of ``items`` (item i goes to share i % parts): every client process
    gets arrivals spread over the whole schedule, not one slice of it."""
    return [items[k::parts] for k in range(parts)]


def share_of(total: int | None, parts: int, k: int) -> int | None:
    """Share ``k`` of a bound ``total`` split as evenly as possible over ``parts`` (None: no bound)."""
    return None if total is None else total // parts + (k < total % parts)


def make_client(headers: dict, request_timeout: float):
    import httpx

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    return httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(request_timeout, connect=30.0), headers=headers)


async def run_schedule(client, url: str, jobs: list, start_at: float, chat: bool, timeout: float,
                       max_concurrency: int | None) -> list[RequestOutcome]:
    """Send each job ``(offset_s, body, prompt_tokens)`` at ``start_at + offset_s`` (a time.perf_counter()
    value) and stream its answer; wait for all. The body of one client process, whichever process it is."""
    semaphore = asyncio.Semaphore(max_concurrency) if max_concurrency else None

    async def one(offset: float, body: dict, n: int) -> RequestOutcome:
        delay = start_at + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if semaphore is None:
            return await send(client, url, body, n, chat, timeout)
        async with semaphore:
            return await send(client, url, body, n, chat, timeout)

    return list(await asyncio.gather(*(one(*job) for job in jobs)))


def peak_in_flight(outcomes: list[RequestOutcome]) -> int:
    """Most requests open at once, from every outcome's send and end times (across client processes)."""
    events = sorted([(o.sent_at, 1) for o in outcomes] + [(o.ended_at, -1) for o in outcomes],
                    key=lambda e: (e[0], e[1]))  # an end before a send at the same instant
    peak = current = 0
    for _, step in events:
        current += step
        peak = max(peak, current)
    return peak


def worker_main() -> int:
    """One client process of a multi-process run (started by ``run`` itself, never by hand): reads its
    config and jobs (one JSON line), builds its HTTP client, says ``ready``, reads the shared start time
    (one line), sends its jobs on the shared schedule, and writes its outcomes and CPU seconds (one JSON line)."""
    job = json.loads(sys.stdin.readline())

    async def go() -> tuple[list[RequestOutcome], float]:
        async with make_client(job["headers"], job["timeout"]) as client:
            print("ready", flush=True)
            start_at = float(sys.stdin.readline())
            cpu0 = time.process_time()
            outcomes = await run_schedule(client, job["url"], job["jobs"], start_at, job["chat"], job["timeout"],
                                          job["max_concurrency"])
            return outcomes, time.process_time() - cpu0

    try:  # a faster event loop when installed (hf_paged[serve] installs it): less client time per chunk
        import uvloop

        run = uvloop.run
    except ImportError:
        run = asyncio.run
    outcomes, cpu_s = run(go())
    # The result goes through a file, not stdout: after uvloop has run, a result larger than the pipe's
    # 64 KiB reached the parent cut short (seen with several workers).
    Path(job["result_path"]).write_text(json.dumps({"outcomes": [dataclasses.asdict(o) for o in outcomes], "cpu_s": cpu_s}))
    return 0


class ClientProcesses:
    """``count`` worker processes (this file, hidden ``_worker`` command) that together send one rate's jobs."""

    def __init__(self, count: int, url: str, headers: dict, chat: bool, timeout: float,
                 max_concurrency: int | None, jobs: list) -> None:
        self.procs: list[subprocess.Popen] = []
        self.tmp = tempfile.TemporaryDirectory(prefix="bench_serve_")
        self.result_paths: list[str] = []
        try:
            for k, share in enumerate(split_round_robin(jobs, count)):
                proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "_worker"],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                self.procs.append(proc)
                self.result_paths.append(f"{self.tmp.name}/worker{k}.json")
                proc.stdin.write(json.dumps({"url": url, "headers": headers, "chat": chat, "timeout": timeout,
                                             "max_concurrency": share_of(max_concurrency, count, k), "jobs": share,
                                             "result_path": self.result_paths[-1]}))
                proc.stdin.write("\n")
                proc.stdin.flush()
        except BaseException:
            self.kill()  # none left behind
            raise

    def wait_ready(self) -> None:
        for proc in self.procs:
            line = proc.stdout.readline()
            if line.strip() != "ready":
                self.kill()
                raise SystemExit(f"a client process did not start (exit status {proc.wait()}): {line[:200]!r}")

    def start(self, start_at: float) -> None:
        for proc in self.procs:
            proc.stdin.write(f"{start_at!r}\n")
            proc.stdin.flush()

    def collect(self, deadline_s: float) -> tuple[list[RequestOutcome], list[float]]:
        """Every worker's outcomes and CPU seconds, waiting at most ``deadline_s`` in all."""
        outcomes, cpu = [], []
        deadline = time.monotonic() + deadline_s
        for proc, path in zip(self.procs, self.result_paths):
            try:
                proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill()
                raise SystemExit(f"client processes still running after {deadline_s:.0f} s") from None
            if proc.returncode != 0 or not os.path.exists(path):
                self.kill()
                raise SystemExit(f"a client process failed (exit status {proc.returncode})")
            result = json.loads(Path(path).read_text())
            outcomes += [RequestOutcome(**o) for o in result["outcomes"]]
            cpu.append(result["cpu_s"])
        return outcomes, cpu

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def client_process_count(setting: str, jobs: int, max_concurrency: int | None) -> int:
    """``auto``: one process per 48 requests of the rate (one Python process streaming more SSE responses
    than that spends its core on parsing chunks, and then it, not the server, sets the measured throughput
    and latency), at most half the machine's cores; never more processes than requests or concurrency."""
    if setting == "auto":
        count = min(math.ceil(jobs / 48), max(1, (os.cpu_count() or 2) // 2))
    else:
        count = int(setting)
    return max(1, min(count, jobs, max_concurrency or jobs))


async def run_rate(args, client, url: str, model: str, prompts, lengths, rate: float,
                   headers: dict) -> tuple[list[RequestOutcome], float, dict, dict]:
    """Send every prompt with Poisson arrivals at ``rate`` (bounded by --max-duration) from one or several
    client processes; wait for all. Returns the outcomes, the duration (first send to last end, over all
    processes), the CPU use of the server's processes and of the clients during the run, and the means
    of the server's own latency histograms over the run (empty without them)."""
    chat = args.endpoint == "chat"
    offsets = arrival_offsets(len(prompts), rate, args.seed, args.max_duration)
    jobs = [(offset, request_body(args, model, prompt), n) for offset, prompt, n in zip(offsets, prompts, lengths)]
    count = client_process_count(args.client_processes, len(jobs), args.max_concurrency)
    server = CpuMeter(args.server_pid) if args.server_pid else None
    latencies_before = await scrape_server_latencies(client, args.base_url)
    if count == 1:  # in this process, as before
        if server:
            server.begin()
        cpu0 = time.process_time()
        outcomes = await run_schedule(client, url, jobs, time.perf_counter(), chat, args.request_timeout,
                                      args.max_concurrency)
        client_cpu = [time.process_time() - cpu0]
    else:
        workers = ClientProcesses(count, url, headers, chat, args.request_timeout, args.max_concurrency, jobs)
        try:
            workers.wait_ready()
            if server:
                server.begin()
            # A little ahead, so that every worker has the start time before the first arrival.
            workers.start(time.perf_counter() + 0.05)
            outcomes, client_cpu = workers.collect(args.max_duration + args.request_timeout + 60)
        finally:
            workers.kill()
    duration = max(o.ended_at for o in outcomes) - min(o.sent_at for o in outcomes)
    cpu = {"client_processes": count, "client_pct": [100 * c / duration for c in client_cpu]}
    if server:
        cpu.update(server.end(duration))
    means = server_means(latencies_before, await scrape_server_latencies(client, args.base_url))
    return outcomes, duration, cpu, means


# ---- the server's own latency histograms ---------------------------------------------------------
SERVER_SERIES = {"ttft": "time_to_first_token_seconds", "itl": "inter_token_latency_seconds",
                 "e2el": "e2e_request_latency_seconds"}


async def scrape_server_latencies(client, base_url: str) -> dict[str, float] | None:
    """Sums and counts of the server's own latency histograms from its Prometheus ``/metrics`` (any name
    prefix: ``hf_paged:``, ``vllm:``); None when it serves none. Differences over a run give the server's
    means, which the client's can be checked against (a gap is time spent between the server and here)."""
    try:
        resp = await client.get(base_url.rstrip("/") + "/metrics")
    except Exception:  # noqa: BLE001 - no metrics endpoint is fine: the comparison is skipped
        return None
    if resp.status_code != 200:
        return None
    wanted = {f"{name}_{part}" for name in SERVER_SERIES.values() for part in ("sum", "count")}
    out: dict[str, float] = {}
    for line in resp.text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name, _, value = line.rpartition(" ")
        name = name.split("{", 1)[0].rsplit(":", 1)[-1]
        if name in wanted:
            out[name] = out.get(name, 0.0) + float(value)
    return out or None


def server_means(before: dict | None, after: dict | None) -> dict[str, float]:
    """Mean TTFT / ITL / E2E in ms of what the server recorded between two scrapes."""
    means = {}
    for key, name in SERVER_SERIES.items():
        if before is None or after is None:
            break
        count = after.get(f"{name}_count", 0.0) - before.get(f"{name}_count", 0.0)
        if count > 0:
            means[f"server_{key}_mean_ms"] = 1000 * (after[f"{name}_sum"] - before.get(f"{name}_sum", 0.0)) / count
    return means


# ---- CPU use of the server's processes -----------------------------------------------------------
class CpuMeter:
    """CPU seconds (user + system, from /proc/<pid>/stat) of a server process, each of its threads, and
    each of its descendant processes (the engine's own process) between ``begin`` and ``end``."""

    def __init__(self, pid: int) -> None:
        if not Path(f"/proc/{pid}/stat").exists():
            raise SystemExit(f"--server-pid {pid}: no such process (it must run on this machine)")
        self.pid = pid
        self.tick = os.sysconf("SC_CLK_TCK")
        self.before: dict = {}

    def _stat(self, path: str) -> tuple[list[str], str] | None:
        try:
            text = Path(path).read_text()
        except OSError:  # exited meanwhile
            return None
        name = text[text.index("(") + 1: text.rindex(")")]
        return text[text.rindex(")") + 2:].split(), name

    def _cpu(self, path: str) -> float | None:
        stat = self._stat(path)
        # utime and stime are fields 14 and 15 of stat, i.e. 11 and 12 after "pid (comm)".
        return None if stat is None else (int(stat[0][11]) + int(stat[0][12])) / self.tick

    def _descendants(self) -> list[int]:
        parents: dict[int, int] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                stat = self._stat(f"/proc/{entry.name}/stat")
                if stat is not None:
                    parents[int(entry.name)] = int(stat[0][1])
        found, frontier = [], [self.pid]
        while frontier:
            frontier = [pid for pid, parent in parents.items() if parent in frontier]
            found += frontier
        return found

    def _snapshot(self) -> dict:
        snap = {"server": self._cpu(f"/proc/{self.pid}/stat"), "threads": {}, "children": {}}
        for task in Path(f"/proc/{self.pid}/task").iterdir():
            snap["threads"][task.name] = self._cpu(f"{task}/stat")
        for pid in self._descendants():
            snap["children"][pid] = self._cpu(f"/proc/{pid}/stat")
        return snap

    def begin(self) -> None:
        self.before = self._snapshot()

    def end(self, duration: float) -> dict:
        """Percent of one core over ``duration`` seconds: the server process, its three busiest threads, and
        each descendant process that used any CPU."""
        after = self._snapshot()

        def pct(now, then):
            return None if now is None or then is None else 100 * (now - then) / duration

        threads = sorted((p for tid, v in after["threads"].items()
                          if (p := pct(v, self.before["threads"].get(tid, 0.0))) is not None), reverse=True)
        children = {str(pid): p for pid, v in after["children"].items()
                    if (p := pct(v, self.before["children"].get(pid, 0.0))) is not None and p >= 0.5}
        return {"server_pct": pct(after["server"], self.before["server"]), "server_top_threads_pct": threads[:3],
                "server_children_pct": children}


def render_cpu(cpu: dict) -> str:
    """One line: who used how much of a core during the rate's run (a process near 100% is saturated)."""
    parts = []
    if cpu.get("server_pct") is not None:
        threads = ", ".join(f"{t:.0f}" for t in cpu["server_top_threads_pct"])
        parts.append(f"server front end {cpu['server_pct']:.0f}% (busiest threads {threads})")
        for pid, p in sorted(cpu["server_children_pct"].items(), key=lambda kv: -kv[1]):
            parts.append(f"server child {pid} {p:.0f}%")
    clients = cpu["client_pct"]
    parts.append(f"{cpu['client_processes']} client process(es) " + ", ".join(f"{c:.0f}" for c in clients) + "%")
    return "CPU, % of one core over the run: " + "; ".join(parts)


def render_server_means(row: dict) -> str:
    """The server's own latency means next to the client's: a gap is time lost between the two."""
    def means(prefix: str) -> str:
        return ", ".join(f"{key.upper()} {row[f'{prefix}{key}_mean_ms']:,.1f}" for key in SERVER_SERIES
                         if row.get(f"{prefix}{key}_mean_ms") is not None)

    return f"means in ms, as the server measured them: {means('server_')}; as this client did: {means('')}"


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    pos = (len(values) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def summarize(rate: float, outcomes: list[RequestOutcome], duration: float, slo: dict[str, float],
              cpu: dict | None = None) -> dict:
    ok = [o for o in outcomes if o.ok]
    out_tokens = sum(o.output_tokens for o in ok)
    in_tokens = sum(o.prompt_tokens for o in ok)
    series = {
        "ttft": [o.ttft_s for o in ok],
        "tpot": [o.tpot_s for o in ok if o.tpot_s is not None],
        "itl": [gap for o in ok for gap in o.itl_s],
        "e2el": [o.e2e_s for o in ok],
    }
    row = {
        "rate": rate if math.isfinite(rate) else "inf",
        "sent": len(outcomes),
        "completed": len(ok),
        "failed": len(outcomes) - len(ok),
        "errors": sorted({o.error for o in outcomes if o.error})[:5],
        "duration_s": duration,
        "peak_in_flight": peak_in_flight(outcomes),
        "req_per_s": len(ok) / duration,
        "out_tok_per_s": out_tokens / duration,
        "total_tok_per_s": (out_tokens + in_tokens) / duration,
        "output_tokens": out_tokens,
        "prompt_tokens": in_tokens,
    }
    for name, values in series.items():
        row[f"{name}_mean_ms"] = 1000 * sum(values) / len(values) if values else None
        for q in (50, 99):
            v = _pct(values, q)
            row[f"{name}_p{q}_ms"] = None if v is None else 1000 * v
    if slo:
        def good(o: RequestOutcome) -> bool:
            values = {"ttft": o.ttft_s, "tpot": o.tpot_s, "e2el": o.e2e_s}
            # A one-token answer has no TPOT: it cannot miss that SLO.
            return all((values[k] is None and k == "tpot") or (values[k] is not None and 1000 * values[k] <= limit)
                       for k, limit in slo.items())

        row["goodput_req_per_s"] = sum(1 for o in ok if good(o)) / duration
    if cpu is not None:
        row["cpu"] = cpu
    return row


def render_table(rows: list[dict], label: str) -> str:
    cols = [("rate", "rate"), ("completed", "done"), ("failed", "failed"), ("req_per_s", "req/s"),
            ("out_tok_per_s", "out tok/s"), ("ttft_p50_ms", "TTFT p50"), ("ttft_p99_ms", "TTFT p99"),
            ("tpot_p50_ms", "TPOT p50"), ("tpot_p99_ms", "TPOT p99"), ("itl_p50_ms", "ITL p50"),
            ("itl_p99_ms", "ITL p99"), ("e2el_p50_ms", "E2E p50"), ("e2el_p99_ms", "E2E p99")]
    if any("goodput_req_per_s" in r for r in rows):
        cols.append(("goodput_req_per_s", "goodput req/s"))

    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:,.2f}" if v < 100 else f"{v:,.0f}"
        return str(v)

    lines = [f"{label} (latencies in ms)", "| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(k)) for k, _ in cols) + " |" for r in rows]
    return "\n".join(lines)


def check_loopback(base_url: str) -> None:
    host = urlparse(base_url).hostname
    if host not in LOOPBACK:
        raise SystemExit(f"--base-url must point at this machine (127.0.0.1, localhost or ::1), got host {host!r}")


async def _served_model(client, base_url: str) -> str:
    resp = await client.get(f"{base_url}/v1/models")
    resp.raise_for_status()
    return resp.json()["data"][0]["id"]


async def main_run_async(args) -> int:
    check_loopback(args.base_url)
    if args.client_processes != "auto" and not (args.client_processes.isdigit() and 1 <= int(args.client_processes) <= 64):
        raise SystemExit(f"--client-processes must be auto or 1..64, got {args.client_processes!r}")
    if not 1 <= args.num_prompts <= 100_000:
        raise SystemExit(f"--num-prompts must be in 1..100000, got {args.num_prompts}")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise SystemExit(f"--max-concurrency must be >= 1, got {args.max_concurrency}")
    rates = [float(r) for r in args.rates.split(",")]
    if any(not (r > 0) for r in rates):
        raise SystemExit(f"--rates must be positive numbers or inf, got {args.rates!r}")
    slo = {}
    for part in filter(None, (args.goodput or "").split(",")):
        key, _, ms = part.partition(":")
        if key not in ("ttft", "tpot", "e2el"):
            raise SystemExit(f"--goodput keys are ttft, tpot, e2el (milliseconds), got {key!r}")
        slo[key] = float(ms)
    prompts, lengths = make_prompts(args.num_prompts, args.input_len, args.seed, args.tokenizer, args.vocab_size)
    first_lengths = lengths
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with make_client(headers, args.request_timeout) as client:
        model = args.model or await _served_model(client, args.base_url)
        path = "/v1/chat/completions" if args.endpoint == "chat" else "/v1/completions"
        url = args.base_url.rstrip("/") + path
        # Warm-up (not measured): first-request costs (compilation, graph capture, connection setup), with
        # the longest prompts so that buffers sized by sequence length are at their final size.
        warm_prompts, warm_lengths = make_prompts(max(args.warmup, 1) * 4, args.input_len, args.seed + 104729,
                                                  args.tokenizer, args.vocab_size)
        longest = sorted(range(len(warm_prompts)), key=lambda i: -warm_lengths[i])[: args.warmup]
        warm = await asyncio.gather(*(send(client, url, request_body(args, model, warm_prompts[i]), warm_lengths[i],
                                           args.endpoint == "chat", args.request_timeout) for i in longest))
        bad = [o.error for o in warm if not o.ok]
        if bad:
            raise SystemExit(f"warm-up requests failed: {bad[:3]}")
        rows = []
        saved_prompts = prompts
        for rate in rates:
            # Fresh prompts per rate: the server's prefix cache must not serve one rate the prompts of another.
            # Seeded by the rate itself, so rate inf always sends --seed's prompts: two runs (say, two server
            # modes) and `offline` compare on exactly the same requests whatever the other rates were.
            rate_seed = rate_prompt_seed(args.seed, rate)
            if rate_seed != args.seed:
                prompts, lengths = make_prompts(args.num_prompts, args.input_len, rate_seed, args.tokenizer, args.vocab_size)
            else:
                prompts, lengths = saved_prompts, first_lengths
            outcomes, duration, cpu, means = await run_rate(args, client, url, model, prompts, lengths, rate, headers)
            rows.append(summarize(rate, outcomes, duration, slo, cpu) | means)
            print(render_table(rows[-1:], f"{args.label} @ rate {rate}"), flush=True)
            print(render_cpu(cpu), flush=True)
            if means:
                print(render_server_means(rows[-1]), flush=True)
    print()
    print(render_table(rows, f"{args.label}: {args.num_prompts} prompts of {args.input_len[0]}..{args.input_len[1]} "
                             f"tokens, {args.output_len} new, {args.endpoint} endpoint, model {model}"))
    if args.out:
        record = {"label": args.label, "base_url": args.base_url, "model": model, "endpoint": args.endpoint,
                  "num_prompts": args.num_prompts, "input_len": list(args.input_len), "output_len": args.output_len,
                  "slo_ms": slo, "rows": rows, "prompts": saved_prompts}  # rate inf's (offline reruns them)
        Path(args.out).write_text(json.dumps(record))
        print(f"wrote {args.out}")
    failed = sum(r["failed"] for r in rows)
    return 1 if failed and args.fail_on_error else 0


# ---- plot ----------------------------------------------------------------------------------------
def main_plot(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [json.loads(Path(p).read_text()) for p in args.results]
    rates = []
    for run in runs:
        for row in run["rows"]:
            if row["rate"] not in rates:
                rates.append(row["rate"])
    rates.sort(key=lambda r: math.inf if r == "inf" else r)
    xs = {r: i for i, r in enumerate(rates)}
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, (key, title) in zip(axes.flat, [("ttft", "time to first token"), ("tpot", "time per output token"),
                                             ("itl", "inter-token latency"), ("e2el", "end-to-end latency")]):
        for run in runs:
            rows = sorted(run["rows"], key=lambda r: xs[r["rate"]])
            x = [xs[r["rate"]] for r in rows]
            line, = ax.plot(x, [r[f"{key}_p50_ms"] for r in rows], marker="o", label=f"{run['label']} p50")
            ax.plot(x, [r[f"{key}_p99_ms"] for r in rows], marker="x", linestyle="--", color=line.get_color(),
                    label=f"{run['label']} p99")
        ax.set_title(title)
        ax.set_xticks(range(len(rates)), [str(r) for r in rates])
        ax.set_xlabel("request rate (req/s; inf = all at once)")
        ax.set_ylabel("ms")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    first = runs[0]
    fig.suptitle(f"{first['num_prompts']} prompts of {first['input_len'][0]}..{first['input_len'][1]} tokens, "
                 f"{first['output_len']} new tokens")
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    for run in runs:
        print(render_table(run["rows"], run["label"]))
    print(f"wrote {args.out}")
    return 0


# ---- offline ceiling and model folders -----------------------------------------------------------
def main_offline(args) -> int:
    """ContinuousGenerator on the exact prompts a ``run`` sent: the throughput the server is measured against."""
    import torch
    import transformers

    from hf_paged import ContinuousGenerator, SamplingParams

    records = [json.loads(Path(p).read_text()) for p in args.requests or () if Path(p).is_file()]
    record = records[0] if records else None
    if record is not None:
        prompts = record["prompts"][: args.num_prompts or None]
        output_len = args.output_len or record["output_len"]
    else:  # the prompts a `run` with the same --num-prompts / --input-len / --seed sends at rate inf
        prompts, _ = make_prompts(args.num_prompts or 200, args.input_len, args.seed, args.model, None)
        output_len = args.output_len or 256
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device).eval()
    tok = transformers.AutoTokenizer.from_pretrained(args.model)
    gen = ContinuousGenerator(model, tok, progress=False)
    params = SamplingParams(max_new_tokens=output_len, temperature=0.0, ignore_eos=True)
    # Warm-up as the server's: the same first requests, then a clean prefix cache.
    gen.generate(prompts[:8], SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True))
    gen.reset_prefix_cache()
    rows = []
    for _ in range(args.repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        results = gen.generate(prompts, params)
        if device == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
        out_tokens = sum(len(s.token_ids) for r in results for s in r.samples)
        rows.append({"wall_s": wall, "req_per_s": len(prompts) / wall, "out_tok_per_s": out_tokens / wall})
        gen.reset_prefix_cache()
    best = max(rows, key=lambda r: r["out_tok_per_s"])
    print(f"offline ContinuousGenerator, {len(prompts)} prompts x {output_len} new tokens: "
          + ", ".join(f"{r['out_tok_per_s']:,.0f} out tok/s ({r['wall_s']:.2f} s)" for r in rows))
    ratios = {}
    for rec in records:  # each run's saturation point (rate inf) against offline, on the same prompts
        served = [r for r in rec["rows"] if r["rate"] == "inf"]
        if not served:
            continue
        if rec["prompts"][: len(prompts)] != prompts or rec["output_len"] != output_len:
            print(f"{rec['label']}: its rate-inf requests differ from these (another seed or length): not compared")
            continue
        ratios[rec["label"]] = ratio = served[0]["out_tok_per_s"] / best["out_tok_per_s"]
        tpot = served[0]["tpot_p50_ms"]
        print(f"saturation ({rec['label']}, rate inf): {served[0]['out_tok_per_s']:,.0f} out tok/s = {ratio:.1%} of "
              f"offline {best['out_tok_per_s']:,.0f}; TPOT p50 " + ("n/a" if tpot is None else f"{tpot:.1f} ms"))
    if args.out:
        Path(args.out).write_text(json.dumps({"offline": rows, "num_prompts": len(prompts), "output_len": output_len,
                                              "saturation_ratio": ratios}))
    return 0


def pad_vocab(tokenizer_json: dict, size: int) -> None:
    """Give every id of a larger model's vocabulary a text (" t<id>"), so that every generated token
    streams as text: a random-weight model samples ids across its whole vocabulary, and an id the
    tokenizer does not know decodes to nothing (no chunk, no TTFT). No merge produces the new entries,
    so encoding is unchanged."""
    vocab = tokenizer_json["model"]["vocab"]
    if size < len(vocab):
        raise SystemExit(f"the model's vocabulary ({size}) is smaller than the tokenizer's ({len(vocab)})")
    for i in range(len(vocab), size):
        name = f"\u0120t{i}"  # byte-level spelling of " t<i>"
        assert name not in vocab, name
        vocab[name] = i


def main_save_model(args) -> int:
    """A random-weight shape (``hf-paged bench``'s) saved as a model folder with the embedded tokenizer."""
    import shutil
    from importlib import resources

    import torch

    from hf_paged.entrypoints.bench import build_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.shape == "default":  # the embedded default model (CPU-sized), as `hf-paged serve` builds it
        from hf_paged.entrypoints.demo import load_model

        model, _ = load_model(None, device, getattr(torch, args.dtype))
    else:
        model = build_model(args.shape, device, getattr(torch, args.dtype))
    # Fixed-length outputs for every server: no end-of-sequence token ends a request early.
    model.generation_config.eos_token_id = None
    model.config.eos_token_id = None
    out = Path(args.out)
    model.save_pretrained(out)
    folder = resources.files("hf_paged").joinpath("default_model")
    shutil.copyfile(str(folder.joinpath("tokenizer_config.json")), out / "tokenizer_config.json")
    tokenizer = json.loads(folder.joinpath("tokenizer.json").read_text())
    pad_vocab(tokenizer, model.get_output_embeddings().weight.shape[0])
    (out / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    print(f"wrote {args.shape} ({sum(p.numel() for p in model.parameters()) / 1e6:,.0f} M parameters, "
          f"{args.dtype}) with the embedded tokenizer to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="a rate sweep against a running server")
    run.add_argument("--base-url", default="http://127.0.0.1:8000")
    run.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    run.add_argument("--model", help="the model name to send (default: the first of GET /v1/models)")
    run.add_argument("--api-key")
    run.add_argument("--tokenizer", help="tokenizer folder: text prompts of exact token lengths")
    run.add_argument("--vocab-size", type=int, help="without --tokenizer: random token-id prompts below this id")
    run.add_argument("--num-prompts", type=int, default=200)
    run.add_argument("--input-len", type=parse_range, default=(64, 1024), help="N or LO:HI tokens (uniform)")
    run.add_argument("--output-len", type=int, default=256)
    run.add_argument("--rates", default="1,4,16,inf", help="comma-separated requests/s; inf sends all at once")
    run.add_argument("--max-concurrency", type=int, help="most requests in flight at once (default: no bound)")
    run.add_argument("--client-processes", default="auto",
                     help="processes that send the requests (each streams its share; 1: this process alone; "
                          "default auto: one per 48 requests of a rate, at most half the cores)")
    run.add_argument("--server-pid", type=int, help="the server's process id on this machine: report the CPU use of "
                     "it, its busiest threads and its child processes (the engine's) under each rate")
    run.add_argument("--max-duration", type=float, default=300.0, help="stop sending new requests of a rate after this many seconds")
    run.add_argument("--request-timeout", type=float, default=600.0)
    run.add_argument("--warmup", type=int, default=2, help="unmeasured requests before the sweep")
    run.add_argument("--ignore-eos", action="store_true", help="send ignore_eos (hf-paged serve, vLLM; not transformers serve)")
    run.add_argument("--extra-body", help="JSON object merged into every request body")
    run.add_argument("--goodput", help="SLOs in ms, e.g. ttft:2000,tpot:100,e2el:30000")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--label", default="server")
    run.add_argument("--out", help="JSON file for the results (and the prompts, for `offline` and `plot`)")
    run.add_argument("--fail-on-error", action="store_true", help="exit 1 if any request failed")
    plot = sub.add_parser("plot", help="PNG of latency against rate for one or more `run` results")
    plot.add_argument("results", nargs="+")
    plot.add_argument("--out", default="serve_latency.png")
    off = sub.add_parser("offline", help="ContinuousGenerator throughput on the prompts of a `run` result")
    off.add_argument("--model", required=True, help="the model folder the server loaded")
    off.add_argument("--requests", nargs="+", help="`run` result JSONs: the first one's rate-inf prompts are rerun, "
                     "and each run's rate-inf row is compared with offline (missing files are skipped)")
    off.add_argument("--output-len", type=int)
    off.add_argument("--num-prompts", type=int)
    off.add_argument("--input-len", type=parse_range, default=(64, 1024), help="without --requests: as `run`'s")
    off.add_argument("--seed", type=int, default=0)
    off.add_argument("--dtype")
    off.add_argument("--repeats", type=int, default=2)
    off.add_argument("--out")
    save = sub.add_parser("save-model", help="save a random-weight shape with the embedded tokenizer")
    save.add_argument("--shape", default="llama-8b", help="llama-1b | llama-8b | default (the embedded CPU-sized model)")
    save.add_argument("--dtype", default="bfloat16")
    save.add_argument("--out", required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["_worker"]:  # one client process of `run` (not a user command: not in --help)
        return worker_main()
    args = build_parser().parse_args(argv)
    if args.command == "run":
        return asyncio.run(main_run_async(args))
    if args.command == "plot":
        return main_plot(args)
    if args.command == "offline":
        return main_offline(args)
    return main_save_model(args)


if __name__ == "__main__":
    sys.exit(main())
