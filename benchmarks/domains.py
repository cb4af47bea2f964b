"""PBT against random search in the paper's three domains, at the same compute.

For each domain (``examples/rl_cartpole.py``, ``examples/translation.py``,
``examples/gan_digits.py``) and each seed, the example's experiment is trained twice: with PBT
(its exploit and explore) and as random search (``baseline="random"``: the same population,
the same steps, no exploit, no explore). The table gives, per domain, the median and range of
the final best score over the seeds for each, how many seeds PBT won, and the schedule PBT
found on the first seed (the best member's hyperparameters along its ancestry).

Every run is stored in ``benchmarks/results/domains.db`` under ``DOMAIN-VARIANT-sSEED``, so an
interrupted table resumes where it stopped (a run completed before is read back, not trained
again). Runs go in parallel as subprocesses (``--jobs``).

Run it:  python benchmarks/domains.py [--seeds 5] [--size default|smoke] [--jobs 2]
         [--domain rl_cartpole,translation,gan_digits]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOMAINS = ("rl_cartpole", "translation", "gan_digits")
VARIANTS = ("pbt", "random")


def load_example(domain: str) -> ModuleType:
    path = ROOT / "examples" / f"{domain}.py"
    spec = importlib.util.spec_from_file_location(f"example_{domain}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def run_one(domain: str, variant: str, seed: int, size: str, db: Path) -> dict[str, Any]:
    """In a subprocess: trains (or resumes, or reads back) one run; returns its summary."""
    module = load_example(domain)
    name = f"{domain}-{variant}-s{seed}-{size}"
    exp = module.experiment(seed=seed, size=size, baseline=None if variant == "pbt" else variant)
    start = time.perf_counter()
    result = exp.run(f"sqlite:///{db}", name, workers=1)
    out = dict(module.summary(result))
    finals = [m.score for m in result.members if m.score is not None and m.score == m.score]
    out.update(
        median_member=statistics.median(finals) if finals else None,
        domain=domain,
        variant=variant,
        seed=seed,
        run=name,
        wall_s=time.perf_counter() - start,
        member_steps=len(result.history),
        exploits=sum(e.kind == "exploit" for e in result.events),
        metric=result.metric,
    )
    return out


def _child(args: list[str]) -> dict[str, Any]:
    domain, variant, seed, size, db = args
    proc = subprocess.run(
        [sys.executable, __file__, "--child", domain, variant, seed, size, db],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        return {
            "domain": domain,
            "variant": variant,
            "seed": int(seed),
            "error": proc.stderr[-2000:],
        }
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def table(runs: list[dict[str, Any]], domains: list[str]) -> tuple[list[str], dict[str, Any]]:
    lines = [
        f"{'domain':12} {'metric':10} {'PBT median [range]':>26} {'random median [range]':>26}"
        f" {'PBT wins':>9}"
    ]
    summary: dict[str, Any] = {}
    for domain in domains:
        got = {
            v: [r for r in runs if r["domain"] == domain and r["variant"] == v] for v in VARIANTS
        }
        if not all(got.values()) or any("error" in r for v in VARIANTS for r in got[v]):
            lines.append(f"{domain:12} incomplete or failed")
            continue
        metric = got["pbt"][0]["metric"]
        cells = []
        for v in VARIANTS:
            scores = [r["best"] for r in got[v]]
            cells.append(f"{statistics.median(scores):8.3f} [{min(scores):.3f}-{max(scores):.3f}]")
        by_seed = {r["seed"]: r["best"] for r in got["random"]}
        wins = sum(r["best"] > by_seed.get(r["seed"], float("inf")) for r in got["pbt"])
        lines.append(
            f"{domain:12} {metric:10} {cells[0]:>26} {cells[1]:>26} {wins:>5}/{len(got['pbt'])}"
        )
        first = min(got["pbt"], key=lambda r: r["seed"])
        summary[domain] = {
            "metric": metric,
            "pbt": [r["best"] for r in got["pbt"]],
            "random": [r["best"] for r in got["random"]],
            "pbt_wins": wins,
            "schedule_seed": first["seed"],
            "schedule": first["schedule"],
        }
    return lines, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--size", choices=("default", "smoke"), default="default")
    parser.add_argument("--jobs", type=int, default=2, help="runs trained at once")
    parser.add_argument("--domain", default=",".join(DOMAINS))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--db", type=Path, default=RESULTS / "domains.db")
    parser.add_argument("--child", nargs=5, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        domain, variant, seed, size, db = args.child
        print(json.dumps(run_one(domain, variant, int(seed), size, Path(db))))
        return
    domains = [d for d in args.domain.split(",") if d]
    args.db.parent.mkdir(parents=True, exist_ok=True)
    jobs = [
        [d, v, str(s), args.size, str(args.db)]
        for s in range(args.seeds)
        for d in domains
        for v in VARIANTS
    ]
    print(
        f"{len(jobs)} runs ({len(domains)} domains x {args.seeds} seeds x PBT/random), size "
        f"{args.size}, {args.jobs} at once; stored in {args.db}",
        flush=True,
    )
    start = time.perf_counter()
    runs: list[dict[str, Any]] = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for out in pool.map(_child, jobs):
            runs.append(out)
            state = (
                "FAILED" if "error" in out else f"best {out['best']:.4f} in {out['wall_s']:.0f} s"
            )
            print(f"  {out['domain']} {out['variant']} seed {out['seed']}: {state}", flush=True)
    lines, summary = table(runs, domains)
    print()
    print("\n".join(lines))
    for domain, s in summary.items():
        print(f"\n{domain}: schedule PBT found (seed {s['schedule_seed']}):")
        for hp, points in s["schedule"].items():
            shown = ", ".join(f"{step}:{value:.3g}" for step, value in points)
            print(f"  {hp}: {shown}")
    out_path = (
        args.out or RESULTS / f"domains{'' if args.size == 'default' else '-' + args.size}.json"
    )
    out_path.write_text(
        json.dumps(
            {
                "machine": platform.platform(),
                "cpus": os.cpu_count(),
                "size": args.size,
                "seeds": args.seeds,
                "wall_s": time.perf_counter() - start,
                "summary": summary,
                "runs": runs,
            },
            indent=1,
        )
    )
    print(f"\nwrote {out_path}")
    failed = [r for r in runs if "error" in r]
    for r in failed[:3]:
        print(f"\n{r['domain']} {r['variant']} seed {r['seed']} failed:\n{r['error']}")


if __name__ == "__main__":
    main()
