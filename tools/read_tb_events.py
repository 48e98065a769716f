#!/usr/bin/env python3
"""Read a TensorBoard event file (events.out.tfevents.*) with the Python standard library only.

The real consumer of these files is `tensorboard --logdir <dir>`; this reader exists so tests can check
what src/io/tensorboard.cpp writes without TensorBoard or protobuf installed.

It parses the TFRecord framing (uint64 length, masked CRC-32C of the length, data, masked CRC-32C of the
data), verifies both CRCs, decodes Event {1 wall_time double, 2 step int64, 3 file_version, 5 summary},
Summary {1 repeated Value} and Value {1 tag, 2 simple_value float}, and prints one JSON line per Value:
    {"step": .., "wall_time": .., "tag": .., "value": ..}
Unknown fields are skipped. Exits 1 with a message on a CRC or parse error.

Usage: read_tb_events.py FILE [--all]   (--all also prints {"step":..,"wall_time":..,"file_version":..})
"""
import json
import struct
import sys


class ParseError(Exception):
    pass


def _make_table():
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _make_table()


def crc32c(data):
    crc = 0xFFFFFFFF
    for b in data:
        crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data):
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_varint(buf, pos):
    result, shift = 0, 0
    while True:
        if pos >= len(buf):
            raise ParseError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise ParseError("varint too long")


def fields(buf):
    """Yields (field_number, wire_type, value) of a protobuf message; value is int or bytes."""
    pos = 0
    while pos < len(buf):
        key, pos = read_varint(buf, pos)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise ParseError("field number 0")
        if wire == 0:
            val, pos = read_varint(buf, pos)
        elif wire == 1:
            if pos + 8 > len(buf):
                raise ParseError("truncated fixed64")
            val, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            n, pos = read_varint(buf, pos)
            if pos + n > len(buf):
                raise ParseError("truncated length-delimited field %d" % field)
            val, pos = buf[pos:pos + n], pos + n
        elif wire == 5:
            if pos + 4 > len(buf):
                raise ParseError("truncated fixed32")
            val, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ParseError("unsupported wire type %d (field %d)" % (wire, field))
        yield field, wire, val


def _expect(wire, want, what):
    if wire != want:
        raise ParseError("%s has wire type %d, expected %d" % (what, wire, want))


def decode_event(data):
    ev = {"wall_time": 0.0, "step": 0, "file_version": None, "values": []}
    for field, wire, val in fields(data):
        if field == 1:
            _expect(wire, 1, "Event.wall_time")
            ev["wall_time"] = struct.unpack("<d", val)[0]
        elif field == 2:
            _expect(wire, 0, "Event.step")
            ev["step"] = val - (1 << 64) if val >= (1 << 63) else val
        elif field == 3:
            _expect(wire, 2, "Event.file_version")
            ev["file_version"] = val.decode("utf-8")
        elif field == 5:
            _expect(wire, 2, "Event.summary")
            for sf, sw, sval in fields(val):
                if sf != 1:
                    continue
                _expect(sw, 2, "Summary.value")
                tag, value = "", None
                for vf, vw, vval in fields(sval):
                    if vf == 1:
                        _expect(vw, 2, "Value.tag")
                        tag = vval.decode("utf-8")
                    elif vf == 2:
                        _expect(vw, 5, "Value.simple_value")
                        value = struct.unpack("<f", vval)[0]
                ev["values"].append((tag, value))
    return ev


def read_records(raw):
    pos, index = 0, 0
    while pos < len(raw):
        if pos + 12 > len(raw):
            raise ParseError("record %d: truncated header at offset %d" % (index, pos))
        header = raw[pos:pos + 8]
        (length,) = struct.unpack("<Q", header)
        (len_crc,) = struct.unpack("<I", raw[pos + 8:pos + 12])
        if masked_crc32c(header) != len_crc:
            raise ParseError("record %d: length CRC mismatch at offset %d" % (index, pos))
        start = pos + 12
        if start + length + 4 > len(raw):
            raise ParseError("record %d: truncated data at offset %d" % (index, pos))
        data = raw[start:start + length]
        (data_crc,) = struct.unpack("<I", raw[start + length:start + length + 4])
        if masked_crc32c(data) != data_crc:
            raise ParseError("record %d: data CRC mismatch at offset %d" % (index, pos))
        yield data
        pos = start + length + 4
        index += 1


def main(argv):
    if len(argv) < 2 or argv[1] in ("-h", "--help"):
        print(__doc__, file=sys.stderr)
        return 2
    path, show_all = argv[1], "--all" in argv[2:]
    try:
        with open(path, "rb") as f:
            raw = f.read()
        out = []
        for data in read_records(raw):
            ev = decode_event(data)
            if show_all and ev["file_version"] is not None:
                out.append({"step": ev["step"], "wall_time": ev["wall_time"],
                            "file_version": ev["file_version"]})
            for tag, value in ev["values"]:
                out.append({"step": ev["step"], "wall_time": ev["wall_time"], "tag": tag, "value": value})
    except (ParseError, UnicodeDecodeError, struct.error) as e:
        print("read_tb_events: %s: %s" % (path, e), file=sys.stderr)
        return 1
    except OSError as e:
        print("read_tb_events: %s" % e, file=sys.stderr)
        return 1
    for rec in out:
        print(json.dumps(rec, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
