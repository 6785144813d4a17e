#!/usr/bin/env python
"""DeepSpeed's own ZeRO reader as a test peer (run with .venv-deepspeed; imports torch and deepspeed).

    .venv-deepspeed/bin/python tests/peers/deepspeed_peer.py fp32 CHECKPOINT_DIR TAG OUT.pt

Runs deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(CHECKPOINT_DIR, TAG), the
function DeepSpeed (and xtuner's zero_to_any_dtype) use to put a ZeRO checkpoint back together, and
saves the state dict it returns to OUT.pt.
"""

import sys

import torch


def main(argv: list[str]) -> int:
    if len(argv) != 4 or argv[0] != "fp32":
        print(__doc__, file=sys.stderr)
        return 2
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(argv[1], tag=argv[2])
    torch.save({k: v.contiguous() for k, v in state.items()}, argv[3])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
