"""Hostile inputs for every precode file kind, run through the real CLI in subprocesses and measured.

What it checks (the promise of docs/security.md, for every kind of file a command reads): a
hostile or inconsistent file, given to the command that consumes it, ends in

    exit code 2, exactly one non-empty line on stderr that starts with "Error:", no "Traceback" and
    no "Internal error" anywhere in the output, a peak RSS under 1.5 GB (1.5e9 bytes), under 30 s
    of wall time, and no file outside the command's output folder changed.

How it works:

1. **Setup** (in a temporary folder, or `--work DIR`, reused when already set up): real, small files
   of every kind, made with the real CLI:

       precode train --model mlp --width 16 --image-size 8 --epochs 1 --subset 64 --checkpoint-epochs 1 --out RUN
       precode capture-gradients RUN --indices 0:2 --batch-size 1 --format-version 1 --out GRADS
       precode attack GRADS --iterations 20 --checkpoint-iterations 5 --out RECON
       precode attack GRADS --iterations 400 --checkpoint-iterations 5 --out RECON2    (stopped with SIGINT)

   giving a model (RUN/model.safetensors), a training state (RUN/checkpoints/resume.safetensors),
   dumps and truth files (GRADS/), reconstructions (RECON/), an attack state
   (RECON2/checkpoints/train-000000.safetensors), and a YAML config for capture-gradients.

2. **Cases**, drawn with Hypothesis strategies (seeded: the same --seed gives the same cases) over
   every metadata field of the real file (every key at every depth, found by walking its JSON) and
   every tensor, in these mutation classes:

       wrong-type      a field replaced by a value of another JSON type (str/int/float/bool/null/list/dict)
       out-of-range    -1, 0, 10**30, 2**63, 2**64, 5000-digit integers, NaN, Infinity, 1e308, "", 300-
                       character names, unknown enum values, path-like and control-character text
       huge            100,000-element lists and dicts, 100,000- and 2,000,000-character strings
       nested          [[[...]]] and {"a":{"a":...}} 100 and 10,000 levels deep
       drop            a key (or list element) removed
       extra           an unknown key added (readers must ignore it: may be accepted)
       format          the plain `format` / `format_version` strings changed or dropped
       inconsistent    hand-written per kind: batch_size vs labels, mean/std vs channels, model vs data
                       input_shape, labels outside num_classes, truth indices, step > iterations, epoch >
                       epochs, history vs epoch, optimizer state shapes, valid but huge model/data specs
                       (mlp width 200000, input_shape [3,1024,1024], num_classes 100000, batch_size 4096)
       tensor-dtype    a tensor converted to another dtype (F32, I64, F16, BF16, U8, F64, BOOL, I32)
       tensor-shape    a tensor of another shape: flattened, unsqueezed, a dimension +-1, scalar, empty,
                       zero-size but huge ([0, 10**12])
       tensor-extra    an extra tensor (unknown, or a name the kind's prefixes allow)
       tensor-missing  a tensor removed
       tensor-header   the header claims a shape that does not fit the bytes ([10**9, 10**9], [2**63])
       tensor-values   NaN/inf, out-of-range labels, images outside [0, 1], huge integers
       container       truncated file, data offsets that overlap or point outside the file
       yaml            (config kind) each option's value of the wrong type, out of range or huge,
                       anchor bombs, python tags, non-mapping roots, unknown and duplicate keys, non-UTF-8

   The mutated file is written directly as safetensors (8-byte little-endian header length, JSON
   header, data), so inconsistent files can be made.

3. **Each case** gets a fresh copy of the folder it lives in and runs the consuming command:

       gradients       precode attack CASE/GRADS/train-000000.safetensors --iterations 2 --out CASE/OUT
       truth           precode evaluate WORK/RECON --truth CASE/GRADS --out CASE/OUT
       reconstruction  precode evaluate CASE/RECON --truth WORK/GRADS --out CASE/OUT
       model           precode capture-gradients CASE/RUN/model.safetensors --indices 0:1 --out CASE/OUT
       training-state  precode train ...(as set up) --epochs 2 --resume --out CASE/RUN
       attack-state    precode attack WORK/GRADS --iterations 400 --checkpoint-iterations 5 --resume --out CASE/RECON2
       config          precode capture-gradients --config CASE/config.yaml --out CASE/OUT

   Wall time and peak RSS of the child come from os.wait4 (ru_maxrss); a child still running after
   --kill-after seconds (60) is killed. Children run with OMP_NUM_THREADS=1 (--threads), two at a time.

   A case **passes** when it is refused as above. A mutation can also leave a *valid* file (an unknown
   key, a dropped optional key, a changed float still in range): such a case is **accepted** when the
   command exits 0 within the same time and memory limits, without a traceback; accepted cases are
   listed, not counted as failures. Every other outcome is a **failure**; for an "Internal error" the
   command is run again with `precode --debug` to record the traceback.

Output: a table per kind (cases, passed, accepted, failed, slowest s, largest MB), the overall case
count, the slowest and the largest case, every failure with its mutation, command and output, and the
accepted cases; the same as JSON (--json). Exits 1 if any case failed.

    python benchmarks/hostile_files.py                       # 40 cases per kind + curated ones
    python benchmarks/hostile_files.py --kinds gradients,truth --cases-per-kind 10 --seed 3
    python benchmarks/hostile_files.py --work /tmp/hostile   # keep (and reuse) the set-up files
    python benchmarks/hostile_files.py --only 17             # rerun one case (numbers are in the JSON)
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import platform
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import HealthCheck, Phase, given, settings, strategies as st
from hypothesis import seed as hypothesis_seed

REPO = Path(__file__).resolve().parent.parent
KINDS = ["gradients", "truth", "reconstruction", "model", "training-state", "attack-state", "config"]
MAX_RSS = 1.5e9  # bytes
MAX_SECONDS = 30.0
DUMP = "train-000000.safetensors"
TRUTH = "train-000000.truth.safetensors"
TRAIN = ["--model", "mlp", "--width", "16", "--image-size", "8", "--subset", "64", "--checkpoint-epochs", "1"]
ATTACK_STATE = ["--checkpoint-iterations", "5"]  # plus --iterations, found at setup (see make_attack_state)
CONFIG = {"model": "mlp", "width": 16, "image-size": 8, "indices": "0:1", "batch-size": 1, "seed": 0}
# Where each kind's file lives in the work folder.
BASE_FILE = {
    "gradients": "GRADS/" + DUMP,
    "truth": "GRADS/" + TRUTH,
    "reconstruction": "RECON/" + DUMP,
    "model": "RUN/model.safetensors",
    "training-state": "RUN/checkpoints/resume.safetensors",
    "attack-state": "RECON2/checkpoints/" + DUMP,
    "config": "config.yaml",
}
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
NUMPY = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1", "U8": "u1",
         "BOOL": "?"}


# ------------------------------------------------------------------------------------------ the CLI


def precode_command() -> list[str]:
    """The installed `precode` script beside this Python, else `python -m precode_cli` (the same entry)."""
    script = Path(sys.executable).with_name("precode")
    return [str(script)] if script.exists() else [sys.executable, "-m", "precode_cli"]


def child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1",
                "COLUMNS": "200"})
    return env


def measure(cmd: list[str], cwd: Path, env: dict[str, str], kill_after: float) -> dict[str, Any]:
    """Run `cmd`; its exit code, output, wall time and peak RSS (os.wait4's ru_maxrss, KiB on Linux)."""
    out_path, err_path = cwd / ".stdout", cwd / ".stderr"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, cwd=cwd, env=env,
                                start_new_session=True)
        killed = threading.Event()

        def kill() -> None:
            killed.set()
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        timer = threading.Timer(kill_after, kill)
        timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - started
        timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: keep Popen from waiting again
    stdout = out_path.read_bytes().decode("utf-8", "replace")
    stderr = err_path.read_bytes().decode("utf-8", "replace")
    out_path.unlink()
    err_path.unlink()
    return {"rc": proc.returncode, "stdout": stdout, "stderr": stderr, "seconds": round(seconds, 3),
            "peak_rss": usage.ru_maxrss * 1024, "killed": killed.is_set()}


