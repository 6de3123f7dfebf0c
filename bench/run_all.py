"""Every benchmark in one run, and one Markdown report with the machine it ran on (docs/benchmarks.md's tables).

    .venv/bin/python bench/run_all.py [--out bench/output/report.md] [--with-million]

Runs, one after another (never two at once: they measure the same cores): embedding throughput (the tutorial's
Keras per-image predict as the baseline), catalogue load through the queue and search latency around it, search
latency through the web for 1/8/32 clients, what a search costs against the simplest anchor (one Flask process
that decodes, embeds and asks hnswlib in the request) and where its time goes, 20 and 150 clients uploading for
30 s, hnswlib against exact search on the real catalogue (and on 1M synthetic vectors with --with-million: ~10
minutes, ~16 GB), and the tutorial's all-pairs search, and products of three photos against one.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

BENCH = Path(__file__).resolve().parent
BENCHMARKS = [
    ("Embedding throughput", ["embed_throughput.py"]),
    ("Catalogue load and search latency", ["catalog_load.py"]),
    ("Search scale-out: query processes, replicas, kNN, micro-batching", ["search_scaling.py"]),
    ("What a search costs: lookalike against the simplest anchor, and its profile", ["search_cost.py", "--profile"]),
    ("Load: concurrent uploads", ["load.py", "--clients", "20", "--seconds", "30"]),
    ("Load: more clients than the search queue takes", ["load.py", "--clients", "150", "--seconds", "30"]),
    ("Index: hnswlib against exact search (real catalogue)", ["index_recall.py", "real"]),
    ("Search: the tutorial's all-pairs matrix against hnswlib", ["search_baseline.py"]),
    ("Decode memory: large images that compress to almost nothing", ["decode_memory.py"]),
    ("Products: 3 photos per product against 1, quality and cost", ["products.py"]),
]
MILLION = ("Index: hnswlib against exact search (1M synthetic)", ["index_recall.py", "synthetic"])
LIBRARIES = ("onnxruntime", "tensorflow-cpu", "hnswlib", "numpy", "celery", "redis", "flask", "waitress", "pillow")


def machine() -> list[str]:
    """The lines that say what the figures were measured on."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())  # fmt: skip
    memory = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal:"))  # fmt: skip
    versions = []
    for library in LIBRARIES:
        try:
            versions.append(f"{library} {metadata.version(library)}")
        except metadata.PackageNotFoundError:
            continue
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=BENCH,
                            check=False).stdout.strip()  # fmt: skip
    return [
        f"- CPU: {cpu}, {os.cpu_count()} cores; memory {memory / 1024**2:.0f} GB; {platform.platform()}",
        f"- Python {platform.python_version()}; {', '.join(versions)}",
        f"- lookalike commit {commit or '?'}, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=BENCH / "output" / "report.md")
    parser.add_argument("--with-million", action="store_true", help="also 1M synthetic vectors (~10 min, ~16 GB)")
    args = parser.parse_args()
    report = ["# lookalike benchmarks", "", *machine(), ""]
    failed = 0
    for title, command in BENCHMARKS + ([MILLION] if args.with_million else []):
        print(f"== {title}: {' '.join(command)}", file=sys.stderr, flush=True)
        started = time.monotonic()
        result = subprocess.run([sys.executable, BENCH / command[0], *command[1:]], capture_output=True, text=True,
                                check=False)  # fmt: skip
        minutes = (time.monotonic() - started) / 60
        report += [f"## {title}", "", f"`bench/{' '.join(command)}`, {minutes:.1f} min", ""]
        if result.returncode != 0:
            failed += 1
            report += [f"**Failed** (exit {result.returncode}):", "", "```", *result.stderr.splitlines()[-20:], "```"]
        else:
            report += result.stdout.strip().splitlines()
        report.append("")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(report) + "\n")  # after each benchmark: a long run leaves what it has
    print(f"wrote {args.out}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
