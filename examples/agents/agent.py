"""An AI agent that uses tools, and launches a sub-agent: run as the orchestrator, it starts itself again
as the sub-agent (`--sub-agent`), which is a child process with an identity of its own.

Each asks the SPIFFE Workload API for a JWT-SVID per tool (audience `tool:<name>`) in its own name,
calls the tool server with it, and prints one JSON line per tool: the HTTP status, or the agent's
refusal. The orchestrator may use both tools; the sub-agent is refused the high-risk one by policy
(examples/agents/policy.cedar), although it runs the very same script as its parent.

    SPIFFE_ENDPOINT_SOCKET=unix:/run/vouchd/agent.sock python agent.py --tools http://127.0.0.1:8642
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request

from spiffe import SpiffeId, WorkloadApiClient

ORCHESTRATOR = "spiffe://example.org/agent/orchestrator"
SUB_AGENT = "spiffe://example.org/agent/sub-agent"
TOOLS = ("search", "payments")


def use_tools(role: str, identity: str, tools_url: str) -> None:
    with WorkloadApiClient() as client:
        for tool in TOOLS:
            report: dict[str, object] = {"agent": role, "tool": tool}
            try:
                svid = client.fetch_jwt_svid({f"tool:{tool}"}, subject=SpiffeId(identity))
            except Exception as err:  # the agent refused the token: the policy said no
                report["result"] = f"no token: {type(err).__name__}"
            else:
                report["result"] = call_tool(f"{tools_url}/tools/{tool}", svid.token)
            print(json.dumps(report), flush=True)


def call_tool(url: str, token: str) -> str:
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"the tool server's URL must be http(s), got {url[:80]!r}")
    request = urllib.request.Request(url, data=b"{}", method="POST",  # noqa: S310 (scheme checked above)
                                     headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 (scheme checked above)
            return f"HTTP {response.status}: {json.loads(response.read())['caller']}"
    except urllib.error.HTTPError as err:
        return f"HTTP {err.code}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tools", default="http://127.0.0.1:8642", help="the tool server's URL")
    parser.add_argument("--sub-agent", action="store_true", help="run as the sub-agent (the orchestrator does this)")
    parser.add_argument("--linger", type=float, default=0.0, metavar="SECONDS",
                        help="the sub-agent stays this long after using the tools (time for `vouchd explain`)")
    args = parser.parse_args()
    if args.sub_agent:
        use_tools("sub-agent", SUB_AGENT, args.tools)
        time.sleep(args.linger)
        return
    use_tools("orchestrator", ORCHESTRATOR, args.tools)
    subprocess.run([sys.executable, __file__, "--sub-agent", "--tools", args.tools, "--linger", str(args.linger)],
                   check=True, timeout=60 + args.linger)


if __name__ == "__main__":
    main()
