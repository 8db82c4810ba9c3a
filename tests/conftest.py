import os
import sys

import torch

# Tests import their tiny-model factory as a plain module.
sys.path.insert(0, os.path.dirname(__file__))

# Without CUDA, Triton kernels run through its interpreter; it must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
