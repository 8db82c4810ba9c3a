"""hf_paged: PagedAttention and continuous batching for ordinary Hugging Face models.

    import hf_paged
    hf_paged.enable(model)            # model.generate() now keeps its KV cache in a block pool
    hf_paged.disable(model)           # and back
"""

from .attention import ATTENTION_NAME
from .block_allocator import BlockAllocator
from .cache import PagedCache, PoolExhaustedError
from .enable import disable, enable, is_enabled
from .generator import ContinuousGenerator, GeneratorOptions, GeneratorStats
from .request import GenerationResult, SampleResult, StreamEvent, TokenLogprobs
from .sampling_params import SamplingParams

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
