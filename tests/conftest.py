"""Test-wide set-up.

Triton's CPU interpreter must be switched on before any kernel is defined, so it is
set here, before the package is imported, whenever no CUDA device is present.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(min(2, torch.get_num_threads()))
