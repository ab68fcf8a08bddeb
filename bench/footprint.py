#!/usr/bin/env python3
"""Measure processes from /proc over a period: peak RSS (VmHWM) and CPU seconds per minute.

CPU comes from /proc/PID/task/*/schedstat (nanoseconds on CPU), because the 10 ms ticks of
/proc/PID/stat are coarser than what an idle agent uses in a minute.

usage: footprint.py SECONDS NAME PID [NAME PID ...]
"""
import os
import sys
import time


def cpu_ns(pid):
    total = 0
    try:
        for t in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{t}/schedstat") as f:
                    total += int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                pass
    except OSError:
        pass
    return total


def status(pid, key):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def main():
    secs = float(sys.argv[1])
    args = sys.argv[2:]
    procs = list(zip(args[0::2], args[1::2]))
    start = {name: cpu_ns(pid) for name, pid in procs}
    t0 = time.monotonic()
    peak_rss = {name: 0 for name, _ in procs}
    # RSS split: anonymous pages are the process's own; file pages are its binary and shared
    # libraries as the page cache maps them in (fault-around), which differs run to run.
    peak_anon = {name: 0 for name, _ in procs}
    peak_file = {name: 0 for name, _ in procs}
    while time.monotonic() - t0 < secs:
        for name, pid in procs:
            peak_rss[name] = max(peak_rss[name], status(pid, "VmRSS"))
            peak_anon[name] = max(peak_anon[name], status(pid, "RssAnon"))
            peak_file[name] = max(peak_file[name], status(pid, "RssFile"))
        time.sleep(1)
    elapsed = time.monotonic() - t0
    print(f"{'process':<12} {'VmHWM kB':>9} {'max VmRSS kB':>13} {'CPU-s/min':>10} {'% of a core':>12} {'max anon kB':>12} {'max file kB':>12}")
    rows = {}
    for name, pid in procs:
        used = (cpu_ns(pid) - start[name]) / 1e9
        per_min = used / elapsed * 60
        rows[name] = (status(pid, "VmHWM"), per_min)
        print(f"{name:<12} {rows[name][0]:>9} {peak_rss[name]:>13} {per_min:>10.4f} {per_min / 60 * 100:>11.3f}% {peak_anon[name]:>12} {peak_file[name]:>12}")
    return rows


if __name__ == "__main__":
    main()