def run_ok(cmd: list[str], cwd: Path, env: dict[str, str]) -> None:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"setup command failed ({result.returncode}): {' '.join(cmd)}\n{result.stderr}")


# --------------------------------------------------------------------------------------------- setup


def setup(work: Path, env: dict[str, str]) -> dict[str, Any]:
    """Real files of every kind, made with the CLI (reused when `work` was set up before)."""
    marker = work / "setup.json"
    if marker.exists():
        return json.loads(marker.read_text())
    work.mkdir(parents=True, exist_ok=True)
    pc = precode_command()
    print(f"Setting up real files in {work} ...", flush=True)
    run_ok(pc + ["train", *TRAIN, "--epochs", "1", "--out", "RUN"], work, env)
    # Format version 1: every case damages one self-contained dump (grad.*, param.* and buffer.* in the file);
    # version 2's shared states and factors have their hostile cases in tests/test_shared_states_and_shards.py.
    run_ok(pc + ["capture-gradients", "RUN", "--indices", "0:2", "--batch-size", "1", "--format-version", "1",
                 "--out", "GRADS"], work, env)
    run_ok(pc + ["attack", "GRADS", "--iterations", "20", "--checkpoint-iterations", "5", "--out", "RECON"], work, env)
    iterations = make_attack_state(work, env)
    (work / "config.yaml").write_text(yaml_dump(CONFIG))
    info = {"attack_state_iterations": iterations}
    for kind in KINDS:
        assert (work / BASE_FILE[kind]).is_file(), BASE_FILE[kind]
    marker.write_text(json.dumps(info))
    return info


def make_attack_state(work: Path, env: dict[str, str]) -> int:
    """Start an ig attack with checkpoints and stop it with SIGINT (Ctrl-C) once the first checkpoint
    exists: the attack writes its state and stops. Retried with more iterations if it finished first."""
    pc = precode_command()
    for iterations in (400, 2000, 10000):
        shutil.rmtree(work / "RECON2", ignore_errors=True)
        cmd = pc + ["attack", "GRADS", "--iterations", str(iterations), *ATTACK_STATE, "--out", "RECON2"]
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        state = work / BASE_FILE["attack-state"]
        deadline = time.time() + 120
        while proc.poll() is None and not state.exists() and time.time() < deadline:
            time.sleep(0.02)
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=120)
        if state.exists():
            return iterations
    raise SystemExit("could not stop an attack before it finished; no attack state to start from")


def yaml_dump(mapping: dict[str, Any]) -> str:
    return "".join(f"{key}: {json.dumps(value)}\n" for key, value in mapping.items())


# ------------------------------------------------------------------------------- safetensors, raw


def load_raw(path: Path) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    """(metadata strings, {name: {"dtype", "shape", "data"}}) of a safetensors file, in header order."""
    blob = path.read_bytes()
    n = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8 : 8 + n])
    data = blob[8 + n :]
    meta = header.pop("__metadata__", {})
    tensors = {}
    for name in sorted(header, key=lambda k: header[k]["data_offsets"][0]):
        begin, end = header[name]["data_offsets"]
        tensors[name] = {"dtype": header[name]["dtype"], "shape": list(header[name]["shape"]), "data": data[begin:end]}
    return meta, tensors


def save_raw(meta: dict[str, str] | None, tensors: dict[str, dict[str, Any]],
             header_edits: dict[str, dict[str, Any]] | None = None) -> bytes:
    """A safetensors file from raw parts; `header_edits` change header entries after offsets are laid out
    (so that the header can disagree with the bytes)."""
    header: dict[str, Any] = {}
    if meta is not None:
        header["__metadata__"] = meta
    chunks, offset = [], 0
    for name, t in tensors.items():
        header[name] = {"dtype": t["dtype"], "shape": t["shape"], "data_offsets": [offset, offset + len(t["data"])]}
        chunks.append(t["data"])
        offset += len(t["data"])
    for name, edit in (header_edits or {}).items():
        header[name].update(edit)
    text = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(chunks)


def as_array(t: dict[str, Any]) -> np.ndarray:
    if t["dtype"] == "BF16":
        raw = np.frombuffer(t["data"], "<u2").astype("<u4") << 16
        return raw.view("<f4").reshape(t["shape"])
    return np.frombuffer(t["data"], NUMPY[t["dtype"]]).reshape(t["shape"])


def from_array(array: np.ndarray, dtype: str) -> dict[str, Any]:
    if dtype == "BF16":
        bits = (np.ascontiguousarray(array, "<f4").view("<u4") >> 16).astype("<u2")
        return {"dtype": "BF16", "shape": list(array.shape), "data": bits.tobytes()}
    with np.errstate(all="ignore"):
        converted = np.ascontiguousarray(array.astype(NUMPY[dtype]))
    return {"dtype": dtype, "shape": list(array.shape), "data": converted.tobytes()}


