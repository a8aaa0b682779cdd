"""A prefill/decode proxy for OpenAI-compatible vLLM servers, as vLLM's NixlConnector examples
have: each request goes to a prefill server with ``max_tokens=1`` and
``kv_transfer_params={"do_remote_decode": true}``, then to a decode server with the
``kv_transfer_params`` the prefill server returned, whose answer (streamed or not) goes back to
the client. Standard library only.

    python -m kvferry.proxy --prefill http://127.0.0.1:8100 --decode http://127.0.0.1:8200 \\
        --port 8000

Several ``--prefill``/``--decode`` URLs are used round-robin. ``GET /healthz`` (and
``/healthcheck``, llm-d's sidecar's path) answers once every backend answers ``/health``.

As vLLM's toy P/D proxy and llm-d's ``nixlv2`` sidecar do: the prefill request drops
``min_tokens`` (it cannot hold with one token) and streaming; both backends get the client's
``Authorization`` and one ``X-Request-Id`` (the client's, else a fresh one); the decoder gets the
prefill engine's ``kv_transfer_params`` and never the client's own; a prefill server failing
with anything but a client error (4xx up to 451), or unreachable, makes the decoder compute the
prompt itself, and the client still gets
its answer.

``--protocol offloading`` speaks llm-d's RDMA-free P/D instead (its sidecar's
``--kv-connector=offloading``): the prefill and the decode request go out at once, the prefill
with ``kv_transfer_params={"remote_decoder": {"kv_request_id": K}}``, the decoder with
``{"remote_prefiller": {"kv_request_id": K, "remote_host": <prefill host>, "remote_port":
--p2p-port}}``; the decoder fetches the prefill's offer under K when it is ready, and computes
the prompt itself if none comes within its ``remote_prefill_wait_s``. The prefill's answer is
discarded.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import threading
import uuid
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ROUTES = ("/v1/completions", "/v1/chat/completions")
_FAILED = object()  # the prefill's client error was answered already


PROTOCOLS = ("nixlv2", "offloading")


class Backends:
    def __init__(
        self,
        prefill: list[str],
        decode: list[str],
        timeout: float,
        protocol: str = "nixlv2",
        p2p_port: int = 7777,
    ):
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol {protocol!r}: one of {PROTOCOLS}")
        self.prefill = itertools.cycle([u.rstrip("/") for u in prefill])
        self.decode = itertools.cycle([u.rstrip("/") for u in decode])
        self.all = [u.rstrip("/") for u in prefill + decode]
        self.timeout = timeout
        self.protocol = protocol
        self.p2p_port = p2p_port
        self.lock = threading.Lock()

    def pick(self) -> tuple[str, str]:
        with self.lock:
            return next(self.prefill), next(self.decode)


def _post(url: str, body: dict, timeout: float, headers: dict[str, str] | None = None):
    req = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    return urllib.request.urlopen(req, timeout=timeout)


def make_handler(backends: Backends):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # quiet by default
            return

        def _reply(self, code: int, body: bytes, ctype: str = "application/json"):
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path in ("/healthz", "/healthcheck"):
                for u in backends.all:
                    try:
                        urllib.request.urlopen(u + "/health", timeout=5).read()
                    except Exception as e:  # noqa: BLE001
                        return self._reply(503, json.dumps({"down": u, "error": str(e)}).encode())
                return self._reply(200, b'{"ok": true}')
            self._reply(404, b'{"error": "not found"}')

        def do_POST(self):
            if self.path not in ROUTES:
                return self._reply(404, b'{"error": "not found"}')
            try:
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length) or b"{}")
            except (ValueError, json.JSONDecodeError) as e:
                return self._reply(400, json.dumps({"error": f"bad request: {e}"}).encode())
            if not isinstance(body, dict):
                return self._reply(400, b'{"error": "bad request: the body is not an object"}')
            prefill, decode = backends.pick()
            headers = {"X-Request-Id": self.headers.get("X-Request-Id") or str(uuid.uuid4())}
            if self.headers.get("Authorization"):
                headers["Authorization"] = self.headers["Authorization"]
            # The client's own kv_transfer_params reach no backend: they would let any client
            # name another request's blocks.
            body.pop("kv_transfer_params", None)
            if backends.protocol == "offloading":
                params = self._offloading(prefill, body, headers)
            else:
                params = self._prefill(prefill, body, headers)
                if params is _FAILED:
                    return
            second = dict(body)
            if isinstance(params, dict):
                second["kv_transfer_params"] = params
            self._decode(decode, second, headers, bool(body.get("stream")))

        def _prefill_body(self, body: dict, params: dict) -> dict:
            first = dict(body)
            first.update(max_tokens=1, stream=False, kv_transfer_params=params)
            for k in ("stream_options", "min_tokens"):
                first.pop(k, None)
            if "max_completion_tokens" in first:
                first["max_completion_tokens"] = 1
            return first

        def _prefill(self, prefill: str, body: dict, headers: dict):
            """nixlv2: the prefill first; its kv_transfer_params for the decoder (None: decode
            locally), or _FAILED when the client's error was answered."""
            first = self._prefill_body(
                body,
                {
                    "do_remote_decode": True,
                    "do_remote_prefill": False,
                    "remote_engine_id": None,
                    "remote_block_ids": None,
                    "remote_host": None,
                    "remote_port": None,
                },
            )
            try:
                with _post(prefill + self.path, first, backends.timeout, headers) as r:
                    return json.loads(r.read()).get("kv_transfer_params")
            except urllib.error.HTTPError as e:
                if 400 <= e.code <= 451:
                    # The client's mistake (validation, auth): the decoder would say the same.
                    # Anything else falls back to local decode, as llm-d's sidecar does.
                    self._reply(e.code, e.read())
                    return _FAILED
                sys.stderr.write(f"kvferry proxy: prefill {prefill} answered {e.code}; decoding locally\n")
            except Exception as e:  # noqa: BLE001
                sys.stderr.write(f"kvferry proxy: prefill {prefill} unreachable ({e}); decoding locally\n")
            return None

        def _offloading(self, prefill: str, body: dict, headers: dict) -> dict:
            """offloading: the prefill goes out in the background under a fresh key; the
            decoder is told where to fetch the offer posted under it."""
            key = str(uuid.uuid4())
            first = self._prefill_body(body, {"remote_decoder": {"kv_request_id": key}})

            def run():
                try:
                    with _post(prefill + self.path, first, backends.timeout, headers) as r:
                        r.read()
                except Exception as e:  # noqa: BLE001 - the decoder computes the prompt itself
                    sys.stderr.write(f"kvferry proxy: prefill {prefill} failed ({e})\n")

            threading.Thread(target=run, name="kvferry-proxy-prefill", daemon=True).start()
            host = urllib.parse.urlsplit(prefill).hostname or "127.0.0.1"
            return {
                "remote_prefiller": {
                    "kv_request_id": key,
                    "remote_host": host,
                    "remote_port": backends.p2p_port,
                }
            }

        def _decode(self, decode: str, second: dict, headers: dict, stream: bool):
            try:
                r = _post(decode + self.path, second, backends.timeout, headers)
            except urllib.error.HTTPError as e:
                return self._reply(e.code, e.read())
            except Exception as e:  # noqa: BLE001
                return self._reply(502, json.dumps({"error": f"decode {decode}: {e}"}).encode())
            with r:
                if not stream:
                    return self._reply(200, r.read(), r.headers.get("Content-Type", "application/json"))
                # Streamed: pass the server-sent events through as they come.
                self.send_response(200)
                self.send_header("Content-Type", r.headers.get("Content-Type", "text/event-stream"))
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                while True:
                    chunk = r.read1(65536) if hasattr(r, "read1") else r.read(65536)
                    if not chunk:
                        break
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")

    return Handler


def serve(
    prefill: list[str],
    decode: list[str],
    host: str,
    port: int,
    timeout: float = 600.0,
    protocol: str = "nixlv2",
    p2p_port: int = 7777,
):
    backends = Backends(prefill, decode, timeout, protocol, p2p_port)
    server = ThreadingHTTPServer((host, port), make_handler(backends))
    server.daemon_threads = True
    return server


def main(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(prog="python -m kvferry.proxy", description=__doc__.split("\n\n")[0])
    ap.add_argument("--prefill", action="append", required=True, help="prefill server URL")
    ap.add_argument("--decode", action="append", required=True, help="decode server URL")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per backend request")
    ap.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default="nixlv2",
        help="nixlv2 (prefill, then decode with its params) or offloading (both at once, by key)",
    )
    ap.add_argument(
        "--p2p-port", type=int, default=7777, help="offloading: the prefill engines' side-channel port"
    )
    a = ap.parse_args(argv)
    server = serve(a.prefill, a.decode, a.host, a.port, a.timeout, a.protocol, a.p2p_port)
    print(f"kvferry proxy on http://{a.host}:{server.server_port}", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
