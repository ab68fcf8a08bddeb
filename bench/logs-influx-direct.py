#!/usr/bin/env python3
"""InfluxDB's own ingest rate for the bench's log lines, written directly in the shape the
collector writes them (measurement `log`, identity tags, path, fields message and offset),
in BATCH-point requests over one keep-alive connection. The request bodies are built before
the clock starts so Python's speed is not what is measured.
Usage: logs-influx-direct.py LOGFILE URL DB [BATCH]; prints `points seconds points_per_s`."""
import http.client
import sys
import time
import urllib.parse


def esc_str(s):
    return s.replace("\\", "\\\\").replace('"', '\\"')


def esc_tag(s):
    return s.replace("\\", "\\\\").replace(",", "\\,").replace("=", "\\=").replace(" ", "\\ ")


def main():
    logfile, url, db = sys.argv[1], sys.argv[2], sys.argv[3]
    batch = int(sys.argv[4]) if len(sys.argv) > 4 else 5000
    u = urllib.parse.urlparse(url)
    tags = "log,host=bench,image_id=img-bench,instance_id=i-bench,path=" + esc_tag(logfile)
    bodies, cur, off, ts, n = [], [], 0, time.time_ns(), 0
    with open(logfile, "rb") as f:
        for raw in f:
            text = raw[:-1].decode("utf-8", "backslashreplace")
            cur.append('%s message="%s",offset=%di %d' % (tags, esc_str(text), off, ts + n))
            off += len(raw)
            n += 1
            if len(cur) == batch:
                bodies.append("\n".join(cur).encode())
                cur = []
    if cur:
        bodies.append("\n".join(cur).encode())
    conn = http.client.HTTPConnection(u.hostname, u.port)
    conn.request("POST", "/query", body=urllib.parse.urlencode({"q": "CREATE DATABASE " + db}), headers={"Content-Type": "application/x-www-form-urlencoded"})
    conn.getresponse().read()
    start = time.monotonic()
    for b in bodies:
        conn.request("POST", "/write?db=%s&precision=ns" % db, body=b)
        r = conn.getresponse()
        r.read()
        if r.status != 204:
            sys.exit("InfluxDB refused a write: HTTP %d" % r.status)
    secs = time.monotonic() - start
    print("%d %.3f %.0f" % (n, secs, n / secs))


if __name__ == "__main__":
    main()
