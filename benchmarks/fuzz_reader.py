"""Fuzz precode's file reader: damaged and hostile gradient dumps must end in one-sentence UserErrors.

Builds one small real dump (`precode capture-gradients --model mlp --width 8 --image-size 8
--indices 0:1`, about 16 kB) unless --dump names one, then feeds `fileformat.read_raw_metadata`
and `fileformat.read(path, "gradients")` N files made from it with plain random mutations (no
shrinking), five kinds in turn:

    random      random bytes (0 to 512)
    length      a plausible 8-byte header length followed by random bytes
    truncated   the dump cut at a random byte
    mutated     1 to 6 bytes flipped, overwritten, inserted or deleted in the header length, the
                JSON header, the metadata inside it, the tensor data, or anywhere
    hostile     valid framing around edits made on purpose: metadata values that are deep JSON,
                5000-digit numbers, 1 MB strings or not strings; unknown, float8 or complex dtypes
                with the shape fitted to the bytes; NaN/inf bit patterns; wrong shapes and offsets;
                dropped keys and tensors; a wrong header length; padding

Each case is counted as `ok` (the file was read and validated), `UserError` (refused with one
sentence), `bad message` (a UserError whose message has a line break, no final period, does not
name the file, or is over 400 characters besides the path) or `unexpected <ExceptionType>`.
Prints a table, writes JSON, and exits 1 if any case was unexpected or had a bad message. A case
is reproduced by --seed S --only CASE (case numbers are printed and in the JSON's examples; the
built dump is the same on every run with the same precode and torch, see source_sha256).

    python benchmarks/fuzz_reader.py --cases 10000 --seed 0 --json fuzz_reader.json
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import platform
import random
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

KINDS = ["random", "length", "truncated", "mutated", "hostile"]
PARTS = ["length", "header", "metadata", "data", "anywhere"]
DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "U16", "U32", "U64", "BOOL", "C64",
          "F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "F8_E8M0", "F4", "F6_E2M3", "XX"]
ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "C64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
            "U16": 2}
NASTY = ["[" * 50_000 + "]" * 50_000, '{"a":' * 20_000 + "1" + "}" * 20_000, "1" * 5000, "-" + "9" * 4301,
         "9" * 19, "1e999999", "NaN", "-Infinity", "null", "[]", '{"a": 1', "0" * 50 + "1", "\u0661", "1\n",
         "precode-" + "x" * 100_000, "x" * 1_000_001, "", "precode-gradients", "precode-model", "2", "0"]
POISON = [b"\x00\x00\xc0\x7f", b"\x00\x00\x80\xff", b"\x7f\x80\xff\x00", b"\xff" * 4]
META_KEYS = ["model", "defense", "data", "loss", "capture", "format", "format_version", "extra"]


def make_dump(folder: Path) -> Path:
    """A real dump, with its capture time and output folder fixed so that case numbers reproduce."""
    from precode_cli import fileformat

    out = folder / "grads"
    subprocess.run([sys.executable, "-m", "precode_cli", "capture-gradients", "--model", "mlp", "--width", "8",
                    "--image-size", "8", "--indices", "0:1", "--seed", "0", "--out", str(out)],
                   check=True, capture_output=True, text=True)
    path = out / "train-000000.safetensors"
    stored = fileformat.read(path, "gradients")
    stored.meta["capture"]["time"] = "2000-01-01T00:00:00+00:00"
    stored.meta["capture"]["options"]["out"] = "grads"
    fileformat.write(path, "gradients", stored.tensors, stored.meta)
    path.write_bytes(canonical(path.read_bytes()))
    return path


def canonical(blob: bytes) -> bytes:
    """The same file with its JSON header written with sorted keys: the metadata first, in a fixed order.

    (safetensors writes the metadata in hash order, which changes from process to process.)
    """
    n = struct.unpack("<Q", blob[:8])[0]
    text = json.dumps(json.loads(blob[8 : 8 + n]), sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + blob[8 + n :]


def parts_of(blob: bytes) -> dict[str, tuple[int, int]]:
    """Byte ranges of a canonical file's parts: header length, JSON header, the metadata in it, tensor data."""
    n = struct.unpack("<Q", blob[:8])[0]
    metadata = json.loads(blob[8 : 8 + n])["__metadata__"]
    start = 9  # just after the header's opening brace: '"__metadata__":{...}' sorts first
    end = start + len(json.dumps({"__metadata__": metadata}, sort_keys=True, separators=(",", ":"))) - 2
    assert blob[start:end].startswith(b'"__metadata__":{') and blob[end - 1 : end] == b"}"
    return {"length": (0, 8), "header": (8, 8 + n), "metadata": (start, end), "data": (8 + n, len(blob)),
            "anywhere": (0, len(blob))}


