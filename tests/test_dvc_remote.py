"""A DVC remote on a local directory (README "Scaling"): the pipeline's outputs are pushed from one
copy of the repository, a second clone pulls them, and ``dvc repro`` there runs nothing.
The target is the language-model path (download -> prepare -> train_lm -> evaluate): the other
stages' small profiles belong to their own tests."""

from __future__ import annotations

import json

from pipeline_repo import prepared_copy, run


def test_push_then_pull_in_a_second_clone_reproduces_without_rerunning(tmp_path):
    repo = prepared_copy(tmp_path / "repo")
    remote = tmp_path / "dvc-remote"
    run(["dvc", "repro", "evaluate"], repo)
    run(["dvc", "remote", "add", "-d", "shared", str(remote)], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "results + remote"], repo)
    pushed = run(["dvc", "push"], repo)
    assert "pushed" in pushed.stdout and any(remote.rglob("*"))

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    assert not (clone / "data/models/lm/ptb-lstm/model.ckpt").exists()  # git has no data, only dvc.lock
    run(["dvc", "pull"], clone)
    model = clone / "data/models/lm/ptb-lstm/model.ckpt"
    assert model.read_bytes() == (repo / "data/models/lm/ptb-lstm/model.ckpt").read_bytes()
    assert (clone / "data/prepared/ptb/train.npy").read_bytes() == (repo / "data/prepared/ptb/train.npy").read_bytes()
    again = run(["dvc", "repro", "evaluate"], clone)
    assert "Running stage" not in again.stdout
    assert "Data and pipelines are up to date" in again.stdout
    assert "up to date" in run(["dvc", "status", "evaluate"], clone).stdout
    # The metrics came with git and still describe the pulled model.
    assert json.loads((clone / "data/metrics/train_lm.json").read_text()) == json.loads(
        (repo / "data/metrics/train_lm.json").read_text())
