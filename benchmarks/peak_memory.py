"""Peak resident memory of a command and every process it starts: the largest single process, and the largest sum
over the processes alive at one time (what the machine must hold), polled every 0.2 s with psutil. The sum is
given twice: of RSS, which counts the pages processes share (the Python, torch and transformers libraries each of
them maps) once per process, and of PSS (proportional set size: a page shared by k processes counts 1/k in
each), the machine's real footprint.

    python benchmarks/peak_memory.py --out runs/demo-memory.json -- python main.py --preset demo --mode demo

Prints one line and writes the peaks (MiB), the command's exit code, its wall seconds and the processes alive at the
PSS peak (each one's RSS, PSS and command line, and when) to --out (JSON).
Polling misses peaks shorter than the interval: each process's own high-water mark (VmHWM, which docdistill logs
per phase) is the exact single-process figure; the sum is only known from polling.
"""
import argparse
import json
import subprocess
import sys
import time

import psutil

INTERVAL_S = 0.2


def tree_memory(process):
    """{pid: (RSS, PSS) in MiB, and the start of its command line} of the process and its descendants alive now."""
    found = {}
    for p in [process, *process.children(recursive=True)]:
        try:
            info = p.memory_full_info()
            found[p.pid] = (info.rss / 2**20, info.pss / 2**20, " ".join(p.cmdline())[:100])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="JSON file for the peaks (default: print only)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to measure after --")
    start = time.perf_counter()
    child = subprocess.Popen(command)
    process = psutil.Process(child.pid)
    peak_one, peak_sum, peak_pss, processes, at_peak = 0.0, 0.0, 0.0, set(), {}
    while child.poll() is None:
        try:
            memory = tree_memory(process)
        except psutil.NoSuchProcess:
            break
        processes |= set(memory)
        if memory:
            peak_one = max(peak_one, max(rss for rss, _, _ in memory.values()))
            peak_sum = max(peak_sum, sum(rss for rss, _, _ in memory.values()))
            if sum(pss for _, pss, _ in memory.values()) > peak_pss:  # who held what at the PSS peak, and when
                peak_pss = sum(pss for _, pss, _ in memory.values())
                at_peak = {"seconds": time.perf_counter() - start,
                           "processes": [{"pid": pid, "rss_mib": round(rss), "pss_mib": round(pss), "command": cmd}
                                         for pid, (rss, pss, cmd) in sorted(memory.items())]}
        time.sleep(INTERVAL_S)
    code = child.wait()
    result = {"command": command, "exit_code": code, "wall_seconds": time.perf_counter() - start,
              "peak_single_process_mib": peak_one, "peak_sum_mib": peak_sum, "peak_pss_sum_mib": peak_pss,
              "processes_seen": len(processes), "at_pss_peak": at_peak}
    print(f"peak RSS: largest process {peak_one:.0f} MiB, sum over the processes alive at once {peak_sum:.0f} MiB; "
          f"PSS sum {peak_pss:.0f} MiB ({len(processes)} processes seen, {result['wall_seconds']:.0f} s, exit code "
          f"{code})", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return code


if __name__ == "__main__":
    sys.exit(main())
