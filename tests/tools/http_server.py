#!/usr/bin/python3
"""An HTTP(S) server of one file with byte ranges, for tests of images on a web server.

    http_server.py FILE PORT_FILE [--tls CERT KEY] [--auth USER:PASS] [--cookie C]
                   [--no-ranges] [--no-length] [--mode MODE] [--log LOG] [--bind ADDR]

It listens on 127.0.0.1 (or ADDR) on a free port and writes the port to PORT_FILE once it listens.
Every path serves FILE, or when FILE is a directory, the file of that name in it (404 when
there is none); /redirect/... answers 302 to the same path without the prefix.
--auth asks for Basic credentials, --cookie for a Cookie header equal to C. --log appends
one line per request: method, path, Range header, Cookie header.

MODE makes it misbehave, for the client's robustness:
  short       a range answered with fewer bytes than its Content-Range says
  wrong-range a range answered with a Content-Range of other bytes
  full        a range answered 200 with the whole file
  garbage     a range answered with a garbage status line
  huge        Content-Length of 2^62 on HEAD
  close       a range answered by closing the connection
  slow        a range answered after 30 s
  error       a range answered 500
"""

import base64
import http.server
import os
import socketserver
import ssl
import sys
import time


def parse_args(argv):
    opts = {"file": argv[1], "port_file": argv[2], "tls": None, "auth": None,
            "cookie": None, "ranges": True, "length": True, "mode": None, "log": None,
            "bind": "127.0.0.1"}
    i = 3
    while i < len(argv):
        a = argv[i]
        if a == "--tls":
            opts["tls"] = (argv[i + 1], argv[i + 2])
            i += 3
            continue
        if a in ("--auth", "--cookie", "--mode", "--log", "--bind"):
            opts[a[2:]] = argv[i + 1]
            i += 2
            continue
        if a == "--no-ranges":
            opts["ranges"] = False
        elif a == "--no-length":
            opts["length"] = False
        else:
            sys.exit(f"unknown argument {a}")
        i += 1
    return opts


OPTS = parse_args(sys.argv)


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        pass

    def note(self):
        if OPTS["log"]:
            with open(OPTS["log"], "a") as f:
                f.write(f"{self.command} {self.path} {self.headers.get('Range', '-')} "
                        f"{self.headers.get('Cookie', '-')}\n")

    def allowed(self):
        if OPTS["auth"]:
            want = "Basic " + base64.b64encode(OPTS["auth"].encode()).decode()
            if self.headers.get("Authorization") != want:
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="qnbd"')
                self.send_header("Content-Length", "0")
                self.end_headers()
                return False
        if OPTS["cookie"] and self.headers.get("Cookie") != OPTS["cookie"]:
            self.send_response(403)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return False
        return True

    def redirected(self):
        if self.path.startswith("/redirect/"):
            self.send_response(302)
            self.send_header("Location", self.path[len("/redirect"):])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return True
        return False

    def target(self):
        """The file this request names, or None after a 404."""
        if not os.path.isdir(OPTS["file"]):
            return OPTS["file"]
        name = os.path.basename(self.path.split("?")[0])
        path = os.path.join(OPTS["file"], name)
        if name and os.path.isfile(path):
            return path
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()
        return None

    def common_headers(self, length):
        if OPTS["ranges"]:
            self.send_header("Accept-Ranges", "bytes")
        if OPTS["length"]:
            self.send_header("Content-Length", str(length))

    def do_HEAD(self):
        self.note()
        if self.redirected() or not self.allowed():
            return
        path = self.target()
        if path is None:
            return
        size = os.path.getsize(path)
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        if OPTS["mode"] == "huge":
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(1 << 62))
        else:
            self.common_headers(size)
        if not OPTS["length"]:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def do_GET(self):
        self.note()
        if self.redirected() or not self.allowed():
            return
        path = self.target()
        if path is None:
            return
        size = os.path.getsize(path)
        rng = self.headers.get("Range")
        if rng is None or not OPTS["ranges"] or OPTS["mode"] == "full":
            self.send_whole(path, size)
            return
        start, end = rng.removeprefix("bytes=").split("-")
        start = int(start)
        end = min(int(end) if end else size - 1, size - 1)
        if start >= size:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.misbehave(start, end, size):
            return
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read(end - start + 1)
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def misbehave(self, start, end, size):
        mode = OPTS["mode"]
        if mode == "short":
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.send_header("Content-Length", str(end - start + 1))
            self.end_headers()
            self.wfile.write(b"\0" * ((end - start + 1) // 2))
            self.wfile.flush()
            self.close_connection = True
            return True
        if mode == "wrong-range":
            other = (start + 4096) % size
            n = min(end - start + 1, size - other)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {other}-{other + n - 1}/{size}")
            self.send_header("Content-Length", str(n))
            self.end_headers()
            self.wfile.write(b"\xee" * n)
            return True
        if mode == "garbage":
            self.wfile.write(b"\x00\xffGARBAGE\r\n\r\n")
            self.close_connection = True
            return True
        if mode == "close":
            self.close_connection = True
            return True
        if mode == "slow":
            time.sleep(30)
            return False
        if mode == "error":
            self.send_response(500)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return True
        return False

    def send_whole(self, path, size):
        self.send_response(200)
        self.send_header("Content-Length", str(size))
        self.end_headers()
        with open(path, "rb") as f:
            while True:
                chunk = f.read(1 << 20)
                if not chunk:
                    break
                self.wfile.write(chunk)


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def main():
    server = Server((OPTS["bind"], 0), Handler)
    if OPTS["tls"]:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(*OPTS["tls"])
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
    tmp = OPTS["port_file"] + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(server.server_address[1]))
    os.rename(tmp, OPTS["port_file"])
    server.serve_forever()


if __name__ == "__main__":
    main()
