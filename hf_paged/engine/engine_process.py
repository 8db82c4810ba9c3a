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
import pickle
import signal
import threading
import traceback
from typing import Any

from ..options import EngineOptions
from .model_spec import ModelSpec
from .step_loop import EngineFacts, EngineProcessError, StepLoop, StepOutput

# Seconds a stopped child gets to exit after its last output before it is killed.
EXIT_GRACE_S = 30.0


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

    def join(self) -> None:
        current = threading.current_thread()
        for thread in (self.sender, self.reader):
            if thread is not None and thread is not current:
                thread.join()
        self.process.join(EXIT_GRACE_S)
        if self.process.is_alive():
            self.kill()
        self.commands.close()
        self.outputs.close()

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join()


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
    from .core import EngineCore

    def send(message: tuple) -> None:
        outputs.send_bytes(pickle.dumps(message, protocol=5))

    try:
        try:
            model, tokenizer = spec.load()
            core = EngineCore(model, tokenizer, options)
        except BaseException:  # noqa: BLE001 - reported to the front end, which raises it
            send(("failed", traceback.format_exc(), None))
            return
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

        def on_failure(error: BaseException, stats: Any) -> None:
            text = "".join(traceback.format_exception(error))
            send(("failed", text, stats))

        StepLoop(core).run(take, lambda out: send(("step", out)), on_failure)
    except OSError:  # the output pipe broke: the front end is gone, nobody to report to
        pass
    finally:
        commands.close()
        outputs.close()
