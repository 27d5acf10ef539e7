"""A small HTTP/1.1 backend for the exit-span tests (stdlib only).

  http_backend.py PORT      listens on 127.0.0.1:PORT until killed

  GET /api/items/<n>        200, JSON {"id": n, "name": "item <n>"}
  GET /api/status/<code>    that status (200-599), a short text body (none for 204 / 304)
  anything else             404

Every response carries Content-Length, so HTTP/1.1 keep-alive works. One line per request
is printed to stdout and flushed: "<method> <path> <status> <client-ip>:<client-port>",
which the Rust guard keeps in requests.log (the backend's own count of what reached it).
"""
import json
import re
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ITEM = re.compile(r"^/api/items/(\d+)$")
STATUS = re.compile(r"^/api/status/(\d{3})$")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "http-backend/1"

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        m = ITEM.match(path)
        s = STATUS.match(path)
        if m:
            n = int(m.group(1))
            self.reply(200, json.dumps({"id": n, "name": "item %d" % n}).encode(), "application/json")
        elif s and 200 <= int(s.group(1)) <= 599:
            code = int(s.group(1))
            body = b"" if code in (204, 304) else ("status %d\n" % code).encode()
            self.reply(code, body, "text/plain")
        else:
            self.reply(404, b"not found\n", "text/plain")

    def reply(self, code, body, ctype):
        self.send_response(code)
        if code not in (204, 304):
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body:
            self.wfile.write(body)
        host, port = self.client_address[:2]
        print("%s %s %d %s:%d" % (self.command, self.path, code, host, port), flush=True)

    def log_message(self, fmt, *args):
        pass  # the one line per request above is the log


def main():
    port = int(sys.argv[1])
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
