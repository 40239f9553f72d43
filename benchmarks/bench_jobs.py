"""Wall-time overhead of `loraforge run lora_training` over the equivalent `loraforge train-image`.

    PYTHONPATH=src python benchmarks/bench_jobs.py                    # the default job (1500 steps), 2 rounds
    PYTHONPATH=src python benchmarks/bench_jobs.py --steps 300 --rounds 3

Both are run as the user runs them (a fresh `python -m loraforge.cli` process, imports included),
alternating, on the packaged example style images with seed 3. The train-image command gets the
settings the job uses (validation seed = seed, no TensorBoard, no progress bar, a checkpoint only at
the end), so the difference is what the job adds: checking the parameters and inputs, adding the
inputs to the store, writing the cloneofsimo file and the deterministic metrics, adding the result
and writing the record. Medians; overhead = job / train-image - 1. Each job also checks that its CID
is the same every round.

On a busy machine the two commands' times vary by more than the overhead, so the jobs' own records
give a second figure that noise cannot swamp: inside each job, the time of the `train_image` call
(what `loraforge train-image` runs) against the job's whole wall time (parameter and input checks,
inputs into the store, the result files, the store add and the record included).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
STYLE = SRC / "loraforge" / "examples" / "style"


def timed(argv: list[str], env: dict) -> tuple[float, str]:
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "loraforge.cli", *argv], env=env, check=True, capture_output=True, text=True
    )
    return time.perf_counter() - start, out.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--home", default=None, help="LORAFORGE_HOME to keep the jobs' store in (default: temporary)"
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-jobs-"))
    env = dict(os.environ, PYTHONPATH=f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env["LORAFORGE_HOME"] = args.home or str(work / "home")
    params = json.dumps({"images": str(STYLE), "seed": 3, "steps": args.steps})
    job = ["run", "lora_training", params, "--quiet"]
    train = [
        "train-image",
        "--data", str(STYLE),
        "--seed", "3",
        "--validation-seed", "3",
        "--max-steps", str(args.steps),
        "--tensorboard", "false",
        "--progress-bar", "false",
        "--save-every", "0",
        "--keep-last", "1",
        "--out", str(work / "train"),
    ]  # fmt: skip
    from loraforge.jobs.store import Store

    times = {"train-image": [], "run lora_training": []}
    cids = set()
    started = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    try:
        for r in range(args.rounds):
            shutil.rmtree(work / "train", ignore_errors=True)
            t, _ = timed(train, env)
            times["train-image"].append(t)
            t, cid = timed(job, env)
            times["run lora_training"].append(t)
            cids.add(cid)
            print(
                f"round {r + 1}: train-image {times['train-image'][-1]:.1f} s, run {t:.1f} s ({cid})",
                flush=True,
            )
        store = Store(Path(env["LORAFORGE_HOME"]) / "store")
        inside = []
        for name in store.records():
            t = store.get_record(name)["timings"]
            if "train_image_s" in t and t.get("started", "") >= started:
                inside.append((t["wall_s"], t["train_image_s"]))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = statistics.median(times["train-image"])
    run = statistics.median(times["run lora_training"])
    print(f"\nsteps {args.steps}, {args.rounds} rounds, medians:")
    print(f"  train-image        {base:8.1f} s")
    print(f"  run lora_training  {run:8.1f} s")
    print(f"  overhead           {100 * (run / base - 1):+7.1f} %  (goal: at most +5%)")
    print(f"  same CID every round: {len(cids) == 1}")
    for wall, train in inside:
        print(
            f"  inside a job: wall {wall:.1f} s, train_image {train:.1f} s: overhead {100 * (wall / train - 1):+.1f} %"
        )


if __name__ == "__main__":
    main()
