#!/usr/bin/env python3
"""Write N log lines of mixed, realistic shapes (access log, logfmt, JSON, syslog, stack-trace
heads, kernel), ~120 bytes on average, each carrying `seq=N` so a sink can check for loss,
duplicates and order. Usage: logs-gen.py N OUT [--append]"""
import random
import sys


def lines(n, rnd):
    paths = ["/", "/api/v1/users", "/static/app.js", "/health", "/search?q=a%20b&x=1"]
    cities = ["Zürich", "東京", "Ελλάδα", "São Paulo", "Kraków"]
    levels = ["INFO", "WARN", "ERROR", "DEBUG"]
    for i in range(n):
        k = i % 6
        if k == 0:
            yield '10.0.%d.%d - - [12/Mar/2025:10:%02d:%02d +0000] "GET %s HTTP/1.1" %d %d "-" "curl/8.5" seq=%d' % (
                rnd.randrange(256), rnd.randrange(256), i // 60 % 60, i % 60, rnd.choice(paths), rnd.choice((200, 304, 404, 500)), rnd.randrange(100000), i)
        elif k == 1:
            yield 'ts=2025-03-12T10:00:%02dZ level=%s msg="user said \\"hi\\", then left" user_id=%d city=%s seq=%d' % (
                i % 60, rnd.choice(levels).lower(), rnd.randrange(10**6), rnd.choice(cities), i)
        elif k == 2:
            yield '{"time":"2025-03-12T10:00:00Z","level":"%s","msg":"order placed","amount":%d.%02d,"emoji":"😀","seq":%d}' % (
                rnd.choice(levels).lower(), rnd.randrange(1000), rnd.randrange(100), i)
        elif k == 3:
            yield 'Mar 12 10:00:%02d web-1 sshd[%d]: Accepted publickey for deploy from 10.1.2.3 port %d ssh2\tseq=%d' % (
                i % 60, rnd.randrange(1, 65535), rnd.randrange(1024, 65535), i)
        elif k == 4:
            yield '%s [main] com.example.Service - failed to open C:\\temp\\file.txt, retrying (attempt=%d) seq=%d' % (
                rnd.choice(levels), rnd.randrange(10), i)
        else:
            yield '[%6d.%06d] eth0: link up, 1000 Mbps, full duplex, flow control rx/tx a=b,c=d seq=%d' % (
                i // 1000, rnd.randrange(10**6), i)


def main():
    n, out = int(sys.argv[1]), sys.argv[2]
    mode = "a" if "--append" in sys.argv[3:] else "w"
    rnd = random.Random(42)
    with open(out, mode, encoding="utf-8", buffering=1 << 20) as f:
        batch = []
        for line in lines(n, rnd):
            batch.append(line)
            if len(batch) == 10000:
                f.write("\n".join(batch) + "\n")
                batch = []
        if batch:
            f.write("\n".join(batch) + "\n")


if __name__ == "__main__":
    main()
