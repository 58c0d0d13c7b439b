import numpy as np
import torch

from rnnlab.data.lm_data import BPTTWindows, batchify


def _reference_batchify(data, bsz):
    # pytorch/examples word_language_model/main.py, verbatim logic
    nbatch = data.size(0) // bsz
    data = data.narrow(0, 0, nbatch * bsz)
    return data.view(bsz, -1).t().contiguous()


def _reference_get_batch(source, i, bptt):
    seq_len = min(bptt, len(source) - 1 - i)
    return source[i : i + seq_len], source[i + 1 : i + 1 + seq_len].reshape(-1)


def test_batchify_and_windows_reproduce_pytorch_examples_layout():
    stream = np.arange(103, dtype=np.int32)  # not a multiple of the batch size
    ours = batchify(stream, 4)
    ref = _reference_batchify(torch.arange(103), 4)
    assert torch.equal(ours, ref)
    assert ours.shape == (25, 4) and ours[:3, 1].tolist() == [25, 26, 27]  # column 1 continues the stream
    windows = BPTTWindows(ours, bptt=7)
    ref_windows = [_reference_get_batch(ref, i, 7) for i in range(0, ref.size(0) - 1, 7)]
    assert len(windows) == len(ref_windows) == 4
    for (x, y), (rx, ry) in zip(windows, ref_windows):
        assert torch.equal(x, rx) and torch.equal(y.reshape(-1), ry)
    assert windows[3][0].shape == (3, 4)  # the short last window


def test_consecutive_windows_continue_each_column():
    b = batchify(np.arange(200, dtype=np.int32), 5)
    w = BPTTWindows(b, 10)
    x0, y0 = w[0]
    x1, _ = w[1]
    assert torch.equal(x1[0], y0[-1])  # next window starts where the targets stopped
    assert torch.equal(x0[1:], y0[:-1])
