"""Runs ``moe_empathy.train.trainer`` under ``accelerate launch`` with accelerate's FSDP on CPU processes.

accelerate (1.16) turns an FSDP launch config into its FSDP state only on accelerator devices; CPU
processes stay plain data parallel (gloo). This script switches the state to FSDP, with the plugin
accelerate built from the launch config, before the trainer starts, so a CPU run takes the code path
of a GPU run: FSDP2 sharding by accelerate, its full-state-dict gathering and its FSDP checkpoints.

    accelerate launch --config_file fsdp.yaml tests/train/fsdp_on_cpu.py --config ... --output ...
"""

from __future__ import annotations

import sys

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

from moe_empathy.train.trainer import main

_accelerator_state_init = AcceleratorState.__init__


def _fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _accelerator_state_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin


if __name__ == "__main__":
    AcceleratorState.__init__ = _fsdp_on_cpu
    sys.exit(main())
