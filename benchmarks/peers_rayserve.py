"""The static full model served by Ray Serve: the peer that bench_peers.py measures dynaroute against.

    .venv/bin/python benchmarks/peers_rayserve.py BUNDLE [--port P] [--threads T]

What a user would write with Ray Serve for this model: one deployment holding the bundle's full
subnet (torch eager, --threads torch threads), its `Infer` method batched by `@serve.batch` (up
to 32 requests, waiting at most Ray Serve's default 10 ms for company; at 2 ms, dynaroute's
--max-wait-ms, requests trickling in from the proxy split every round into a batch of ~30 and
one of ~2), at most 32 requests admitted to the replica (`max_ongoing_requests`; Ray Serve's
default of 5 caps every batch at 5), sentences tokenised by the bundle's tokenizer and padded to
the batch's longest.

Ingress is Ray Serve's gRPC proxy (`gRPCOptions`) with dynaroute's own servicer
(`dynaroute.v1.Dynaroute`, proto/dynaroute/v1), so the same client and load generator drive
both servers; replies carry the outputs only (no route or cost: a static model's FLOPs ratio is
1). Calls must carry the metadata `application: peers` (`METADATA`): Ray Serve's proxy refuses
a call without it, even when it serves one application. The proxy pickles each request to hand
it to the replica, which needs message classes that import under their `__module__`
(dynaroute's stubs are generated so, see gateway/protogen.py). Ray is local (started here, it
ends with this process); the HTTP proxy is on a free loopback port and unused.

Prints `rayserve: serving grpc=127.0.0.1:P` once the deployment answers, then serves until
SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import signal
import socket
import threading
import time

import grpc
import ray
import torch
from ray import serve
from ray.serve.config import gRPCOptions

from dynaroute._proto import dynaroute_pb2 as pb
from dynaroute.bundle import Bundle
from dynaroute.client import Client, make_request
from dynaroute.text import TextEncoder

SERVICER = "dynaroute._proto.dynaroute_pb2_grpc.add_DynarouteServicer_to_server"
MAX_BATCH_SIZE = 32
APPLICATION = "peers"
# Ray Serve's gRPC proxy routes a call by this metadata (NOT_FOUND without it, even with one application).
METADATA = (("application", APPLICATION),)


# Ray Serve admits 5 requests per replica by default, which caps every batch at 5.
@serve.deployment(max_ongoing_requests=MAX_BATCH_SIZE)
class FullModel:
    def __init__(self, bundle_path: str, threads: int):
        torch.set_num_threads(threads)  # Ray sets OMP_NUM_THREADS to the replica's CPUs (1); a user asks for more
        bundle = Bundle.load(bundle_path)
        self.labels = bundle.labels
        self.encoder = TextEncoder.from_bundle(bundle)
        self.model = bundle.extract(bundle.full_subnet).eval()

    @serve.batch(max_batch_size=MAX_BATCH_SIZE)  # Ray Serve's default wait for company, 10 ms
    async def Infer(self, requests: list[pb.InferRequest]) -> list[pb.InferReply]:  # noqa: N802 (the RPC's name)
        with torch.no_grad():
            logits = self.model(self.encoder.encode([r.text for r in requests]))
        confidence, labels = torch.softmax(logits, -1).max(-1)
        replies = []
        for r, row, label, p in zip(requests, logits.tolist(), labels.tolist(), confidence.tolist(), strict=True):
            outputs = pb.Outputs(logits=row, label=label, label_name=self.labels[label], confidence=p)
            replies.append(pb.InferReply(id=r.id, model=r.model, outputs=outputs))
        return replies


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answer_once(address: str, timeout_s: float = 60.0) -> None:
    """Wait until the gRPC proxy answers an Infer: it learns of the application's route a
    moment after `serve.run` returns."""
    deadline = time.monotonic() + timeout_s
    with Client(address, timeout_s=10) as client:
        while True:
            try:
                client.stub.Infer(make_request(text="is it ready?"), timeout=10, metadata=METADATA)
                return
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle")
    parser.add_argument("--port", type=int, default=0, help="gRPC port (0: a free one)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads of the replica")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    args = parser.parse_args()
    port = args.port or free_port()
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()},
                grpc_options=gRPCOptions(port=port, grpc_servicer_functions=[SERVICER]))
    serve.run(FullModel.bind(args.bundle, args.threads), name=APPLICATION, route_prefix=f"/{APPLICATION}")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    answer_once(f"127.0.0.1:{port}")
    print(f"rayserve: serving grpc=127.0.0.1:{port}", flush=True)
    while not stop.wait(0.5):
        pass
    serve.shutdown()
    ray.shutdown()
    print("rayserve: stopped", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
