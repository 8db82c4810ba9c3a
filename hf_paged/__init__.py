"""hf_paged: PagedAttention and continuous batching for ordinary Hugging Face models.

    import hf_paged
    hf_paged.enable(model)            # model.generate() now keeps its KV cache in a block pool
    hf_paged.disable(model)           # and back
"""

import importlib.util as _importlib_util
import sys as _sys
from pathlib import Path as _Path


def _map_source_kernels() -> None:
    """Make ``hf_paged.kernels`` importable from a source checkout that was never installed.

    An install maps the repository's top-level ``kernels/`` folder to ``hf_paged.kernels`` (pyproject's
    package-dir); running from a plain checkout (``PYTHONPATH=.``, the GPU machines) gets the same mapping
    here. Never as a top-level ``kernels`` module, which would shadow Hugging Face's ``kernels`` package.
    """
    if "hf_paged.kernels" in _sys.modules or _importlib_util.find_spec("hf_paged.kernels") is not None:
        return
    folder = _Path(__file__).resolve().parent.parent / "kernels"
    if not (folder / "__init__.py").is_file():
        return
    spec = _importlib_util.spec_from_file_location(
        "hf_paged.kernels", folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    module = _importlib_util.module_from_spec(spec)
    _sys.modules["hf_paged.kernels"] = module
    spec.loader.exec_module(module)


_map_source_kernels()

from .integration.attention import ATTENTION_NAME  # noqa: E402
from .memory.block_allocator import BlockAllocator  # noqa: E402
from .integration.cache import PagedCache, PoolExhaustedError  # noqa: E402
from .integration.enable import disable, enable, is_enabled  # noqa: E402
from .entrypoints.generator import ContinuousGenerator, GeneratorOptions, GeneratorStats  # noqa: E402
from .engine.request import GenerationResult, SampleResult, StreamEvent, TokenLogprobs  # noqa: E402
from .engine.sampling_params import SamplingParams  # noqa: E402

__all__ = [
    "ATTENTION_NAME",
    "BlockAllocator",
    "ContinuousGenerator",
    "GenerationResult",
    "GeneratorOptions",
    "GeneratorStats",
    "SampleResult",
    "SamplingParams",
    "StreamEvent",
    "TokenLogprobs",
    "PagedCache",
    "PoolExhaustedError",
    "disable",
    "enable",
    "is_enabled",
]
__version__ = "0.1.0"
