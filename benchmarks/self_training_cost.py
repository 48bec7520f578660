"""What self-training costs: `alflow simulate` with the shipped ``[model]`` against the same
command with ``self_training = 0``, run alternately so that a busy machine slows both alike.

The off config is the shipped ``alflow.toml`` with its ``self_training`` line set to 0 and
nothing else changed. Both run with ``--jobs 1`` by default: one process, so its CPU
seconds (user + system) are all of the work (simulate's worker processes are forked by a
forkserver, whose children's CPU time no parent collects). Prints each run's wall and CPU
seconds and the ratios default / off (median over the repetitions), and writes them with
the exact commands to ``--out``:

    nice -n 5 env OMP_NUM_THREADS=1 python benchmarks/self_training_cost.py --reps 3
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHIPPED = HERE.parent / "alflow.toml"
DEFAULT_DATA = HERE.parents[1] / "shared" / "datasets" / "ag_news_7600.csv"


def off_config(shipped: Path, folder: Path) -> Path:
    """``shipped`` with its ``[model] self_training`` line set to 0, written into ``folder``."""
    text = shipped.read_text(encoding="utf-8")
    changed, count = re.subn(r"(?m)^self_training\s*=.*$", "self_training = 0", text)
    if count != 1:
        raise SystemExit(f"{shipped}: expected one self_training line, found {count}")
    path = folder / "alflow-self-training-off.toml"
    path.write_text(changed, encoding="utf-8")
    return path


def shown_path(arg: str, folder: Path) -> str:
    """``arg`` as the results file shows it: a path in or beside the repository relative
    to it (the temporary ``folder`` stays, to be shown as $TMP)."""
    if arg.startswith("/") and not arg.startswith(str(folder)):
        return os.path.relpath(arg, HERE.parent)
    return arg


def timed(command: list[str]) -> tuple[float, float]:
    """Run ``command``; (wall seconds, CPU seconds of the child: user + system)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        raise SystemExit(f"{shlex.join(command)} failed:\n{done.stderr[-2000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--cycles", type=int, default=28)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--strategies", default="margin")
    parser.add_argument("--reps", type=int, default=3, help="alternating pairs (default, off) to run")
    parser.add_argument("--jobs", type=int, default=1, help="simulate's --jobs (1: CPU seconds count every fit)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "self_training_auto" / "cost.md")
    args = parser.parse_args(argv)
    alflow = Path(sys.executable).with_name("alflow")
    runs: dict[str, list[tuple[float, float]]] = {"default": [], "off": []}
    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        configs = {"default": SHIPPED, "off": off_config(SHIPPED, folder)}
        commands = {arm: [str(alflow), "simulate", "--data", str(args.data), "--batch", str(args.batch),
                          "--cycles", str(args.cycles), "--seeds", str(args.seeds), "--strategies", args.strategies,
                          "--jobs", str(args.jobs), "--out", str(folder / arm), "--config", str(config),
                          "--no-progress"]
                    for arm, config in configs.items()}
        for rep in range(args.reps):
            for arm in ("default", "off") if rep % 2 == 0 else ("off", "default"):
                wall, cpu = timed(commands[arm])
                runs[arm].append((wall, cpu))
                print(f"rep {rep + 1} {arm}: wall {wall:.1f} s, CPU {cpu:.1f} s", flush=True)
    load.append(os.getloadavg()[0])
    ratio_wall = [d[0] / o[0] for d, o in zip(runs["default"], runs["off"])]
    ratio_cpu = [d[1] / o[1] for d, o in zip(runs["default"], runs["off"])]
    shown = {arm: shlex.join(["alflow"] + [shown_path(a, folder) for a in c[1:]]).replace(str(folder), "$TMP")
             for arm, c in commands.items()}
    lines = ["# Self-training's cost: `alflow simulate`, shipped `[model]` vs `self_training = 0`", "",
             f"{args.reps} alternating pairs (the order flips every pair), `OMP_NUM_THREADS=1`, on {os.cpu_count()} "
             f"cores shared with other work (load average {load[0]:.1f} at the start, {load[1]:.1f} at the end: "
             "the CPU seconds are the steadier figure); the off config is "
             f"`{SHIPPED.name}` with `self_training = 0` and nothing else changed. Made with:", "", "```bash",
             "nice -n 5 env OMP_NUM_THREADS=1 python benchmarks/self_training_cost.py " + shlex.join(
                 argv if argv is not None else sys.argv[1:]), "```", "", "Each pair runs:", "", "```bash",
             shown["default"], shown["off"], "```", "",
             "| pair | default: wall s | default: CPU s | off: wall s | off: CPU s | wall ratio | CPU ratio |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for i, ((dw, dc), (ow, oc)) in enumerate(zip(runs["default"], runs["off"]), start=1):
        lines.append(f"| {i} | {dw:.1f} | {dc:.1f} | {ow:.1f} | {oc:.1f} | {dw / ow:.2f} | {dc / oc:.2f} |")
    lines += ["", f"**Median ratio, default / off: wall {statistics.median(ratio_wall):.2f}x, "
                  f"CPU {statistics.median(ratio_cpu):.2f}x** (the target: at most 1.3x)."]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines[-1:]))


if __name__ == "__main__":
    main()
