"""A tool server for AI agents: one HTTP endpoint per tool, each accepting a JWT-SVID for its own audience.

POST /tools/<name> with `Authorization: Bearer <JWT-SVID>`. The token is checked through the SPIFFE
Workload API (ValidateJWTSVID: signature, expiry, revocation, and that its audience is `tool:<name>`,
this tool and no other), so the server holds no key and no list of callers: whether a caller may
have a token for this tool was the policy's decision when the agent issued it.

    SPIFFE_ENDPOINT_SOCKET=unix:/run/vouchd/agent.sock python toolserver.py [--port 8642]
"""

from __future__ import annotations

import argparse
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from spiffe import WorkloadApiClient

TOOLS = {"search": "tool:search", "payments": "tool:payments"}


class ToolHandler(BaseHTTPRequestHandler):
    client: WorkloadApiClient

    def do_POST(self) -> None:
        name = self.path.removeprefix("/tools/")
        audience = TOOLS.get(name)
        if audience is None:
            self._answer(404, {"error": f"no tool {name!r}"})
            return
        token = self.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        try:
            svid = self.client.validate_jwt_svid(token, audience)
        except Exception as err:  # any refusal of the Workload API: not for this tool, expired, revoked
            self._answer(403, {"error": f"token refused for {audience}: {type(err).__name__}"})
            return
        self._answer(200, {"tool": name, "caller": str(svid.spiffe_id)})

    def _answer(self, status: int, body: dict[str, str]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8642)
    args = parser.parse_args()
    ToolHandler.client = WorkloadApiClient()
    server = ThreadingHTTPServer(("127.0.0.1", args.port), ToolHandler)
    print(f"tool server on 127.0.0.1:{server.server_port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
