"""Fetch X.509-SVIDs at a steady rate for a while, then report one JSON line of what happened.

Run as a separate process (py-spiffe's grpc stubs cannot share a process with vouchd's):
    python fetch_load.py SOCKET RATE SECONDS
Each call is a new connection's unary-like FetchX509SVID (the first message of the stream), as a
script or a go-spiffe convenience function asks. Output: {"ok": N, "errors": {"CODE": n}, "seconds": s}.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import Counter

import grpc
from spiffe._proto import workload_pb2, workload_pb2_grpc

WORKERS = 8


def main() -> None:
    socket_path, rate, seconds = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
    ok = Counter[str]()
    errors = Counter[str]()
    lock = threading.Lock()
    started = time.monotonic()
    interval = WORKERS / rate

    def worker(offset: float) -> None:
        channel = grpc.insecure_channel(f"unix:{socket_path}", options=[("grpc.use_local_subchannel_pool", 1)])
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
        due = started + offset
        while due < started + seconds:
            time.sleep(max(0.0, due - time.monotonic()))
            due += interval
            try:
                stream = stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=[("workload.spiffe.io", "true")],
                                            timeout=5)
                next(iter(stream))
                stream.cancel()
                outcome = None
            except grpc.RpcError as err:
                outcome = err.code().name
            with lock:
                if outcome is None:
                    ok["ok"] += 1
                else:
                    errors[outcome] += 1
        channel.close()

    threads = [threading.Thread(target=worker, args=(n * interval / WORKERS,)) for n in range(WORKERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(json.dumps({"ok": ok["ok"], "errors": dict(errors), "seconds": time.monotonic() - started}), flush=True)


if __name__ == "__main__":
    main()
