"""Keep the garbage collector's pauses out of the step loop.

CPython's cyclic collector walks every tracked object of the generations it collects. A process holding a
transformers model tracks hundreds of thousands of long-lived objects (modules, parameters, configs,
tokenizer tables), and every request and step allocates containers, so collections run often and the
older-generation ones walk all of them: 62 collections took 0.29 s of a 3.8 s run of 512 prompts on a
tiny CPU model, time the host does not spend feeding the device. ``gc.freeze()`` moves every object that
exists now to a permanent generation the collector skips (what vLLM does once its engine has started);
``gc.unfreeze()`` at the end puts them back, so garbage cycles made of pre-run objects are collected
afterwards, not leaked.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def objects_before_frozen() -> Iterator[None]:
    """Within the block, collections skip every object that existed when it began."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
