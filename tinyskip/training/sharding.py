"""``train.parallel=fsdp``: FSDP2 sharding for both training loops.

Each rank keeps 1/N of every trained weight, of its gradient and of its AdamW moments;
a block's weights are gathered just before it runs and freed after (forward and
backward), and gradients are reduce-scattered (averaged) into the shards. Blocks are one
group each; the root group holds the rest (embedding, final norm, lm_head), gathered
for the whole of the root's forward, so the loss reads an unsharded head weight, tied
or not.

``train.bf16`` means what it means under ddp, bf16 matmuls under autocast on fp32
master weights, on either device: fsdp also gathers the weights in bf16 (half the
traffic; autocast would cast them to bf16 for the matmuls anyway) and reduces the
gradients in fp32. Block inputs are not cast, so the residual stream stays fp32 as
under ddp. Without bf16 everything is fp32.

Evaluation and the consolidated checkpoint use a whole copy gathered on rank 0 (a
single-process evaluation, as under ddp): tinyskip's models fit one device; only the
training state is too large to replicate.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from ..config import TrainConfig


def mixed_precision(tc: TrainConfig) -> MixedPrecisionPolicy:
    if not tc.bf16:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                cast_forward_inputs=False)


def shard(root: nn.Module, groups: Iterable[nn.Module], tc: TrainConfig) -> nn.Module:
    """``root`` sharded in place: each module of ``groups`` (the blocks, the exit modules)
    its own group, then the root over what remains. Build the optimizer afterwards: its
    parameters are the shards."""
    mp = mixed_precision(tc)
    for module in groups:
        fully_shard(module, mp_policy=mp)
    # The root's own weights stay fp32 (the embedding, the final norm, the head): in bf16
    # the embedding's output, so the whole residual stream, would be bf16, which ddp's
    # autocast never makes it. The head's product still runs in bf16 under autocast.
    fully_shard(root, mp_policy=MixedPrecisionPolicy())
    return root


def is_sharded(module: nn.Module) -> bool:
    return isinstance(module, FSDPModule)


def gather_state(module: nn.Module) -> Optional[dict]:
    """The whole state dict of a sharded ``module`` on rank 0's CPU (None elsewhere).
    Every rank must call it: the shards are all-gathered."""
    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True,
                                                                  cpu_offload=True))
    return state if dist.get_rank() == 0 else None
