#!/usr/bin/env python3
"""TCP sink for the rsyslog side of logs-bench.sh: accepts any number of connections (rsyslog
may open one per queue worker), counts newline-terminated lines, and once EXPECT lines arrived
writes `lines first_byte_unix last_byte_unix` to OUT and exits.
Usage: logs-tcp-sink.py PORT EXPECT OUT"""
import selectors
import socket
import sys
import time


def main():
    port, expect, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    sel = selectors.DefaultSelector()
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen(16)
    srv.setblocking(False)
    sel.register(srv, selectors.EVENT_READ)
    lines, first, last = 0, None, None
    while lines < expect:
        for key, _ in sel.select(timeout=1.0):
            if key.fileobj is srv:
                conn, _ = srv.accept()
                conn.setblocking(False)
                sel.register(conn, selectors.EVENT_READ)
                continue
            data = key.fileobj.recv(1 << 20)
            if not data:
                sel.unregister(key.fileobj)
                key.fileobj.close()
                continue
            now = time.time()
            first = first or now
            last = now
            lines += data.count(b"\n")
    with open(out + ".tmp", "w") as f:
        f.write("%d %.6f %.6f\n" % (lines, first, last))
    import os
    os.rename(out + ".tmp", out)


if __name__ == "__main__":
    main()
