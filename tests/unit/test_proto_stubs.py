"""The committed gRPC stubs must be exactly what `python -m dynaroute.gateway.protogen` writes."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

from google.protobuf import descriptor_pb2
from grpc_tools import protoc

from dynaroute.gateway import protogen


def test_committed_stubs_match_regenerated(tmp_path: Path) -> None:
    written = protogen.generate(tmp_path)
    fresh = {p.name: p.read_text() for p in written}
    committed = {p.name: p.read_text() for p in protogen.OUT_DIR.iterdir() if p.is_file()}
    assert sorted(committed) == sorted(fresh), "stale or missing stub files: run `make proto`"
    stale = [name for name, text in fresh.items() if committed[name] != text]
    assert not stale, f"stubs differ from proto/ (run `make proto`): {stale}"


def test_stubs_import_as_a_package() -> None:
    from dynaroute._proto import dynaroute_pb2, dynaroute_pb2_grpc

    assert dynaroute_pb2.DESCRIPTOR.package == "dynaroute.v1"
    assert hasattr(dynaroute_pb2_grpc, "DynarouteServicer")
    service = dynaroute_pb2.DESCRIPTOR.services_by_name["Dynaroute"]
    assert [m.name for m in service.methods] == ["Infer", "InferBatch", "InferStream", "GetModel", "ListModels"]
    stream = service.methods_by_name["InferStream"]
    assert stream.client_streaming and stream.server_streaming


def test_messages_survive_pickle() -> None:
    """Ray pickles a message that crosses processes (Ray Serve's gRPC proxy hands each request
    to its replica so): the classes must be importable under their `__module__`."""
    from dynaroute._proto import dynaroute_pb2

    request = dynaroute_pb2.InferRequest(model="m", text="a fine film")
    request.budget.quality = 0.5
    assert pickle.loads(pickle.dumps(request)) == request
    # KServe's messages in a process of their own: tritonclient's clash with them in this one's
    # descriptor pool (see _kserve_file_descriptor).
    code = ("import pickle; from dynaroute._proto import grpc_service_pb2 as k; "
            "m = k.ModelInferRequest(model_name='m'); assert pickle.loads(pickle.dumps(m)) == m")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def _kserve_file_descriptor(tmp_path: Path) -> descriptor_pb2.FileDescriptorProto:
    """Our grpc_service.proto compiled to a descriptor, without loading it into the process's
    descriptor pool (tritonclient registers its own `inference` messages there)."""
    out = tmp_path / "kserve.pb"
    proto = "inference/grpc_service.proto"
    args = ["grpc_tools.protoc", f"-I{protogen.PROTO_DIR}", f"--descriptor_set_out={out}", proto]
    assert protoc.main(args) == 0
    fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    return fds.file[0]


def _fields(msg: descriptor_pb2.DescriptorProto, prefix: str = "") -> dict[str, tuple[int, int, int, str]]:
    """Every field of a message and its nested messages: name -> (number, type, label, type name)."""
    out = {f"{prefix}{msg.name}.{f.name}": (f.number, f.type, f.label, f.type_name) for f in msg.field}
    for nested in msg.nested_type:
        out.update(_fields(nested, f"{prefix}{msg.name}."))
    return out


def test_kserve_proto_is_wire_compatible_with_a_stock_client(tmp_path: Path) -> None:
    """Every message and field of our KServe v2 proto has the number, type and label of the
    public grpc_service.proto that tritonclient (a stock KServe v2 client) is built from, and
    the RPCs (the six core ones and the model-repository extension's three) have the same
    request and response types."""
    from tritonclient.grpc import service_pb2 as public

    ours = _kserve_file_descriptor(tmp_path)
    assert ours.package == "inference"
    public_file = descriptor_pb2.FileDescriptorProto()
    public.DESCRIPTOR.CopyToProto(public_file)
    public_msgs = {m.name: m for m in public_file.message_type}
    checked = 0
    for msg in ours.message_type:
        assert msg.name in public_msgs, f"message {msg.name} is not in the public proto"
        ours_fields, theirs = _fields(msg), _fields(public_msgs[msg.name])
        for name, spec in ours_fields.items():
            assert theirs.get(name) == spec, f"{name}: ours {spec}, public {theirs.get(name)}"
            checked += 1
    assert checked > 50
    (service,) = ours.service
    (public_service,) = public_file.service
    assert service.name == public_service.name == "GRPCInferenceService"
    public_methods = {m.name: (m.input_type, m.output_type) for m in public_service.method}
    assert [m.name for m in service.method] == [
        "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer",
        "RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload",
    ]
    for m in service.method:
        assert (m.input_type, m.output_type) == public_methods[m.name]
        assert not m.client_streaming and not m.server_streaming