def fitted(t: dict[str, Any], shape: list[int]) -> dict[str, Any]:
    """The tensor's bytes cut or repeated to fill `shape` (same dtype)."""
    numel = 1
    for side in shape:
        numel *= side
    need = numel * ITEMSIZE[t["dtype"]]
    data = t["data"] or b"\x00" * ITEMSIZE[t["dtype"]]
    data = (data * (need // len(data) + 1))[:need] if need else b""
    return {"dtype": t["dtype"], "shape": shape, "data": data}


# ------------------------------------------------------------------------ JSON values, with tokens
#
# A case must be small and JSON itself (it is drawn, stored and printed), but some values are huge or
# not representable in Python's JSON ("NaN" is, 10,000-deep nesting cannot be encoded by json.dumps).
# Such values are tokens {"$": ...}, turned into JSON text only when the file is written.


def token_text(token: dict[str, Any]) -> str:
    kind = token["$"]
    if kind == "raw":
        return token["text"]
    if kind == "nested":
        opener, closer = ("[", "]") if token["bracket"] == "[" else ('{"a":', "}")
        return opener * token["depth"] + "0" + closer * token["depth"]
    if kind == "list":
        return "[" + ",".join([json.dumps(token["item"])] * token["n"]) + "]"
    if kind == "str":
        return json.dumps(token["char"] * token["n"])
    if kind == "dict":
        return "{" + ",".join(f'"k{i}":0' for i in range(token["n"])) + "}"
    if kind == "digits":
        return ("-" if token.get("negative") else "") + "9" * token["n"]
    raise ValueError(token)


def is_token(value: Any) -> bool:
    return isinstance(value, dict) and "$" in value


def encode(value: Any) -> str:
    """JSON text of a value that may hold tokens anywhere."""
    holes: list[str] = []

    def strip(v: Any) -> Any:
        if is_token(v):
            holes.append(token_text(v))
            return f"@@HOLE{len(holes) - 1}@@"
        if isinstance(v, dict):
            return {k: strip(x) for k, x in v.items()}
        if isinstance(v, list):
            return [strip(x) for x in v]
        return v

    text = json.dumps(strip(value), sort_keys=True)
    for i, hole in enumerate(holes):
        text = text.replace(f'"@@HOLE{i}@@"', hole, 1)
    return text


def describe(value: Any) -> str:
    """A short text for a value in the report."""
    if is_token(value):
        kind = value["$"]
        if kind == "raw":
            return value["text"] if len(value["text"]) < 40 else value["text"][:30] + "..."
        if kind == "nested":
            return f"{value['bracket']}...nested {value['depth']} deep"
        if kind == "list":
            return f"[{value['item']!r} x {value['n']}]"
        if kind == "str":
            return f"'{value['char']}' x {value['n']}"
        if kind == "dict":
            return f"{{{value['n']} keys}}"
        if kind == "digits":
            return f"{'-' if value.get('negative') else ''}{value['n']}-digit integer"
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ------------------------------------------------------------------------ walking the real files


def json_paths(value: Any, prefix: tuple = ()) -> list[tuple[tuple, str]]:
    """(path, JSON type) of every value inside a decoded JSON document; long lists: first and last item."""
    found = [(prefix, json_type(value))] if prefix else []
    if isinstance(value, dict):
        for key in sorted(value):
            found += json_paths(value[key], prefix + (key,))
    elif isinstance(value, list):
        picks = range(len(value)) if len(value) <= 3 else (0, len(value) - 1)
        for i in picks:
            found += json_paths(value[i], prefix + (i,))
    return found


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    return {int: "int", float: "float", str: "str", list: "list", dict: "dict"}[type(value)]


def describe_base(path: Path) -> dict[str, Any]:
    """What the strategies need to know about a real file: metadata paths and tensors."""
    raw, tensors = load_raw(path)
    meta = {k: json.loads(v) for k, v in raw.items() if k not in ("format", "format_version")}
    paths = []
    for key in sorted(meta):
        paths.append(((key,), json_type(meta[key])))
        paths += json_paths(meta[key], (key,))
    return {"paths": [[list(p), t] for p, t in paths],
            "dicts": [list(p) for p, t in paths if t == "dict"],
            "tensors": {name: {"dtype": t["dtype"], "shape": t["shape"]} for name, t in tensors.items()}}


# ------------------------------------------------------------------------------------- strategies

BIG_INTS = [-1, 0, -(2**63) - 1, 2**63, 2**64, 10**30, {"$": "digits", "n": 5000},
            {"$": "digits", "n": 400, "negative": True}]
BAD_FLOATS = [{"$": "raw", "text": "NaN"}, {"$": "raw", "text": "Infinity"}, {"$": "raw", "text": "-Infinity"},
              {"$": "raw", "text": "1e999"}, -1.0, 0.0, 1e308, -1e308, 5e-324]
BAD_STRINGS = ["", "x" * 300, "zzz-unknown", "../../../../etc/passwd", "/tmp/x/../..", "a\u0000b", "\u202egnp.",
               "[red]x[/red]", "line\nbreak", "\ud800"]
WRONG_TYPE = {"str": "x", "int": 7, "float": 0.5, "bool": True, "null": None, "list": [1, 2], "dict": {"a": 1},
              "int-as-float": 7.0, "numeric-string": "3"}
HUGE = [{"$": "list", "n": 100_000, "item": 0}, {"$": "list", "n": 100_000, "item": "x"},
        {"$": "str", "n": 100_000, "char": "x"}, {"$": "str", "n": 2_000_000, "char": "y"},
        {"$": "dict", "n": 100_000}, {"$": "list", "n": 300_000, "item": 1.5}]
NESTED = [{"$": "nested", "depth": d, "bracket": b} for d in (100, 10_000) for b in ("[", "{")]
DTYPES = ["F32", "I64", "F16", "BF16", "U8", "F64", "BOOL", "I32"]
HEADER_SHAPES = [[10**9, 10**9], [2**63], [2**64], [-1], [10**18, 10**18, 10**18]]


def wrong_types(current: str) -> list[Any]:
    """Values of another JSON type than `current` (7.0 and "3" count as wrong for an int; for a float,
    an int is kept: it may legitimately be accepted)."""
    skip = {current, "int-as-float"} if current == "float" else {current}
    return [v for k, v in WRONG_TYPE.items() if k not in skip]


def out_of_range(current: str) -> list[Any]:
    if current == "int":
        return BIG_INTS + [{"$": "raw", "text": "1e999"}]
    if current == "float":
        return BAD_FLOATS
    if current == "str":
        return BAD_STRINGS
    if current == "bool":
        return [2, -1, "true", 0]
    if current == "list":
        return [[], [0], [0] * 7, [-1, -1, -1]]
    if current == "dict":
        return [{}, {"": None}]
    return [-1, 2**63, {"$": "raw", "text": "NaN"}]


@st.composite
def meta_case(draw: Any, base: dict[str, Any]) -> dict[str, Any]:
    mutation = draw(st.sampled_from(["wrong-type", "out-of-range", "huge", "nested", "drop", "extra"]))
    if mutation == "extra":
        path = draw(st.sampled_from(base["dicts"]))
        value = draw(st.sampled_from([1, "x", None, [1, 2], {"$": "nested", "depth": 25, "bracket": "["},
                                      {"$": "str", "n": 10_000, "char": "z"}]))
        return {"mutation": "extra", "ops": [{"op": "extra", "path": path, "key": "zz_unknown", "value": value}]}
    path, current = draw(st.sampled_from(base["paths"]))
    if mutation == "drop":
        return {"mutation": "drop", "ops": [{"op": "drop", "path": path}]}
    choices = {"wrong-type": wrong_types(current), "out-of-range": out_of_range(current), "huge": HUGE,
               "nested": NESTED}[mutation]
    value = draw(st.sampled_from(choices))
    return {"mutation": mutation, "ops": [{"op": "set", "path": path, "value": value}]}


@st.composite
def format_case(draw: Any, kind: str) -> dict[str, Any]:
    key = draw(st.sampled_from(["format", "format_version"]))
    others = ["precode-model", "precode-gradients", "precode-truth", "precode-weights", "", "PRECODE-GRADIENTS",
              "precode-" + "x" * 100_000] if key == "format" else \
        ["0", "2", "01", "one", "", "1.0", " 1", "1" * 5000, "\u0661", "-1", "99999999999999999999"]
    if draw(st.booleans()):
        return {"mutation": "format", "ops": [{"op": "drop-meta", "key": key}]}
    return {"mutation": "format", "ops": [{"op": "raw-meta", "key": key, "text": draw(st.sampled_from(others))}]}


def shape_variants(shape: list[int]) -> list[list[int]]:
    variants = [[], [0], [0, 10**12], shape + [1], [1] + shape]
    if len(shape) >= 1:
        variants += [[max(1, _numel(shape))] if len(shape) != 1 else [shape[0], 1],
                     [shape[0] + 1, *shape[1:]], [0, *shape[1:]], [shape[0] * 4096, *shape[1:]]]
        if shape[0] > 1:
            variants.append([shape[0] - 1, *shape[1:]])
    if len(shape) == 2 and shape[0] != shape[1]:
        variants.append([shape[1], shape[0]])
    return [v for v in variants if v != shape and _numel(v) * 8 < 50_000_000]


def _numel(shape: list[int]) -> int:
    total = 1
    for side in shape:
        total *= side
    return total


@st.composite
def tensor_case(draw: Any, kind: str, base: dict[str, Any]) -> dict[str, Any]:
    tensors = base["tensors"]
    names = sorted(tensors)
    mutation = draw(st.sampled_from(["tensor-dtype", "tensor-shape", "tensor-extra", "tensor-missing",
                                     "tensor-header", "tensor-values", "container"]))
    name = draw(st.sampled_from(names))
    info = tensors[name]
    if mutation == "tensor-dtype":
        dtype = draw(st.sampled_from([d for d in DTYPES if d != info["dtype"]]))
        return {"mutation": mutation, "ops": [{"op": "retype", "tensor": name, "dtype": dtype}]}
    if mutation == "tensor-shape":
        shape = draw(st.sampled_from(shape_variants(info["shape"])))
        return {"mutation": mutation, "ops": [{"op": "reshape", "tensor": name, "shape": shape}]}
    if mutation == "tensor-extra":
        prefix = name.split(".")[0]
        extra = draw(st.sampled_from([f"{prefix}.zz_extra", "zz_extra", f"{name}.x", "labels", "indices",
                                      "optimizer.99.exp_avg", "adam.7.step", "noise.classifier", "rng.replay.0",
                                      "rng.cuda", "x" * 10_000, "../../etc/passwd", ""]))
        if extra in tensors:
            extra += ".again"
        dtype = draw(st.sampled_from(["F32", "I64", "U8"]))
        shape = draw(st.sampled_from([[2], [0, 10**12], [3, 8, 8], [1]]))
        return {"mutation": mutation, "ops": [{"op": "add-tensor", "tensor": extra, "dtype": dtype, "shape": shape}]}
    if mutation == "tensor-missing":
        return {"mutation": mutation, "ops": [{"op": "drop-tensor", "tensor": name}]}
    if mutation == "tensor-header":
        shape = draw(st.sampled_from(HEADER_SHAPES))
        return {"mutation": mutation, "ops": [{"op": "header", "tensor": name, "edit": {"shape": shape}}]}
    if mutation == "tensor-values":
        if info["dtype"] in ("F32", "F16", "F64", "BF16"):
            fill = draw(st.sampled_from(["nan", "inf", "-inf", "1e38", "-5", "2", "0"]))
        else:
            fill = draw(st.sampled_from(["-1", "10", "255", "4611686018427387904", "-9223372036854775808"]))
        where = draw(st.sampled_from(["all", "first"]))
        return {"mutation": mutation, "ops": [{"op": "values", "tensor": name, "fill": fill, "where": where}]}
    edit = draw(st.sampled_from(["truncate", "offsets-outside", "offsets-overlap", "offsets-reversed", "length"]))
    return {"mutation": mutation, "ops": [{"op": "container", "tensor": name, "edit": edit}]}


def case_strategy(kind: str, base: dict[str, Any]) -> Any:
    if kind == "config":
        return yaml_case()
    return st.one_of(meta_case(base), meta_case(base), meta_case(base), tensor_case(kind, base),
                     tensor_case(kind, base), format_case(kind))


# ----------------------------------------------------------------------------------- config (YAML)

CONFIG_VALUES = {
    "wrong-type": ["[1, 2]", "{a: 1}", "true", "null", "1.5", "x", "!!binary aGVsbG8=", "2024-01-01", "''"],
    "out-of-range": ["-1", "0", "10000000000000000000000000000000", "9223372036854775808", ".nan", ".inf", "-.inf",
                     "1e999", "'99999:0'", "'0:100000000000'", "'-5:-1'", "'a:b'", "'1:1'"],
    "huge": ["'" + "x" * 5000 + "'", "[" + ", ".join(["0"] * 20_000) + "]", "'" + "9" * 5000 + "'"],
    "nested": ["[" * 100 + "]" * 100, "[" * 10_000 + "]" * 10_000, "{a: " * 100 + "1" + "}" * 100],
}
YAML_FILES = {
    "anchor-bomb": "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 9) + "]\n" for i in range(9)),
    "alias-as-value": "model: &m mlp\nwidth: 16\nimage-size: 8\nindices: '0:1'\ndefense: *m\n",
    "python-tag": "model: !!python/object/apply:os.system ['touch PWNED']\nindices: '0:1'\n",
    "python-name": "model: !!python/name:os.system\nindices: '0:1'\n",
    "custom-tag": "model: !evil mlp\n",
    "list-root": "- model\n- mlp\n",
    "scalar-root": "mlp\n",
    "unknown-key": "model: mlp\nwidth: 16\nimage-size: 8\nindices: '0:1'\nrm_rf: true\n",
    "out-key": "model: mlp\nwidth: 16\nimage-size: 8\nindices: '0:1'\nout: /\n",
    "duplicate-key": "model: mlp\nmodel: cnn\nindices: '0:1'\n",
    "bad-syntax": "model: [mlp\nwidth: {\n",
    "tabs": "model:\tmlp\n\twidth: 16\n",
    "not-utf8": "model: \udcff\udcfe mlp\n",
    "nul-bytes": "model: mlp\x00\x00\nindices: '0:1'\n",
    "huge-file": "# " + "x" * 10_000_000 + "\nmodel: mlp\n",
    "many-keys": "".join(f"k{i}: {i}\n" for i in range(50_000)),
    "complex-key": "? [a, b]\n: 1\n",
    "multi-document": "model: mlp\n---\nmodel: cnn\n",
    "merge-key": "base: &b {width: 16}\n<<: *b\nmodel: mlp\n",
    "huge-budget-width": "model: mlp\nwidth: 200000\nimage-size: 8\nindices: '0:1'\n",
    "huge-budget-batch": "model: resnet18\nimage-size: 512\nbatch-size: 4096\nindices: '0:4096'\n",
    "huge-budget-indices": "model: mlp\nwidth: 16\nimage-size: 512\nbatch-size: 100000000\nindices: '0:100000000'\n",
    "huge-precode-k": "model: mlp\nwidth: 16\nimage-size: 8\ndefense: precode\nprecode-k: 100000000\nindices: '0:1'\n",
    "bad-defense": "model: mlp\nwidth: 16\nimage-size: 8\ndefense: [shield]\nindices: '0:1'\n",
    "bad-dataset-dir": "dataset: imagefolder\ndata-dir: /dev/zero\nindices: '0:1'\n",
    "fifo-tensors": "dataset: tensors\ndata-dir: /proc/self/mem\nindices: '0:1'\n",
}


@st.composite
def yaml_case(draw: Any) -> dict[str, Any]:
    if draw(st.integers(0, 3)) == 0:
        name = draw(st.sampled_from(sorted(YAML_FILES)))
        return {"mutation": "yaml", "ops": [{"op": "yaml-file", "name": name}]}
    key = draw(st.sampled_from(sorted(CONFIG) + ["defense", "precode-k", "noise-scale", "split", "mode", "epoch",
                                                 "max-memory", "data-dir", "dataset", "channels", "share-labels"]))
    mutation = draw(st.sampled_from(["wrong-type", "out-of-range", "huge", "nested", "drop"]))
    if mutation == "drop":
        return {"mutation": "drop", "ops": [{"op": "yaml-drop", "key": key}]}
    value = draw(st.sampled_from(CONFIG_VALUES[mutation]))
    return {"mutation": mutation, "ops": [{"op": "yaml-set", "key": key, "value": value}]}


def config_text(ops: list[dict[str, Any]]) -> bytes:
    lines = {key: json.dumps(value) for key, value in CONFIG.items()}
    for op in ops:
        if op["op"] == "yaml-file":
            text = YAML_FILES[op["name"]]
            return text.encode("utf-8", "surrogateescape")
        if op["op"] == "yaml-drop":
            lines.pop(op["key"], None)
        elif op["op"] == "yaml-set":
            lines[op["key"]] = op["value"]
    return "".join(f"{k}: {v}\n" for k, v in lines.items()).encode()


# ---------------------------------------------------------------------------- curated, per kind


def curated(kind: str, info: dict[str, Any]) -> list[dict[str, Any]]:
    """Hand-written inconsistencies between fields, and valid-but-huge specs, for each kind."""
    def case(name: str, *ops: dict[str, Any]) -> dict[str, Any]:
        return {"mutation": "inconsistent", "detail": name, "ops": list(ops)}

    def put(path: str, value: Any) -> dict[str, Any]:
        return {"op": "set", "path": [int(p) if p.isdigit() else p for p in path.split(".")], "value": value}

    def tensor(name: str, shape: list[int] | None = None, dtype: str | None = None,
               fill: str | None = None) -> dict[str, Any]:
        if fill is not None:
            return {"op": "values", "tensor": name, "fill": fill, "where": "all"}
        if dtype is not None:
            return {"op": "add-tensor", "tensor": name, "dtype": dtype, "shape": shape}
        return {"op": "reshape", "tensor": name, "shape": shape}

    spec_huge = [
        case("mlp width 200000 (valid, huge)", put("model.kwargs.width", 200_000)),
        case("input_shape [3,1024,1024] in model and data", put("model.input_shape", [3, 1024, 1024]),
             put("data.input_shape", [3, 1024, 1024])),
        case("num_classes 100000 in model and data", put("model.num_classes", 100_000),
             put("data.num_classes", 100_000), put("data.class_names", [])),
        case("resnet18 at 1024x1024 with 100000 classes", put("model.name", "resnet18"), put("model.kwargs", {}),
             put("model.input_shape", [3, 1024, 1024]), put("data.input_shape", [3, 1024, 1024]),
             put("model.num_classes", 100_000), put("data.num_classes", 100_000), put("data.class_names", [])),
        case("model.input_shape differs from data.input_shape", put("model.input_shape", [3, 16, 16])),
        case("mean has 1 entry for 3 channels", put("data.mean", [0.5])),
        case("std has 4 entries for 3 channels", put("data.std", [0.2, 0.2, 0.2, 0.2])),
        case("std of 0", put("data.std", [0.0, 0.2, 0.2])),
        case("num_classes of data differs from model", put("data.num_classes", 7)),
        case("class_names length differs from num_classes", put("data.class_names", ["a", "b"])),
        case("defense precode but no bottleneck tensors",
             put("defense", [{"name": "precode", "params": {"at": "classifier", "beta": 0.001, "k": 4}}])),
        case("defense listed twice", put("defense", [{"name": "noise", "params": {"distribution": "gaussian",
                                                                                  "scale": 0.1}}] * 2)),
        case("model name of another architecture", put("model.name", "cnn")),
        case("user builder named by a file", put("model.name", "os:system"), put("model.kwargs", {})),
        case("mlp given resnet18's norm option", put("model.kwargs", {"norm": "batch", "width": 16})),
    ]
    batch = [
        case("batch_size 2 for a batch of 1", put("data.batch_size", 2)),
        case("batch_size 4096 for a batch of 1", put("data.batch_size", 4096)),
        case("batch_size 0", put("data.batch_size", 0)),
    ]
    if kind == "gradients":
        return spec_huge + batch + [
            case("labels 10 with 10 classes", tensor("labels", fill="10")),
            case("labels -1", tensor("labels", fill="-1")),
            case("labels of 4096 for batch_size 4096 (valid, big batch)", put("data.batch_size", 4096),
                 tensor("labels", [4096])),
            case("labels_shared false but labels present", put("capture.labels_shared", False)),
            case("labels_shared true but labels missing", {"op": "drop-tensor", "tensor": "labels"}),
            case("includes_vb_kl true without a bottleneck", put("loss.includes_vb_kl", True)),
            case("untrained source with epoch 3", put("capture.source", "untrained"), put("capture.epoch", 3)),
            case("grad and param of a different width", tensor("grad.features.1.weight", [16, 191])),
            case("one grad.* missing", {"op": "drop-tensor", "tensor": "grad.classifier.bias"}),
            case("grad for a buffer that mlp does not have", tensor("buffer.features.1.running_mean", [16], "F32")),
            case("param and grad swapped shapes", tensor("param.classifier.weight", [16, 10])),
            *[case(f"valid, big: batch 4096 of [3,{side},{side}] images (a consistent dump of "
                   f"{2 * 16 * 3 * side * side * 4 // 10**6} MB)",
                   put("model.input_shape", [3, side, side]), put("data.input_shape", [3, side, side]),
                   put("data.image_size", side), put("data.batch_size", 4096), tensor("labels", [4096]),
                   tensor("param.features.1.weight", [16, 3 * side * side]),
                   tensor("grad.features.1.weight", [16, 3 * side * side])) for side in (64, 128)],
        ]
    if kind == "truth":
        return [c for c in spec_huge if "defense" not in c["detail"] and "model" not in c["detail"]
                and "builder" not in c["detail"]] + batch + [
            case("indices [0, 2] for batch_size 1", put("indices", [0, 2])),
            case("indices reversed", put("indices", [1, 0])),
            case("indices tensor 5 for metadata [0, 1]", tensor("indices", fill="5")),
            case("indices [2**53, 2**53+1]", put("indices", [2**53, 2**53 + 1])),
            case("labels 10 with 10 classes", tensor("labels", fill="10")),
            case("labels -1", tensor("labels", fill="-1")),
            case("images outside [0, 1]", tensor("images", fill="2")),
            case("dump.sha256 of no dump", put("dump.sha256", "0" * 64)),
            case("dump.sha256 not hex", put("dump.sha256", "Z" * 64)),
            case("dump.file with a path", put("dump.file", "../../etc/passwd")),
            case("images of another image size", tensor("images", [1, 3, 16, 16])),
            case("input_shape [3,1024,1024] and batch 4096 in data only", put("data.input_shape", [3, 1024, 1024]),
                 put("data.batch_size", 4096), put("indices", [0, 4096])),
            case("data.num_classes 100000 and labels 99999", put("data.num_classes", 100_000),
                 put("data.class_names", []), tensor("labels", fill="99999")),
            case("client_model untrained with epoch 3", put("client_model.source", "untrained"),
                 put("client_model.epoch", 3)),
        ]
    if kind == "reconstruction":
        return spec_huge + batch + [
            case("iterations_done 5 for a trace of 20", put("attack.iterations_done", 5)),
            case("iterations_done 10**6", put("attack.iterations_done", 10**6)),
            case("labels 10 with 10 classes", tensor("labels", fill="10")),
            case("images outside [0, 1]", tensor("images", fill="-5")),
            case("source.sha256 of the other dump (two reconstructions for one truth)",
                 put("source.sha256", info["sha_dump1"])),
            case("source.sha256 of no dump", put("source.sha256", "f" * 64)),
            case("images of another size than the truth's", tensor("images", [1, 3, 16, 16]),
                 put("model.input_shape", [3, 16, 16]), put("data.input_shape", [3, 16, 16])),
            case("images with 1 channel, metadata consistent", tensor("images", [1, 1, 8, 8]),
                 put("model.input_shape", [1, 8, 8]), put("data.input_shape", [1, 8, 8]),
                 put("data.mean", [0.5]), put("data.std", [0.25])),
            case("batch of 2 images, metadata consistent", tensor("images", [2, 3, 8, 8]), tensor("labels", [2]),
                 put("data.batch_size", 2)),
            case("completed false", put("attack.completed", False)),
            case("label_source unknown", put("attack.label_source", "guessed")),
        ]
    if kind == "model":
        return spec_huge + [
            case("epoch 5 beyond epochs 1", put("train.epoch", 5)),
            case("epochs 100001", put("train.epochs", 100_001), put("train.epoch", 1)),
            case("classifier of 9 classes for num_classes 10", tensor("classifier.weight", [9, 16]),
                 tensor("classifier.bias", [9])),
            case("test_accuracy 1.5", put("train.test_accuracy", 1.5)),
            case("buffer of an mlp that has none", tensor("features.1.running_mean", [16], "F32")),
            case("weights as I64", {"op": "retype", "tensor": "features.1.weight", "dtype": "I64"}),
            case("dp privacy with a nested value", put("train.privacy", {"epsilon": {"a": 1}})),
        ]
    if kind == "training-state":
        return spec_huge + [
            case("epoch 5 beyond options.epochs 1", put("train.epoch", 5)),
            case("history shorter than epoch", put("train.history", [])),
            case("history of 2 rows for epoch 1", {"op": "history", "rows": 2}),
            case("history epochs out of order", put("train.history.0.epoch", 3)),
            case("options.width differs from the command", put("train.options.width", 32)),
            case("options.epochs 10**6", put("train.options.epochs", 10**6)),
            case("options.batch_size 0", put("train.options.batch_size", 0)),
            case("options.subset 10**12", put("train.options.subset", 10**12)),
            case("options with 501 keys", put("train.options", {f"k{i}": 0 for i in range(501)})),
            case("device cuda on a CPU machine", put("train.device", "cuda")),
            case("optimizer state of the wrong shape", tensor("optimizer.0.exp_avg", [3])),
            case("optimizer state of a zero-size huge shape", tensor("optimizer.0.exp_avg", [0, 10**12])),
            case("optimizer step as a vector", tensor("optimizer.0.step", [5])),
            case("optimizer state for a parameter that does not exist", tensor("optimizer.99.exp_avg", [16], "F32")),
            case("optimizer state missing", {"op": "drop-tensor", "tensor": "optimizer.0.exp_avg"}),
            case("all optimizer state missing", *[{"op": "drop-tensor", "tensor": f"optimizer.{i}.{s}"}
                                                  for i in range(6) for s in ("step", "exp_avg", "exp_avg_sq")]),
            case("rng.shuffle of the wrong size", tensor("rng.shuffle", [100])),
            case("rng.torch of zeros", tensor("rng.torch", fill="0")),
            case("rng.noise empty", tensor("rng.noise", [0])),
            case("rng.cuda present on a CPU run", tensor("rng.cuda", [16], "U8")),
            case("model.* of another width", tensor("model.features.1.weight", [8, 192])),
        ]
    if kind == "attack-state":
        iterations = info["attack_state_iterations"]
        return [
            case("step beyond iterations", put("step", iterations + 1)),
            case("step beyond the trace length", put("step", iterations)),
            case("step 0", put("step", 0)),
            case("step 10**6 and iterations 10**6", put("step", 10**6), put("attack.params.iterations", 10**6)),
            case("iterations differ from the command", put("attack.params.iterations", iterations + 1)),
            case("seed differs from the command", put("seed", 1)),
            case("method differs from the command", put("attack.name", "ig-noise")),
            case("restarts 1000", put("attack.params.restarts", 1000)),
            case("sources names one dump twice", put("sources.1", {"file": DUMP, "sha256": info["sha_dump0"]})),
            case("sources of one dump for a group of two", {"op": "drop", "path": ["sources", 1]}),
            case("sources with an unknown dump", put("sources.0.sha256", "0" * 64)),
            case("sources with a path", put("sources.0.file", "../GRADS/" + DUMP)),
            case("1024 sources", put("sources", [{"file": f"x{i}.safetensors", "sha256": "0" * 64}
                                                for i in range(1024)])),
            case("inputs for 1 row of a group of 2", tensor("inputs", [1, 1, 3, 8, 8])),
            case("inputs of another image size", tensor("inputs", [2, 1, 3, 16, 16])),
            case("inputs with a batch of 2", tensor("inputs", [2, 2, 3, 8, 8])),
            case("inputs zero-size", tensor("inputs", [0, 1, 3, 8, 8])),
            case("inputs zero-size but huge", tensor("inputs", [0, 10**6, 10**6, 10**6, 10**6])),
            case("traces shorter than step", tensor("traces", [2, 3])),
            case("traces of one row", tensor("traces", [1, iterations])),
            case("traces zero-size but huge", tensor("traces", [0, 10**12])),
            case("traces of 10**6 iterations", tensor("traces", [2, 10**6])),
            case("adam step as a vector", tensor("adam.0.step", [7])),
            case("adam moments of the wrong shape", tensor("adam.0.exp_avg", [3])),
            case("adam state for variable 5", tensor("adam.5.exp_avg", [2, 1, 3, 8, 8], "F32")),
            case("adam state missing", {"op": "drop-tensor", "tensor": "adam.0.exp_avg_sq"}),
            case("noise.* without ig-noise", tensor("noise.classifier", [2, 1, 4], "F32")),
            case("rng of zeros", tensor("rng", fill="0")),
            case("rng.replay entry of the wrong size", tensor("rng.replay.0", [7], "U8")),
        ]
    return []


# ------------------------------------------------------------------------------ drawing the cases


def draw_cases(kind: str, base: dict[str, Any], n: int, seed: int) -> list[dict[str, Any]]:
    """`n` distinct cases for `kind`, drawn by Hypothesis from the kind's strategy (reproducible by seed)."""
    if n <= 0:
        return []
    strategy = case_strategy(kind, base)
    drawn: list[dict[str, Any]] = []
    seen: set[str] = set()

    @hypothesis_seed(seed * 1000 + KINDS.index(kind))
    @settings(max_examples=n * 6, phases=[Phase.generate], database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(case: dict[str, Any]) -> None:
        key = json.dumps(case, sort_keys=True)
        if len(drawn) < n and key not in seen:
            seen.add(key)
            drawn.append(case)

    collect()
    return drawn


# ----------------------------------------------------------------------------------- applying ops


def navigate(doc: dict[str, Any], path: list[Any]) -> tuple[Any, Any]:
    node = doc
    for part in path[:-1]:
        node = node[part]
    return node, path[-1]


def mutate_file(base: Path, ops: list[dict[str, Any]]) -> bytes:
    raw, tensors = load_raw(base)
    meta: dict[str, Any] = {k: json.loads(v) for k, v in raw.items() if k not in ("format", "format_version")}
    plain = {k: raw[k] for k in ("format", "format_version") if k in raw}
    header_edits: dict[str, dict[str, Any]] = {}
    container = None
    for op in ops:
        kind = op["op"]
        if kind == "set":
            parent, key = navigate(meta, op["path"]) if len(op["path"]) > 1 else (meta, op["path"][0])
            parent[key] = copy.deepcopy(op["value"])
        elif kind == "drop":
            parent, key = navigate(meta, op["path"]) if len(op["path"]) > 1 else (meta, op["path"][0])
            del parent[key]
        elif kind == "extra":
            node = meta
            for part in op["path"]:
                node = node[part]
            node[op["key"]] = copy.deepcopy(op["value"])
        elif kind == "raw-meta":
            plain[op["key"]] = op["text"]
        elif kind == "drop-meta":
            plain.pop(op["key"], None)
        elif kind == "history":
            rows = meta["train"]["history"]
            meta["train"]["history"] = [dict(rows[0], epoch=i + 1) for i in range(op["rows"])]
        elif kind == "retype":
            tensors[op["tensor"]] = from_array(as_array(tensors[op["tensor"]]), op["dtype"])
        elif kind == "reshape":
            tensors[op["tensor"]] = fitted(tensors[op["tensor"]], op["shape"])
        elif kind == "add-tensor":
            like = {"dtype": op["dtype"], "shape": [1], "data": b"\x01" + b"\x00" * (ITEMSIZE[op["dtype"]] - 1)}
            tensors[op["tensor"]] = fitted(like, op["shape"])
        elif kind == "drop-tensor":
            tensors.pop(op["tensor"], None)
        elif kind == "header":
            header_edits[op["tensor"]] = op["edit"]
        elif kind == "values":
            t = tensors[op["tensor"]]
            array = as_array(t).copy()
            value = float(op["fill"]) if t["dtype"] in ("F32", "F16", "F64", "BF16") else int(op["fill"])
            flat = array.reshape(-1)
            if flat.size:
                with np.errstate(all="ignore"):
                    if op["where"] == "all":
                        flat[:] = np.array(value).astype(flat.dtype)
                    else:
                        flat[0] = np.array(value).astype(flat.dtype)
            tensors[op["tensor"]] = from_array(array, t["dtype"])
        elif kind == "container":
            container = op
        else:
            raise ValueError(op)
    metadata = dict(plain)
    metadata.update({key: encode(value) for key, value in meta.items()})
    if container is None:
        return save_raw(metadata, tensors, header_edits)
    blob = save_raw(metadata, tensors)
    n = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8 : 8 + n])
    name = container["tensor"]
    begin, end = header[name]["data_offsets"]
    edit = container["edit"]
    if edit == "truncate":
        return blob[: 8 + n + max(begin, end - 1)]
    if edit == "length":
        return struct.pack("<Q", n + 8) + blob[8:]
    if edit == "offsets-outside":
        header[name]["data_offsets"] = [begin, len(blob) * 2 + end]
    elif edit == "offsets-overlap":
        header[name]["data_offsets"] = [0, end - begin]
    elif edit == "offsets-reversed":
        header[name]["data_offsets"] = [end, begin]
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + blob[8 + n :]


