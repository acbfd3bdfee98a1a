"""Run a list of shell jobs N at a time until a deadline, resumable: the runner behind many-seed sweeps.

    python scripts/toy_erasure_sweep.py --recipes tri-const900,out-const900 --seeds 0-7 --base > jobs.jsonl
    python scripts/run_jobs.py jobs.jsonl --parallel 14 --deadline_s 500 --output_dir outputs/sweep

Each line of the job file is ``{"name": ..., "cmds": [...], "estimate_s": ...}``; ``{D}`` in a command is replaced by
the job's folder ``output_dir/name`` (its log goes to ``log.txt`` there). The commands of a job run in order and stop
at the first failure. A job is not started when fewer than its ``estimate_s`` seconds are left before the deadline.
Every finished job is appended to ``output_dir/results.jsonl`` (exit code, seconds per command); a second run with
the same ``output_dir`` skips the jobs that succeeded, so a sweep can go on over several time-boxed calls.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("jobs", help="JSON-lines job file")
    p.add_argument("--parallel", type=int, default=os.cpu_count() or 1)
    p.add_argument("--deadline_s", type=float, default=float("inf"), help="start no job after this many seconds")
    p.add_argument("--output_dir", required=True)
    args = p.parse_args(argv)
    jobs = _read_jobs(args.jobs)
    os.makedirs(args.output_dir, exist_ok=True)
    ledger = os.path.join(args.output_dir, "results.jsonl")
    done = {}
    if os.path.exists(ledger):
        with open(ledger) as f:
            done = {r["name"]: r for r in map(json.loads, f) if r.get("rc") == 0}
    start = time.time()

    def run(job: dict) -> dict:
        if job["name"] in done:
            return done[job["name"]]
        if time.time() - start > args.deadline_s - job.get("estimate_s", 0):
            return {"name": job["name"], "rc": None, "skipped": "deadline"}
        result = _run_job(job, os.path.join(args.output_dir, job["name"]), start)
        print(json.dumps(result), flush=True)
        with open(ledger, "a") as f:  # one short line per job: appends from threads do not interleave
            f.write(json.dumps(result) + "\n")
        return result

    with ThreadPoolExecutor(max(1, args.parallel)) as pool:
        results = list(pool.map(run, jobs))
    ok = sum(r.get("rc") == 0 for r in results)
    print(f"{ok} of {len(results)} jobs done in {time.time() - start:.0f} s", flush=True)
    return results


def _read_jobs(path: str) -> list[dict]:
    with open(path) as f:
        jobs = [json.loads(line) for line in f if line.strip()]
    names = [j.get("name") for j in jobs]
    bad = [j for j in jobs if not j.get("name") or not isinstance(j.get("cmds"), list)]
    if bad:
        raise SystemExit(f"{path}: every job needs a 'name' and a list 'cmds'; not {bad[0]}")
    if len(set(names)) != len(names):
        raise SystemExit(f"{path}: job names must be unique (they name the output folders)")
    return jobs


def _run_job(job: dict, folder: str, start: float) -> dict:
    os.makedirs(folder, exist_ok=True)
    rc, seconds = 0, []
    with open(os.path.join(folder, "log.txt"), "w") as log:
        for cmd in job["cmds"]:
            t0 = time.time()
            rc = subprocess.call(cmd.replace("{D}", folder), shell=True, stdout=log, stderr=subprocess.STDOUT)
            seconds.append(round(time.time() - t0, 1))
            if rc:
                break
    return {"name": job["name"], "rc": rc, "seconds": seconds, "finished_at_s": round(time.time() - start, 1)}


if __name__ == "__main__":
    main()
