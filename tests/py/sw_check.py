"""Independent checks of what the observer sends, using the generated protobuf modules that
ship in PyPI's apache-skywalking==1.2.0 (not our .proto files).

  sw_check.py compare-descriptors OUR.fds   every message, field, enum and rpc we define
                                            must exist identically in the wheel's definitions
  sw_check.py decode-segments FILE          FILE holds u32-LE length-prefixed SegmentObject
                                            bytes; prints one JSON object per segment
"""
import json
import struct
import sys

from google.protobuf import descriptor_pb2, json_format
from skywalking.protocol.common import Command_pb2, Common_pb2  # noqa: F401
from skywalking.protocol.event import Event_pb2  # noqa: F401
from skywalking.protocol.language_agent import Meter_pb2, Tracing_pb2  # noqa: F401
from skywalking.protocol.logging import Logging_pb2  # noqa: F401
from skywalking.protocol.management import Management_pb2  # noqa: F401
from google.protobuf import descriptor_pool


def compare(fds_path):
    ours = descriptor_pb2.FileDescriptorSet()
    with open(fds_path, "rb") as f:
        ours.ParseFromString(f.read())
    pool = descriptor_pool.Default()
    problems, checked = [], 0
    for fd in ours.file:
        pkg = fd.package
        for m in fd.message_type:
            full = f"{pkg}.{m.name}"
            try:
                theirs = pool.FindMessageTypeByName(full)
            except KeyError:
                problems.append(f"message {full} missing in the wheel")
                continue
            by_name = {f.name: f for f in theirs.fields}
            for f in m.field:
                checked += 1
                t = by_name.get(f.name)
                if t is None:
                    problems.append(f"{full}.{f.name} missing in the wheel")
                    continue
                ours_rep = f.label == descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED
                theirs_rep = t.is_repeated if hasattr(t, "is_repeated") else t.label == 3
                if t.number != f.number or t.type != f.type or ours_rep != theirs_rep:
                    problems.append(
                        f"{full}.{f.name}: ours #{f.number} type {f.type} repeated {ours_rep}, "
                        f"wheel #{t.number} type {t.type} repeated {theirs_rep}")
                if f.type_name and ("." + (t.message_type or t.enum_type).full_name) != f.type_name:
                    problems.append(f"{full}.{f.name}: type {f.type_name} vs {(t.message_type or t.enum_type).full_name}")
                if f.HasField("oneof_index") != (t.containing_oneof is not None):
                    problems.append(f"{full}.{f.name}: oneof membership differs")
        for e in fd.enum_type:
            full = f"{pkg}.{e.name}"
            try:
                theirs = pool.FindEnumTypeByName(full)
            except KeyError:
                problems.append(f"enum {full} missing in the wheel")
                continue
            tv = {v.name: v.number for v in theirs.values}
            for v in e.value:
                checked += 1
                if tv.get(v.name) != v.number:
                    problems.append(f"{full}.{v.name} = {v.number}, wheel {tv.get(v.name)}")
        for s in fd.service:
            full = f"{pkg}.{s.name}"
            try:
                theirs = pool.FindServiceByName(full)
            except KeyError:
                problems.append(f"service {full} missing in the wheel")
                continue
            tm = {m.name: m for m in theirs.methods}
            for m in s.method:
                checked += 1
                t = tm.get(m.name)
                if t is None:
                    problems.append(f"rpc {full}.{m.name} missing in the wheel")
                    continue
                if "." + t.input_type.full_name != m.input_type or "." + t.output_type.full_name != m.output_type:
                    problems.append(f"rpc {full}.{m.name}: types differ")
                if getattr(t, "client_streaming", m.client_streaming) != m.client_streaming:
                    problems.append(f"rpc {full}.{m.name}: client streaming differs")
    for p in problems:
        print(p)
    print(f"checked {checked} definitions, {len(problems)} problems")
    return 1 if problems else 0


def decode(path):
    data = open(path, "rb").read()
    i = 0
    while i < len(data):
        (n,) = struct.unpack_from("<I", data, i)
        i += 4
        seg = Tracing_pb2.SegmentObject()
        seg.ParseFromString(data[i:i + n])
        i += n
        print(json.dumps(json_format.MessageToDict(seg, preserving_proto_field_name=True,
                                                   use_integers_for_enums=True)))
    return 0


if __name__ == "__main__":
    cmd, arg = sys.argv[1], sys.argv[2]
    sys.exit(compare(arg) if cmd == "compare-descriptors" else decode(arg))
