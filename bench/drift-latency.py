#!/usr/bin/env python3
"""Change-to-collector latency of drift detection: bake a tree, run the real agent and
collector (release builds), make N changes one at a time and time each until the collector's
GET /v1/instances/{id} shows the new hash. Prints p50/p90/p99/max.

usage: bench/drift-latency.py [N]        (default 100; needs target/release binaries)
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AGENT = os.path.join(ROOT, "target/release/phoenix-agent")
COLLECTOR = os.path.join(ROOT, "target/release/phoenix-collector")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def get(url, token):
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.load(r)


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    work = tempfile.mkdtemp(prefix="phoenix-drift-latency.")
    procs = []
    try:
        tree = os.path.join(work, "etc")
        os.makedirs(os.path.join(tree, "app"))
        for i in range(50):
            with open(os.path.join(tree, "app", f"f{i}.conf"), "w") as f:
                f.write(f"value = {i}\n")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        procs.append(subprocess.Popen([COLLECTOR, "--listen", f"127.0.0.1:{port}", "--data-dir", os.path.join(work, "data"),
                                       "--agent-token", "a", "--reader-token", "r", "--pipeline-token", "p", "--recycler-token", "x"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for _ in range(100):
            try:
                urllib.request.urlopen(url + "/healthz", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        base = os.path.join(work, "baseline.json")
        subprocess.run([AGENT, "bake", "--drift-path", tree, "--image-id", "img-lat", "--out", base, "--register", url, "--token", "p"],
                       check=True, stdout=subprocess.DEVNULL)
        procs.append(subprocess.Popen([AGENT, "run", "--collector", url, "--token", "a", "--instance-id", "i-lat", "--image-id", "img-lat",
                                       "--baseline", base, "--interval", "60s", "--state-dir", os.path.join(work, "state")],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

        def current_hash():
            try:
                d = get(f"{url}/v1/instances/i-lat", "r").get("drift") or {}
                return d.get("hash")
            except OSError:
                return None

        deadline = time.time() + 30
        while current_hash() is None and time.time() < deadline:
            time.sleep(0.05)
        lat = []
        for i in range(n):
            before = current_hash()
            path = os.path.join(tree, "app", f"f{i % 50}.conf")
            t0 = time.monotonic()
            with open(path, "a") as f:
                f.write(f"# change {i}\n")
            while True:
                h = current_hash()
                if h and h != before:
                    lat.append(time.monotonic() - t0)
                    break
                if time.monotonic() - t0 > 10:
                    lat.append(float("inf"))
                    break
                time.sleep(0.01)
        lat.sort()
        pick = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]
        print(f"{n} changes, change-to-collector latency (s): p50 {pick(0.5):.3f}  p90 {pick(0.9):.3f}  p99 {pick(0.99):.3f}  max {lat[-1]:.3f}")
        print("target: p99 < 2 s")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
