"""DVC stage train_seq2seq@<run>: train one translator (a run of params train_seq2seq.runs) on its
parallel corpus (default Multi30k En->De) and score its test set."""

from rnnlab.cli import run_stage
from rnnlab.stages.train import main

if __name__ == "__main__":
    run_stage(lambda: main("train_seq2seq", __doc__))
