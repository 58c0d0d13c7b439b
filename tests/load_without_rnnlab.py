"""Load a logged rnnlab model where this repository's ``rnnlab`` is NOT importable, and predict.

    python tests/load_without_rnnlab.py MODEL_URI REPO_ROOT

Run by tests/test_serving.py in a subprocess, from a folder outside the repository, with no
PYTHONPATH. It first drops every ``sys.path`` entry inside REPO_ROOT except the virtualenv (the
editable install's ``src`` entry, the script's own folder) and checks that ``import rnnlab`` then
fails; then it loads MODEL_URI with ``mlflow.pyfunc.load_model`` (the model's own ``code/``
folder brings ``rnnlab``), answers the model's logged input example, and prints one JSON line:
``{"rnnlab_file", "model_path", "prediction", "requirements"}``.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path


def main(model_uri: str, repo_root: str) -> None:
    repo = Path(repo_root).resolve()
    venv = repo / ".venv"

    def inside_repo(entry: str) -> bool:
        path = Path(entry or ".").resolve()
        return (path == repo or repo in path.parents) and not (path == venv or venv in path.parents)

    sys.path[:] = [p for p in sys.path if not inside_repo(p)]
    sys.modules.pop("rnnlab", None)
    if importlib.util.find_spec("rnnlab") is not None:
        raise SystemExit(f"rnnlab is still importable: {importlib.util.find_spec('rnnlab').origin}")

    import mlflow
    from mlflow.artifacts import download_artifacts

    local = Path(download_artifacts(model_uri))
    model = mlflow.pyfunc.load_model(str(local))
    example = model.input_example
    if example is None:
        raise SystemExit(f"{model_uri} has no input example")
    prediction = model.predict(example)

    import rnnlab  # now: the model's copy

    print(
        json.dumps(
            {
                "rnnlab_file": rnnlab.__file__,
                "model_path": str(local),
                "prediction": prediction.to_dict(orient="records"),
                "requirements": (local / "requirements.txt").read_text().split(),
            }
        )
    )


if __name__ == "__main__":
    main(*sys.argv[1:3])
