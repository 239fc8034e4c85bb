import os

import torch

# Triton on CPU tensors runs only in its interpreter, which must be chosen before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
