"""Open FetchX509SVID streams against an agent and report every message, one JSON line each.

Run as a separate process (py-spiffe's stubs cannot share a process with vouchd's):
    python stream_watch.py SOCKET STREAMS [UID]
With UID, the process drops to that uid (and gid) after loading everything and before connecting,
so the agent attests it as that uid. Lines: {"stream": i, "spiffe_ids": [...], "at": t} per message,
{"stream": i, "end": "PERMISSION_DENIED", "at": t} when a stream ends, {"ready": true} once all
threads run. The process ends when every stream has ended, or when stdin closes.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

import grpc
from cryptography import x509
from cryptography.x509.oid import ExtensionOID
from spiffe._proto import workload_pb2, workload_pb2_grpc

_lock = threading.Lock()


def _say(line: dict[str, object]) -> None:
    with _lock:
        sys.stdout.write(json.dumps(line) + "\n")
        sys.stdout.flush()


def _uri(der: bytes) -> str:
    leaf = x509.load_der_x509_certificate(der)
    san = leaf.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
    return str(san.get_values_for_type(x509.UniformResourceIdentifier)[0])


def _watch(index: int, stub: workload_pb2_grpc.SpiffeWorkloadAPIStub) -> None:
    try:
        for response in stub.FetchX509SVID(workload_pb2.X509SVIDRequest(),
                                           metadata=[("workload.spiffe.io", "true")]):
            ids = sorted(svid.spiffe_id for svid in response.svids)
            # The certificate must say what the message says: the SVID is real, not only a name.
            assert sorted(_uri(svid.x509_svid) for svid in response.svids) == ids
            _say({"stream": index, "spiffe_ids": ids, "at": time.time()})
    except grpc.RpcError as err:
        _say({"stream": index, "end": err.code().name, "at": time.time()})
    except Exception as err:
        _say({"stream": index, "end": f"error: {type(err).__name__}: {err}", "at": time.time()})


def main() -> None:
    socket_path, count = sys.argv[1], int(sys.argv[2])
    # A connection of its own per stream, as separate workloads have: grpc would otherwise share one
    # connection among channels to the same target, and HTTP/2 allows 100 streams per connection.
    channels = [grpc.insecure_channel(f"unix:{socket_path}", options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(count)]
    stubs = [workload_pb2_grpc.SpiffeWorkloadAPIStub(channel) for channel in channels]
    if len(sys.argv) > 3:
        uid = int(sys.argv[3])
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    threads = [threading.Thread(target=_watch, args=(i, stub), daemon=True) for i, stub in enumerate(stubs)]
    for thread in threads:
        thread.start()
    _say({"ready": True})
    waiter = threading.Thread(target=lambda: [thread.join() for thread in threads], daemon=True)
    waiter.start()
    # Until every stream ended, or the test closes stdin.
    stdin_closed = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stdin_closed.set()), daemon=True).start()
    while waiter.is_alive() and not stdin_closed.is_set():
        time.sleep(0.05)


if __name__ == "__main__":
    main()
