"""DVC stage train_captioner@<run>: train one caption decoder (a run of params train_captioner.runs)
on cached image features and score the test images."""

from rnnlab.cli import run_stage
from rnnlab.stages.train import main

if __name__ == "__main__":
    run_stage(lambda: main("train_captioner", __doc__))
