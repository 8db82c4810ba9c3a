"""The online engine's step loop in a child process (``AsyncEngine.from_spec``).

Why: a server streaming to hundreds of clients spends a lot of Python (HTTP, SSE chunks, text) in its
process; with the step loop in the same process, that Python takes the interpreter lock away from the
loop between GPU steps and every step gets slower. In a process of its own the loop has an interpreter
to itself; only plain messages cross over (the standard library's ``multiprocessing``, spawn context,
and two one-way pipes)::

    front end                                         child process
    ---------                                         -------------
    sender thread:  inbox -> (commands, stop) ----->  StepLoop.run: take() polls the pipe between steps
                                                      (blocks on it when idle), applies, steps,
    reader thread:  dispatch <- ("step", StepOutput)  publishes one pickled StepOutput per step
                           <- ("failed", traceback, stats)
                           <- ("ready", facts, stats) once, after loading

The child builds the model from the ``ModelSpec`` (a CUDA model cannot be pickled across), ignores
SIGINT / SIGTERM (the front end drains and then tells it to stop), and exits when the command pipe
closes: after ``shutdown``, and also when the front end's process dies, so it never outlives it. The
front end notices the child's death by the end of the output pipe: every request then gets
``EngineDeadError``.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import multiprocessing.util  # noqa: F401 - see the note on exit order below
import os
import pickle
import signal
import sys
import threading
import traceback
from typing import Any

from ..options import EngineOptions
from .model_spec import ModelSpec
from .step_loop import EngineFacts, EngineProcessError, StepLoop, StepOutput

# Seconds a stopped child gets to send its last output and exit before it is killed.
EXIT_GRACE_S = 30.0
# Linux: pipe buffers this large (the default is 64 KiB, about four steps of 256 requests' outputs), so
# that a front end busy for a moment does not stall the step loop on a full pipe.
PIPE_BYTES = 1 << 20

# Exit order: at interpreter exit, multiprocessing's own exit hook (registered when multiprocessing.util
# is imported) terminates daemonic children and joins them; this child ignores SIGTERM, so it must be
# told to stop before that. AsyncEngine.from_spec registers its shutdown hook after importing this
# module, and exit hooks run last-registered first, so the engine stops its child first.


class ProcessBackend:
    """Starts the child and moves messages between it and the front end (``AsyncEngine``)."""

    def __init__(self, frontend: Any, spec: ModelSpec, options: EngineOptions) -> None:
        self.frontend = frontend
        ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold CUDA or threads
        self.commands, child_commands = ctx.Pipe(duplex=False)[::-1]  # (writer here, reader there)
        self.outputs, child_outputs = ctx.Pipe(duplex=False)  # (reader here, writer there)
        self.process = ctx.Process(
            target=_child_main, args=(spec, options, child_commands, child_outputs), name="hf_paged-engine", daemon=True
        )
        for conn in (self.commands, self.outputs):
            _widen_pipe(conn)
        self.process.start()
        # Only the child holds its ends now: when either side exits, the other reads end-of-file.
        child_commands.close()
        child_outputs.close()
        self.sender: threading.Thread | None = None
        self.reader: threading.Thread | None = None
        self._last_stats = None

    def wait_ready(self) -> tuple[EngineFacts, Any]:
        """Block until the child has loaded its model (facts, stats) or failed (``EngineProcessError``)."""
        try:
            message = pickle.loads(self.outputs.recv_bytes())
        except (EOFError, OSError):
            self.process.join(EXIT_GRACE_S)
            raise EngineProcessError(
                f"the engine process exited while loading the model ({_exit_text(self.process.exitcode)})"
            ) from None
        if message[0] == "failed":
            raise EngineProcessError(f"the engine process failed while loading the model:\n{message[1]}")
        _, facts, stats = message
        self._last_stats = stats
        return facts, stats

    def start_threads(self) -> None:
        self.sender = threading.Thread(target=self._send, name="hf_paged-engine-send", daemon=True)
        self.reader = threading.Thread(target=self._read, name="hf_paged-engine-read", daemon=True)
        self.sender.start()
        self.reader.start()

    def is_alive(self) -> bool:
        return self.reader is not None and self.reader.is_alive() and self.process.is_alive()

    def _send(self) -> None:
        while True:
            commands, stop = self.frontend._take_inbox(True)
            try:
                self.commands.send_bytes(pickle.dumps((commands, stop), protocol=5))
            except OSError:  # the child is gone; the reader reports it
                return
            if stop:
                return

    def _read(self) -> None:
        frontend = self.frontend
        try:
            while True:
                message = pickle.loads(self.outputs.recv_bytes())
                if message[0] == "step":
                    out: StepOutput = message[1]
                    self._last_stats = out.stats or self._last_stats
                    frontend._dispatch(out)
                    if out.final:
                        return
                else:  # ("failed", traceback text, stats)
                    frontend._die(EngineProcessError(f"a step failed in the engine process:\n{message[1]}"), message[2])
                    return
        except (EOFError, OSError):
            self.process.join(EXIT_GRACE_S)
            # Its pool went with it: nothing runs or holds blocks any more.
            stats = self._last_stats and dataclasses.replace(self._last_stats, running=0, waiting=0, kv_blocks_used=0)
            frontend._die(EngineProcessError(f"the engine process died ({_exit_text(self.process.exitcode)})"), stats)
        except BaseException as error:  # noqa: BLE001 - a failure here must reach the callers, as one in a step does
            self.kill()
            frontend._die(error, None)

    def join(self) -> None:
        """After the stop command: wait for the final output and the child's exit; a child that does not
        get there within ``EXIT_GRACE_S`` (a step hung in a driver call, say) is killed."""
        threads = [t for t in (self.sender, self.reader) if t is not None and t is not threading.current_thread()]
        for thread in threads:
            thread.join(EXIT_GRACE_S)
        self.process.join(EXIT_GRACE_S)
        if self.process.is_alive() or any(t.is_alive() for t in threads):
            self.kill()  # the reader then reads end-of-file and fails what is left
            for thread in threads:
                thread.join(EXIT_GRACE_S)
        self.commands.close()
        self.outputs.close()

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join()


def _widen_pipe(conn: Any) -> None:
    try:
        import fcntl

        fcntl.fcntl(conn.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    except (ImportError, AttributeError, OSError):  # not Linux, or above the system's limit: the default stays
        pass


def _exit_text(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _child_main(spec: ModelSpec, options: EngineOptions, commands: Any, outputs: Any) -> None:
    """The engine process: load, report ready, run the step loop until told to stop or orphaned."""
    # Ctrl-C in a terminal and a service manager's SIGTERM reach the whole process group: the front end
    # handles them (it drains its requests, then stops this process); dying here first would fail them.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        code = _serve(spec, options, commands, outputs)
    except OSError:  # the output pipe broke: the front end is gone, nobody to report to
        code = 1
    finally:
        commands.close()
        outputs.close()
    # Everything is released (pool, runner, pipes); skip the interpreter's teardown of torch and the
    # model, which takes seconds and would only delay the front end's shutdown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _serve(spec: ModelSpec, options: EngineOptions, commands: Any, outputs: Any) -> int:
    """Load and run; the exit code (0: stopped by the front end, 1: failed)."""
    from .core import EngineCore

    def send(message: tuple) -> None:
        outputs.send_bytes(pickle.dumps(message, protocol=5))

    try:
        model, tokenizer = spec.load()
        core = EngineCore(model, tokenizer, options)
    except BaseException:  # noqa: BLE001 - reported to the front end, which raises it
        send(("failed", traceback.format_exc(), None))
        return 1
    send(("ready", EngineFacts.of(core, copy_config=True), core.stats()))

    def take(block: bool) -> tuple[list, bool]:
        batch: list = []
        # Busy: only what has already arrived (a poll per step); idle: wait for the next message.
        while block or commands.poll(0):
            try:
                received, stop = pickle.loads(commands.recv_bytes())
            except EOFError:  # the front end's process is gone: abort everything and exit
                return batch, True
            batch.extend(received)
            if stop:
                return batch, True
            block = False
        return batch, False

    failed: list[BaseException] = []

    def on_failure(error: BaseException, stats: Any) -> None:
        failed.append(error)
        send(("failed", "".join(traceback.format_exception(error)), stats))

    StepLoop(core).run(take, lambda out: send(("step", out)), on_failure)
    return 1 if failed else 0
