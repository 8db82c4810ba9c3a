"""hf_paged: PagedAttention and continuous batching for ordinary Hugging Face models.

    import hf_paged
    hf_paged.enable(model)            # model.generate() now keeps its KV cache in a block pool
    hf_paged.disable(model)           # and back
"""

import importlib.util as _importlib_util
import sys as _sys
from pathlib import Path as _Path


def _map_source_kernels() -> None:
    """Make ``hf_paged.kernels`` the checkout's own ``kernels/`` when hf_paged is imported from a source checkout.

    An install maps the repository's top-level ``kernels/`` folder to ``hf_paged.kernels`` (pyproject's
    package-dir); running from a plain checkout (``PYTHONPATH=.``, the GPU machines) gets the same mapping
    here. Never as a top-level ``kernels`` module, which would shadow Hugging Face's ``kernels`` package.
    """
    if "hf_paged.kernels" in _sys.modules:
        return
    # A source checkout always uses its own kernels/, even when an install of another checkout (an
    # editable one, say) would map hf_paged.kernels elsewhere; the checks keep any other package's
    # top-level folder (Hugging Face's own `kernels`, beside an installed hf_paged) out.
    root = _Path(__file__).resolve().parent.parent
    folder = root / "kernels"
    is_checkout = (root / "pyproject.toml").is_file() and (folder / "paged_attention.py").is_file()
    if not is_checkout:
        return
    spec = _importlib_util.spec_from_file_location(
        "hf_paged.kernels", folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    module = _importlib_util.module_from_spec(spec)
    _sys.modules["hf_paged.kernels"] = module
    spec.loader.exec_module(module)


_map_source_kernels()

# Public names -> the module that defines them, imported on first use (PEP 562): ``import hf_paged``
# and ``hf-paged --help`` stay fast because torch and transformers load only when something needs them.
_EXPORTS = {
    "ATTENTION_NAME": ".integration.attention",
    "BlockAllocator": ".memory.block_allocator",
    "PagedCache": ".integration.cache",
    "PoolExhaustedError": ".integration.cache",
    "disable": ".integration.enable",
    "enable": ".integration.enable",
    "is_enabled": ".integration.enable",
    "AsyncEngine": ".engine.async_engine",
    "EngineDeadError": ".engine.async_engine",
    "EngineOverloadedError": ".engine.async_engine",
    "EngineProcessError": ".engine.async_engine",
    "ModelSpec": ".engine.model_spec",
    "EngineStats": ".engine.core",
    "RequestMetrics": ".engine.core",
    "ContinuousGenerator": ".entrypoints.generator",
    "GeneratorOptions": ".entrypoints.generator",
    "GeneratorStats": ".entrypoints.generator",
    "GenerationResult": ".engine.request",
    "SampleResult": ".engine.request",
    "StreamEvent": ".engine.request",
    "TokenLogprobs": ".engine.request",
    "SamplingParams": ".engine.sampling_params",
    "TensorParallelError": ".engine.distributed",
    "run_worker": ".engine.distributed",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hf_paged' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__version__ = "0.1.0"
