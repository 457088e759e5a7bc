"""Run any `hf-ntl` stage under `accelerate launch` (CPU, one GPU, or several with DDP).

    accelerate launch --config_file scripts/accelerate/multi_gpu.yaml scripts/launch.py \
        protect-sophon --config scripts/configs/sophon_embedded.yaml

The stage and its options are exactly those of the `hf-ntl` command (`hf-ntl STAGE --help`).
Training stages (`fit-source`, `protect-ntp`, `protect-sophon`, `fit-ddpm`,
`protect-sophon-diffusion`) run data-parallel through `Trainer`; `evaluate` and
`evaluate-diffusion` share their independent attack runs between the processes.
"""

import sys

from hf_ntl.cli import main

if __name__ == "__main__":
    main(sys.argv[1:])
