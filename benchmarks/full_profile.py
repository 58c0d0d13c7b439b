"""Run the `full` profile (the GPU targets) in one call, without DVC, and print its metrics.

For whoever next has a GPU machine (which has torch + Lightning but not dvc/mlflow): every stage of
dvc.yaml runs in dependency order, each run of a training section as its own process (the
commands of dvc.yaml itself, `${key}` filled in), with params.yaml's `profile` set to `full` and
tracking off. Each stage gets at most --stage-cap seconds and the whole run --total-cap; a stage
over its cap is stopped (its row says so) and the next one starts. Stages whose outputs already
exist are skipped with --skip-existing (a second call continues where the first stopped).

    python benchmarks/full_profile.py [--profile full] [--total-cap 3000] [--stage-cap 1200] [--only train_lm]

download/prepare need pandas + pandera (carry their wheels, or run them here and carry data/prepared).
Prints one JSON object: per stage its wall time, exit code, and the metrics files it wrote.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def expand_stages(dvc: dict, params: dict) -> list[tuple[str, dict]]:
    """dvc.yaml's stages in file order, ``foreach`` expanded over params (``${key}`` / ``${item.x}``)."""
    out = []
    for name, stage in dvc["stages"].items():
        if "foreach" not in stage:
            out.append((name, stage))
            continue
        section = stage["foreach"].strip("${}").split(".")
        runs = params
        for key in section:
            runs = runs[key]
        for key, item in runs.items():
            text = yaml.safe_dump(stage["do"]).replace("${key}", key)
            for field, value in (item or {}).items():
                text = text.replace("${item." + field + "}", str(value))
            out.append((f"{name}@{key}", yaml.safe_load(text)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="full")
    ap.add_argument("--total-cap", type=float, default=3000.0, help="seconds for the whole run")
    ap.add_argument("--stage-cap", type=float, default=1200.0, help="seconds per stage")
    ap.add_argument("--only", nargs="*", default=None, help="stage names or prefixes to run (default: all)")
    ap.add_argument("--skip-existing", action="store_true", help="skip stages whose outputs all exist")
    ap.add_argument("--dry-run", action="store_true", help="print the commands only")
    args = ap.parse_args()

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["profile"] = args.profile
    params["tracking"] = {"enabled": False}
    run_params = REPO / f"params.{args.profile}-run.yaml"
    run_params.write_text(yaml.safe_dump(params, sort_keys=False))
    stages = expand_stages(yaml.safe_load((REPO / "dvc.yaml").read_text()), params)
    started, report = time.monotonic(), {}
    for name, stage in stages:
        if args.only and not any(name == o or name.startswith(o + "@") or name.startswith(o) for o in args.only):
            continue
        outs = [next(iter(o)) if isinstance(o, dict) else o for o in stage.get("outs", [])]
        if args.skip_existing and outs and all((REPO / o).exists() for o in outs):
            report[name] = {"skipped": "outputs exist"}
            continue
        left = args.total_cap - (time.monotonic() - started)
        if left <= 0:
            report[name] = {"skipped": "total cap reached"}
            continue
        cmd = " ".join(stage["cmd"].split()) + f" --params {run_params.name}"
        if args.dry_run:
            report[name] = {"cmd": cmd}
            continue
        t0 = time.monotonic()
        try:
            proc = subprocess.run(
                cmd,
                shell=True,
                cwd=REPO,
                timeout=min(args.stage_cap, left),
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                capture_output=True,
                text=True,
            )
            code, tail = proc.returncode, proc.stderr[-1500:]
        except subprocess.TimeoutExpired:
            code, tail = "timeout", f"stopped after {min(args.stage_cap, left):.0f} s"
        metrics = {}
        for entry in stage.get("metrics", []):
            path = REPO / (next(iter(entry)) if isinstance(entry, dict) else entry)
            if path.is_file():
                metrics[str(path.relative_to(REPO))] = json.loads(path.read_text())
        report[name] = {
            "wall_s": round(time.monotonic() - t0, 1),
            "exit": code,
            "metrics": metrics,
            **({"stderr_tail": tail} if code != 0 else {}),
        }
        print(f"{name}: exit {code} in {report[name]['wall_s']} s", file=sys.stderr, flush=True)
    print(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
