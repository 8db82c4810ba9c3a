"""``ModelSpec``: how to load a model and its tokenizer, as a small picklable value.

A model on a GPU cannot be sent to another process; a description of how to load it can. The engine in
its own process (``AsyncEngine.from_spec``) loads the model from a ``ModelSpec`` in that process, and
``hf-paged serve`` loads through the same ``load`` when it runs the engine in its own process
(``--no-engine-process``) or under tensor parallelism: one loader for every mode.

    spec = ModelSpec("/models/llama-8b", dtype="bfloat16")     # a local model folder
    spec = ModelSpec()                                          # the embedded random-weight Llama
    model, tokenizer = spec.load()
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

# The name the embedded default model is served under.
EMBEDDED_NAME = "hf-paged-default"
DTYPES = ("bfloat16", "float16", "float32", "float64")


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A causal LM and its tokenizer to load: a local folder, or (``path=None``) the embedded default model.

    Args:
        path: a local model folder holding the model and its tokenizer (``save_pretrained`` output);
            None: the embedded random-weight Llama (4 layers, d 256) with the tokenizer shipped in the
            package, which needs no download.
        dtype: ``"bfloat16"``, ``"float16"``, ``"float32"`` or ``"float64"``; None: bfloat16 on CUDA,
            float32 elsewhere.
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; None: CUDA when available.
        trust_remote_code: passed to ``from_pretrained`` (models whose code ships in their folder).

    Checked when built (``ValueError`` naming the field); nothing is loaded until ``load``.
    """

    path: str | None = None
    dtype: str | None = None
    device: str | None = None
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if self.path is not None:
            if not isinstance(self.path, (str, Path)):
                raise TypeError(f"path must be a str or None, got {type(self.path).__name__}")
            object.__setattr__(self, "path", str(self.path))
            if not Path(self.path).is_dir():
                raise ValueError(f"path must be a local model folder, got {self.path!r}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES} or None, got {self.dtype!r}")
        if self.device is not None:
            kind = self.device.split(":", 1)[0] if isinstance(self.device, str) else None
            if kind not in ("cpu", "cuda"):
                raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N' (or None), got {self.device!r}")
        if not isinstance(self.trust_remote_code, bool):
            raise TypeError(f"trust_remote_code must be a bool, got {self.trust_remote_code!r}")

    @property
    def served_name(self) -> str:
        """The default name a server gives the model: its path, or the embedded model's name."""
        return self.path if self.path is not None else EMBEDDED_NAME

    def resolved(self) -> tuple[str, str]:
        """(device, dtype) with the defaults filled in for this machine."""
        import torch

        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = self.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
        return device, dtype

    def load_tokenizer(self) -> Any:
        import transformers

        if self.path is None:
            folder = resources.files("hf_paged").joinpath("default_model")
            return transformers.PreTrainedTokenizerFast.from_pretrained(str(folder))
        return transformers.AutoTokenizer.from_pretrained(self.path, trust_remote_code=self.trust_remote_code)

    def load(self, tensor_parallel: bool = False) -> tuple[Any, Any]:
        """(model in eval mode, tokenizer).

        ``tensor_parallel``: load with transformers' tensor-parallel plan (this process holds its rank's
        shard; ``torch.distributed`` as torchrun sets it up).
        """
        import tempfile

        import torch
        import transformers

        device, dtype = self.resolved()
        torch_dtype = getattr(torch, dtype)
        tokenizer = self.load_tokenizer()
        if self.path is None:
            model = default_model("cpu" if tensor_parallel else device, torch_dtype)
            # A server stops at the model's end-of-sequence token (the demo turns it off for fixed-length runs).
            model.generation_config.eos_token_id = model.config.eos_token_id
            if not tensor_parallel:
                return model, tokenizer
            # Every rank builds the same seeded weights; a TP plan applies to a model loaded from a folder.
            with tempfile.TemporaryDirectory() as tmp:
                model.save_pretrained(tmp)
                model = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch_dtype, tp_plan="auto").eval()
            model.generation_config.eos_token_id = model.config.eos_token_id
            return model, tokenizer
        kwargs = dict(dtype=torch_dtype, trust_remote_code=self.trust_remote_code)
        if tensor_parallel:  # each rank on its own accelerator (or the CPU, over gloo), as torchrun assigned
            model = transformers.AutoModelForCausalLM.from_pretrained(self.path, tp_plan="auto", **kwargs).eval()
        else:
            model = transformers.AutoModelForCausalLM.from_pretrained(self.path, **kwargs).to(device).eval()
        return model, tokenizer


def default_model(device: Any, dtype: Any) -> Any:
    """The embedded random-weight Llama (seeded: the same weights on every machine), in eval mode."""
    import torch
    import transformers

    text = resources.files("hf_paged").joinpath("default_model/config.json").read_text()
    config = transformers.LlamaConfig.from_dict(json.loads(text))
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config)
    return model.to(device=device, dtype=dtype).eval()
