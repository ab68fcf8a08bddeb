#!/usr/bin/env python3
"""The cheapest collector stand-in for logs-bench.sh: takes POST /v1/reports, answers 200 at
once with the ack for the report's seq (`{"accepted": seq}`: the agent takes nothing else),
and counts the log lines in each gzip JSON report (occurrences of `"msg":`, in C via zlib and
bytes.count) into COUNT_FILE; a batch sent twice is counted twice. Lets the agent's own shipping rate be measured the way
rsyslog's is, against a sink that does next to nothing.
Usage: logs-http-sink.py PORT COUNT_FILE"""
import http.server
import os
import re
import sys
import threading
import zlib

SEQ = re.compile(rb'"seq":(\d+)')


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    lines = 0
    lock = threading.Lock()

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.headers.get("Content-Encoding") == "gzip":
            body = zlib.decompress(body, 16 + zlib.MAX_WBITS)
        n = body.count(b'"msg":')
        # The report's own seq sits after the agent identity; the first "seq" key is it
        # (log lines are escaped JSON strings, so their text cannot hold an unescaped quote).
        m = SEQ.search(body)
        seq = int(m.group(1)) if m else 0
        with Handler.lock:
            Handler.lines += n
            tmp = self.server.count_file + ".tmp"
            with open(tmp, "w") as f:
                f.write("%d\n" % Handler.lines)
            os.rename(tmp, self.server.count_file)
        out = b'{"accepted":%d}' % seq
        # One write for head and body: two small writes meet Nagle and delayed ACKs (40 ms).
        head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(out)
        self.wfile.write(head.encode() + out)

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def main():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
    srv.count_file = sys.argv[2]
    srv.serve_forever()


if __name__ == "__main__":
    main()