def mutated(rng: random.Random, blob: bytes, parts: dict[str, tuple[int, int]]) -> tuple[bytes, str]:
    data = bytearray(blob)
    done = []
    for _ in range(rng.randint(1, 6)):
        part, op = rng.choice(PARTS), rng.choice(["flip", "set", "insert", "delete"])
        lo, hi = parts[part]
        pos = min(rng.randrange(lo, hi), max(len(data) - 1, 0))
        if op == "flip" and data:
            data[pos] ^= 1 << rng.randrange(8)
        elif op == "set" and data:
            data[pos] = rng.randrange(256)
        elif op == "insert":
            data[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif op == "delete":
            del data[pos : pos + rng.randint(1, 16)]
        done.append(f"{op}@{part}")
    return bytes(data), ",".join(done)


def hostile(rng: random.Random, blob: bytes) -> tuple[bytes, str]:
    n = struct.unpack("<Q", blob[:8])[0]
    header, data = json.loads(blob[8 : 8 + n]), bytearray(blob[8 + n :])
    names = sorted(k for k in header if k != "__metadata__")
    spans = {name: header[name]["data_offsets"] for name in names}
    length_edit, padding, done = None, "", []
    for _ in range(rng.randint(1, 3)):
        op = rng.choice(["meta", "meta", "meta-not-a-string", "drop-meta", "dtype", "retype", "retype", "poison",
                         "shape", "offsets", "drop-tensor", "length", "padding"])
        meta = header.setdefault("__metadata__", {})
        name = rng.choice(names)
        begin, end = spans[name]
        if op == "meta":
            key = rng.choice(META_KEYS)
            meta[key] = rng.choice(NASTY) if rng.random() < 0.7 else "".join(
                chr(rng.randrange(32, 0x2FF)) for _ in range(rng.randrange(20)))
            op += f":{key}"
        elif op == "meta-not-a-string":
            meta[rng.choice(["model", "format_version"])] = rng.choice([5, None, [1, 2], {"a": 1}])
        elif op == "drop-meta":
            key = rng.choice(["model", "format", "format_version", "__all__"])
            header.pop("__metadata__") if key == "__all__" else meta.pop(key, None)
        elif op == "poison":
            pattern = rng.choice(POISON)
            data[begin:end] = (pattern * ((end - begin) // 4 + 1))[: end - begin]
        elif name not in header:
            continue
        elif op == "dtype":
            header[name]["dtype"] = rng.choice(DTYPES)
        elif op == "retype":
            dtype = rng.choice(DTYPES)
            header[name]["dtype"], header[name]["shape"] = dtype, [(end - begin) // ITEMSIZE.get(dtype, 1)]
            op += f":{dtype}"
        elif op == "shape":
            header[name]["shape"] = [rng.choice([-1, 0, 1, 7, 2**31, 2**62]) for _ in range(rng.randrange(4))]
        elif op == "offsets":
            header[name]["data_offsets"] = [rng.choice([-1, 0, begin, end, end + 1, 2**63, 2**64 + 1])
                                            for _ in range(rng.randrange(4))]
        elif op == "drop-tensor":
            header.pop(name)
        elif op == "length":
            length_edit = rng.choice([0, 1, 7, -1, +1, 2**31, 2**63, 2**64 - 1])
        elif op == "padding":
            padding = rng.choice([" ", "\x00", "\n", "x"]) * rng.randrange(64)
        done.append(op)
    text = json.dumps(header, ensure_ascii=False).encode() + padding.encode()
    length = len(text)
    if length_edit is not None:
        length = length + length_edit if length_edit in (-1, 1) else length_edit
    return struct.pack("<Q", length % 2**64) + text + bytes(data), ",".join(done)


def make_case(rng: random.Random, kind: str, blob: bytes, parts: dict[str, tuple[int, int]]) -> tuple[bytes, str]:
    if kind == "random":
        return rng.randbytes(rng.randrange(513)), ""
    if kind == "length":
        body = rng.randbytes(rng.randrange(513))
        return struct.pack("<Q", rng.randrange(len(body) + 9)) + body, ""
    if kind == "truncated":
        cut = rng.randrange(len(blob))
        return blob[:cut], f"cut at {cut}"
    if kind == "mutated":
        return mutated(rng, blob, parts)
    return hostile(rng, blob)


def message_problem(message: str, path: Path) -> str | None:
    if "\n" in message or "\r" in message:
        return "line break"
    if not message.endswith("."):
        return "no final period"
    if str(path) not in message:
        return "does not name the file"
    if len(message) > len(str(path)) + 400:
        return f"{len(message)} characters"
    return None


def run_case(path: Path, fileformat: Any, user_error: type) -> tuple[str, str]:
    """(outcome, detail) for the file at `path`."""
    import torch

    for reader in (fileformat.read_raw_metadata, fileformat.read):
        try:
            stored = reader(path, "gradients")
        except user_error as err:
            problem = message_problem(str(err), path)
            return ("bad message", f"{problem}: {str(err)[:200]}") if problem else ("UserError", str(err)[:200])
        except Exception as err:  # noqa: BLE001 - exactly what this script is looking for
            frames = traceback.extract_tb(err.__traceback__)
            ours = [f for f in frames if "precode_cli" in f.filename]
            frame = (ours or frames)[-1]  # where precode let it through
            return f"unexpected {type(err).__name__}", f"{str(err)[:200]} at {frame.filename}:{frame.lineno}"
    for name, tensor in stored.tensors.items():  # what the reader accepted is what it promises
        t = torch.view_as_real(tensor) if tensor.is_complex() else tensor
        if t.is_floating_point() and not bool(torch.isfinite(t.float()).all()):
            return "unexpected non-finite accepted", name
    return "ok", ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dump", type=Path, default=None, help="a gradient dump to start from (default: capture one)")
    parser.add_argument("--json", default="fuzz_reader.json")
    parser.add_argument("--only", type=int, default=None, help="run just this case number (to reproduce it)")
    parser.add_argument("--keep", type=Path, default=None, help="save the files of unexpected cases here")
    args = parser.parse_args()

    from precode_cli import fileformat
    from precode_cli.errors import UserError

    with tempfile.TemporaryDirectory(prefix="fuzz-reader-") as scratch:
        folder = Path(scratch)
        source = args.dump or make_dump(folder)
        blob = canonical(source.read_bytes())
        parts = parts_of(blob)
        path = folder / "case.safetensors"
        counts: dict[str, collections.Counter] = {kind: collections.Counter() for kind in KINDS}
        examples: dict[str, dict[str, Any]] = {}
        started = time.perf_counter()
        cases = [args.only] if args.only is not None else range(args.cases)
        for case in cases:
            rng = random.Random(f"{args.seed}:{case}")
            kind = KINDS[case % len(KINDS)]
            data, how = make_case(rng, kind, blob, parts)
            path.write_bytes(data)
            outcome, detail = run_case(path, fileformat, UserError)
            counts[kind][outcome] += 1
            examples.setdefault(outcome, {"case": case, "kind": kind, "edits": how, "detail": detail})  # the first
            if args.keep is not None and outcome.startswith(("unexpected", "bad")):
                args.keep.mkdir(parents=True, exist_ok=True)
                (args.keep / f"case-{case}.safetensors").write_bytes(data)
        seconds = time.perf_counter() - started

    rank = {"ok": 0, "UserError": 1, "bad message": 2}
    outcomes = sorted({o for c in counts.values() for o in c}, key=lambda o: (rank.get(o, 3), o))
    total = collections.Counter()
    for c in counts.values():
        total.update(c)
    width = max([len(o) for o in outcomes] + [10])
    print(f"{'kind':<10} " + " ".join(f"{o:>{width}}" for o in outcomes) + f" {'cases':>7}")
    for kind in KINDS:
        print(f"{kind:<10} " + " ".join(f"{counts[kind][o]:>{width}}" for o in outcomes)
              + f" {sum(counts[kind].values()):>7}")
    print(f"{'all':<10} " + " ".join(f"{total[o]:>{width}}" for o in outcomes) + f" {sum(total.values()):>7}")
    failures = sum(n for o, n in total.items() if o.startswith(("unexpected", "bad")))
    print(f"{sum(total.values())} cases in {seconds:.1f} s ({seconds / max(sum(total.values()), 1) * 1000:.2f} ms "
          f"each); {failures} unexpected or badly worded.")
    for outcome, example in examples.items():
        if outcome.startswith(("unexpected", "bad")):
            print(f"  {outcome}: case {example['case']} ({example['kind']} {example['edits']}): {example['detail']}")

    import safetensors
    import torch

    document = {
        "cases": sum(total.values()), "seed": args.seed, "seconds": round(seconds, 2), "failures": failures,
        "source_bytes": len(blob), "source_sha256": hashlib.sha256(blob).hexdigest(),
        "totals": dict(total), "by_kind": {k: dict(v) for k, v in counts.items()}, "examples": examples,
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "safetensors": safetensors.__version__, "machine": platform.machine()},
    }
    Path(args.json).write_text(json.dumps(document, indent=2) + "\n")
    print(f"Wrote {args.json}.")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