# ------------------------------------------------------------------------------------ running cases


def tree_digest(root: Path, skip: Path | None = None) -> dict[str, str]:
    """{relative path: sha256} of the regular files under root (hidden names, e.g. .precode.lock, left out)."""
    found = {}
    if root.is_file():
        return {root.name: hashlib.sha256(root.read_bytes()).hexdigest()}
    for path in sorted(root.rglob("*")):
        if skip is not None and (path == skip or skip in path.parents):
            continue
        if path.name.startswith(".") or not path.is_file() or path.is_symlink():
            continue
        found[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def prepare(kind: str, case_dir: Path, work: Path, info: dict[str, Any]) -> tuple[list[str], Path, Path]:
    """Copy the kind's folder into case_dir; (command arguments, file to mutate, output folder)."""
    if kind == "gradients":
        (case_dir / "GRADS").mkdir(parents=True)
        shutil.copy2(work / "GRADS" / DUMP, case_dir / "GRADS" / DUMP)
        target, out = case_dir / "GRADS" / DUMP, case_dir / "OUT"
        return ["attack", str(target), "--iterations", "2", "--out", str(out)], target, out
    if kind == "truth":
        shutil.copytree(work / "GRADS", case_dir / "GRADS")
        out = case_dir / "OUT"
        return (["evaluate", str(work / "RECON"), "--truth", str(case_dir / "GRADS"), "--out", str(out)],
                case_dir / "GRADS" / TRUTH, out)
    if kind == "reconstruction":
        shutil.copytree(work / "RECON", case_dir / "RECON")
        out = case_dir / "OUT"
        return (["evaluate", str(case_dir / "RECON"), "--truth", str(work / "GRADS"), "--out", str(out)],
                case_dir / "RECON" / DUMP, out)
    if kind == "model":
        shutil.copytree(work / "RUN", case_dir / "RUN")
        target, out = case_dir / "RUN" / "model.safetensors", case_dir / "OUT"
        return ["capture-gradients", str(target), "--indices", "0:1", "--out", str(out)], target, out
    if kind == "training-state":
        shutil.copytree(work / "RUN", case_dir / "RUN")
        out = case_dir / "RUN"
        return (["train", *TRAIN, "--epochs", "2", "--resume", "--out", str(out)],
                out / "checkpoints" / "resume.safetensors", out)
    if kind == "attack-state":
        shutil.copytree(work / "RECON2", case_dir / "RECON2")
        out = case_dir / "RECON2"
        return (["attack", str(work / "GRADS"), "--iterations", str(info["attack_state_iterations"]), *ATTACK_STATE,
                 "--resume", "--out", str(out)], out / "checkpoints" / DUMP, out)
    if kind == "config":
        case_dir.mkdir(parents=True)
        target, out = case_dir / "config.yaml", case_dir / "OUT"
        return ["capture-gradients", "--config", str(target), "--out", str(out)], target, out
    raise ValueError(kind)


def classify(result: dict[str, Any], changed: list[str], refused_changed_out: bool) -> tuple[str, list[str]]:
    """("refused" | "accepted" | "failed", problems)."""
    problems = []
    output = result["stdout"] + result["stderr"]
    lines = [line for line in result["stderr"].splitlines() if line.strip()]
    if result["killed"]:
        problems.append(f"killed after the time limit ({result['seconds']:.1f} s)")
    if "Traceback" in output:
        problems.append("traceback in the output")
    if "Internal error" in output:
        problems.append("'Internal error' in the output")
    if result["seconds"] >= MAX_SECONDS:
        problems.append(f"took {result['seconds']:.1f} s (limit {MAX_SECONDS:.0f} s)")
    if result["peak_rss"] >= MAX_RSS:
        problems.append(f"peak RSS {result['peak_rss'] / 1e6:.0f} MB (limit {MAX_RSS / 1e6:.0f} MB)")
    if changed:
        problems.append(f"changed files outside its output: {', '.join(changed[:5])}")
    if result["rc"] == 2:
        if len(lines) != 1:
            problems.append(f"{len(lines)} non-empty lines on stderr, not 1")
        elif not lines[0].startswith("Error:"):
            problems.append("stderr does not start with 'Error:'")
        if refused_changed_out:
            problems.append("refused, but changed the folder it was resuming")
        return ("failed" if problems else "refused"), problems
    if result["rc"] == 0:
        return ("failed" if problems else "accepted"), problems
    problems.insert(0, f"exit code {result['rc']}")
    return "failed", problems


MAX_MEMORY_GIB = [0.5]  # --max-memory of every case's command (set from the option in main)


def run_case(number: int, case: dict[str, Any], work: Path, scratch: Path, info: dict[str, Any],
             env: dict[str, str], kill_after: float, keep: Path | None) -> dict[str, Any]:
    kind = case["kind"]
    case_dir = scratch / f"case-{number:04d}-{kind}"
    shutil.rmtree(case_dir, ignore_errors=True)
    args, target, out = prepare(kind, case_dir, work, info)
    if kind == "config":
        target.write_bytes(config_text(case["ops"]))
    else:
        target.write_bytes(mutate_file(work / BASE_FILE[kind], case["ops"]))
    resumes = out != case_dir / "OUT"
    before = tree_digest(case_dir, skip=None if resumes else out)
    cmd = precode_command() + args + ["--max-memory", str(MAX_MEMORY_GIB[0])]
    result = measure(cmd, case_dir, env, kill_after)
    after = tree_digest(case_dir, skip=None if resumes else out)
    changed = [] if resumes else sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    refused_changed_out = resumes and result["rc"] == 2 and before != after
    if (case_dir / "PWNED").exists() or Path("PWNED").exists():
        changed.append("PWNED (a config's python tag ran)")
    outcome, problems = classify(result, changed, refused_changed_out)
    record = {"number": number, "kind": kind, "mutation": case["mutation"], "what": what(case),
              "outcome": outcome, "problems": problems, "rc": result["rc"], "seconds": result["seconds"],
              "peak_mb": round(result["peak_rss"] / 1e6, 1),
              "command": " ".join(["precode", *args, "--max-memory", str(MAX_MEMORY_GIB[0])]),
              "stderr": result["stderr"][-3000:]}
    if outcome != "refused":  # the details a reader needs to judge it; a refused case is rebuilt by --only N
        record.update({"stdout_tail": result["stdout"][-1500:], "ops": case["ops"]})
    if outcome == "failed" and "Internal error" in result["stdout"] + result["stderr"]:
        debug = measure(precode_command() + ["--debug", *args], case_dir, env, kill_after)
        record["debug_traceback"] = debug["stderr"][-4000:]
    if outcome == "failed" and keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        shutil.copy2(target, keep / f"case-{number:04d}-{kind}-{target.name}")
    shutil.rmtree(case_dir, ignore_errors=True)
    return record


def what(case: dict[str, Any]) -> str:
    """One line saying what the case changed."""
    if case.get("detail"):
        return case["detail"]
    parts = []
    for op in case["ops"]:
        kind = op["op"]
        if kind == "set":
            parts.append(f"{'.'.join(map(str, op['path']))} = {describe(op['value'])}")
        elif kind == "drop":
            parts.append(f"drop {'.'.join(map(str, op['path']))}")
        elif kind == "extra":
            parts.append(f"add {'.'.join(map(str, op['path'] + [op['key']]))} = {describe(op['value'])}")
        elif kind == "raw-meta":
            parts.append(f"{op['key']} = {describe({'$': 'raw', 'text': repr(op['text'])})}")
        elif kind == "drop-meta":
            parts.append(f"drop {op['key']}")
        elif kind == "retype":
            parts.append(f"tensor {op['tensor']} as {op['dtype']}")
        elif kind == "reshape":
            parts.append(f"tensor {op['tensor']} of shape {op['shape']}")
        elif kind == "add-tensor":
            parts.append(f"add tensor {op['tensor'][:40]!r} {op['dtype']} {op['shape']}")
        elif kind == "drop-tensor":
            parts.append(f"drop tensor {op['tensor']}")
        elif kind == "header":
            parts.append(f"header of {op['tensor']}: {op['edit']}")
        elif kind == "values":
            parts.append(f"tensor {op['tensor']} {op['where']} = {op['fill']}")
        elif kind == "container":
            parts.append(f"{op['edit']} at {op['tensor']}")
        elif kind == "yaml-file":
            parts.append(f"config file {op['name']}")
        elif kind == "yaml-set":
            value = op["value"] if len(op["value"]) < 40 else op["value"][:30] + f"... ({len(op['value'])} chars)"
            parts.append(f"config {op['key']}: {value}")
        elif kind == "yaml-drop":
            parts.append(f"config without {op['key']}")
        else:
            parts.append(kind)
    return "; ".join(parts)


def applicable(kind: str, cases: list[dict[str, Any]], work: Path) -> list[dict[str, Any]]:
    """The curated cases that fit this kind's real file (a path or tensor it lacks drops the case)."""
    if kind == "config":
        return cases
    fits = []
    for case in cases:
        try:
            mutate_file(work / BASE_FILE[kind], case["ops"])
        except (KeyError, IndexError, TypeError):
            continue
        fits.append(case)
    return fits


# ------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases-per-kind", type=int, default=40, help="cases drawn by Hypothesis per kind")
    parser.add_argument("--no-curated", action="store_true", help="leave out the hand-written cases")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, of {', '.join(KINDS)}")
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "hostile_files.json")
    parser.add_argument("--work", type=Path, default=None, help="set-up folder to make or reuse (default: temporary)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each child")
    parser.add_argument("--kill-after", type=float, default=60.0)
    parser.add_argument("--max-memory", type=float, default=0.5,
                        help="GiB passed to every command as --max-memory: the budget the 1.5 GB peak is checked "
                             "against (the process itself takes about 0.65 GB before any work)")
    parser.add_argument("--only", type=int, action="append", default=None, help="run only this case number")
    parser.add_argument("--keep", type=Path, default=None, help="save the files of failed cases here")
    parser.add_argument("--list", action="store_true", help="print the cases and stop")
    args = parser.parse_args()
    MAX_MEMORY_GIB[0] = args.max_memory
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        parser.error(f"unknown kinds {unknown}; choose from {KINDS}")

    env = child_env(args.threads)
    temporary = None
    if args.work is None:
        temporary = tempfile.TemporaryDirectory(prefix="hostile-files-")
        work = Path(temporary.name)
    else:
        work = args.work.resolve()
    started = time.perf_counter()
    info = setup(work, env)
    from precode_cli import fileformat

    info = dict(info, sha_dump0=fileformat.sha256_of(work / "GRADS" / DUMP),
                sha_dump1=fileformat.sha256_of(work / "GRADS" / "train-000001.safetensors"))

    cases: list[dict[str, Any]] = []
    for kind in KINDS:  # every kind is drawn, so that case numbers do not depend on --kinds
        base = describe_base(work / BASE_FILE[kind]) if kind != "config" else {}
        chosen = ([] if args.no_curated else applicable(kind, curated(kind, info), work))
        chosen += draw_cases(kind, base, args.cases_per_kind, args.seed)
        cases += [dict(c, kind=kind) for c in chosen]
    numbered = [(i, c) for i, c in enumerate(cases) if c["kind"] in kinds and (args.only is None or i in args.only)]
    if args.list:
        for i, c in numbered:
            print(f"{i:4d} {c['kind']:<15} {c['mutation']:<14} {what(c)[:120]}")
        return
    print(f"{len(numbered)} cases over {', '.join(kinds)} ({args.workers} at a time) ...", flush=True)

    shared = {name: tree_digest(work / name) for name in ("RUN", "GRADS", "RECON", "RECON2", "config.yaml")}
    scratch = work / "cases"
    scratch.mkdir(exist_ok=True)
    records: list[dict[str, Any]] = []
    lock = threading.Lock()

    def one(item: tuple[int, dict[str, Any]]) -> dict[str, Any]:
        number, case = item
        try:
            record = run_case(number, case, work, scratch, info, env, args.kill_after, args.keep)
        except Exception as err:  # noqa: BLE001 - a bug of this script: report it as such
            record = {"number": number, "kind": case["kind"], "mutation": case["mutation"], "what": what(case),
                      "outcome": "harness error", "problems": [f"{type(err).__name__}: {err}"], "rc": None,
                      "seconds": 0.0, "peak_mb": 0.0, "command": "", "stderr": "", "stdout_tail": "", "ops": []}
        with lock:
            records.append(record)
            mark = {"refused": ".", "accepted": "a"}.get(record["outcome"], "F")
            print(f"[{len(records):4d}/{len(numbered)}] {mark} #{number} {record['kind']} {record['mutation']}: "
                  f"rc={record['rc']} {record['seconds']:.1f}s {record['peak_mb']:.0f}MB {record['what'][:90]}",
                  flush=True)
        return record

    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        list(pool.map(one, numbered))
    records.sort(key=lambda r: r["number"])
    shared_after = {name: tree_digest(work / name) for name in shared}
    shared_changed = [name for name in shared if shared[name] != shared_after[name]]
    seconds = time.perf_counter() - started

    # ---- report
    print()
    print(f"{'kind':<16}{'cases':>6}{'passed':>8}{'accepted':>10}{'failed':>8}{'slowest s':>11}{'largest MB':>12}")
    by_kind = {}
    for kind in kinds:
        mine = [r for r in records if r["kind"] == kind]
        if not mine:
            continue
        row = {"cases": len(mine), "passed": sum(r["outcome"] == "refused" for r in mine),
               "accepted": sum(r["outcome"] == "accepted" for r in mine),
               "failed": sum(r["outcome"] not in ("refused", "accepted") for r in mine),
               "slowest_s": max(r["seconds"] for r in mine), "largest_mb": max(r["peak_mb"] for r in mine)}
        by_kind[kind] = row
        print(f"{kind:<16}{row['cases']:>6}{row['passed']:>8}{row['accepted']:>10}{row['failed']:>8}"
              f"{row['slowest_s']:>11.1f}{row['largest_mb']:>12.0f}")
    failures = [r for r in records if r["outcome"] not in ("refused", "accepted")]
    accepted = [r for r in records if r["outcome"] == "accepted"]
    total = {"cases": len(records), "passed": sum(r["outcome"] == "refused" for r in records),
             "accepted": len(accepted), "failed": len(failures)}
    print(f"{'all':<16}{total['cases']:>6}{total['passed']:>8}{total['accepted']:>10}{total['failed']:>8}")
    slowest = max(records, key=lambda r: r["seconds"], default=None)
    largest = max(records, key=lambda r: r["peak_mb"], default=None)
    print(f"\n{len(records)} cases in {seconds:.0f} s.")
    if slowest:
        print(f"Slowest: #{slowest['number']} {slowest['kind']} {slowest['mutation']} ({slowest['what'][:80]}): "
              f"{slowest['seconds']:.1f} s")
        print(f"Largest: #{largest['number']} {largest['kind']} {largest['mutation']} ({largest['what'][:80]}): "
              f"{largest['peak_mb']:.0f} MB peak RSS")
    if shared_changed:
        print(f"FAILED: the shared input folders changed during the run: {', '.join(shared_changed)}")
    if accepted:
        print(f"\nAccepted (exit 0; a valid file, or a hostile one that got through - review): {len(accepted)}")
        for r in accepted:
            print(f"  #{r['number']} {r['kind']} {r['mutation']}: {r['what'][:140]}")
    if failures:
        print(f"\nFailures: {len(failures)}")
        for r in failures:
            print(f"  #{r['number']} {r['kind']} {r['mutation']}: {r['what'][:140]}")
            print(f"      problems: {'; '.join(r['problems'])}")
            print(f"      command:  {r['command'][:300]}")
            for line in (r["stderr"].strip().splitlines() or ["(no stderr)"])[:4]:
                print(f"      | {line[:300]}")
            if r.get("debug_traceback"):
                tail = [l for l in r["debug_traceback"].strip().splitlines() if l.strip()][-4:]
                for line in tail:
                    print(f"      debug| {line[:300]}")

    import torch

    document = {
        "command": " ".join(sys.argv), "seed": args.seed, "cases_per_kind": args.cases_per_kind,
        "seconds": round(seconds, 1), "limits": {"max_rss_bytes": MAX_RSS, "max_seconds": MAX_SECONDS,
                                                 "kill_after": args.kill_after, "child_threads": args.threads,
                                                 "max_memory_gib": args.max_memory},
        "totals": total, "by_kind": by_kind, "shared_inputs_changed": shared_changed,
        "slowest": slowest and {k: slowest[k] for k in ("number", "kind", "mutation", "what", "seconds")},
        "largest": largest and {k: largest[k] for k in ("number", "kind", "mutation", "what", "peak_mb")},
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "machine": platform.machine(), "cpus": os.cpu_count()},
        "cases": records,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(document, indent=1, default=str) + "\n")
    print(f"Wrote {args.json}.")
    if temporary is not None:
        temporary.cleanup()
    sys.exit(1 if failures or shared_changed else 0)


if __name__ == "__main__":
    main()
