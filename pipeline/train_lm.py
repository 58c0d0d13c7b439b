"""DVC stage train_lm@<run>: train one language model (a run of params train_lm.runs) by truncated
BPTT, or count its n-gram."""

from rnnlab.cli import run_stage
from rnnlab.stages.train import main

if __name__ == "__main__":
    run_stage(lambda: main("train_lm", __doc__))
