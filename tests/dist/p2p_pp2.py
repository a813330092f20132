"""Under torchrun with 2 processes (PP=2, VPP=2): the exchange the interleaved schedule makes in
its steady state, ``send_forward_backward_recv_forward_backward``, with megatron-core's default
batched point-to-point operations and with the config training uses (``p2p_overrides``).

Each rank sends an activation filled with 100 + rank to the next stage and a gradient filled
with 200 + rank to the previous one; at PP=2 both go to the other rank, so the activation that
arrives must hold 100 + peer and the gradient 200 + peer. Prints one JSON line per rank:
{"rank": r, "default": [activation, gradient], "ours": [activation, gradient]}.
"""

from __future__ import annotations

import json
import os
import warnings

import torch

from megatron_btx import lazy_compile  # noqa: E402

lazy_compile.install()  # as every btx command does: megatron-core's compile calls deferred

warnings.filterwarnings("ignore")

from megatron_btx import runtime  # noqa: E402
from megatron_btx.training.mcore_layouts import p2p_overrides  # noqa: E402

SHAPE = (8, 2, 16)  # (sequence, micro batch, hidden), as the schedule passes it


def exchange(overrides: dict, rank: int) -> list[float]:
    """(value of the received activation, value of the received gradient)."""
    from megatron.core import parallel_state as ps
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

    config = ModelParallelConfig(
        pipeline_model_parallel_size=2,
        virtual_pipeline_model_parallel_size=2,
        pipeline_dtype=torch.float32,
        **overrides,
    )
    comm = P2PCommunicator(ps.get_pipeline_model_parallel_group(), config)
    activation, gradient = comm.send_forward_backward_recv_forward_backward(
        output_tensor=torch.full(SHAPE, 100.0 + rank),
        input_tensor_grad=torch.full(SHAPE, 200.0 + rank),
        recv_prev=True,
        recv_next=True,
        tensor_shape=SHAPE,
    )
    for received in (activation, gradient):
        assert received.unique().numel() == 1, received.unique()  # one message, whole
    return [float(activation.flatten()[0]), float(gradient.flatten()[0])]


def main() -> None:
    rt = runtime.init(pp=2, vpp=2, device="cpu")
    result = {
        "rank": rt.rank,
        "default": exchange({}, rt.rank),
        "ours": exchange(p2p_overrides(pp=2, vpp=2), rt.rank),
    }
    # one write() per line: under torchrun both ranks share the pipe, and print's separate
    # writes of text and newline can interleave with the other rank's line
    os.write(1, (json.dumps(result) + "\n").encode())
    runtime.teardown()


if __name__ == "__main__":
    main()
