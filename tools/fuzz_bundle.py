"""Fuzz `verify_bundle` with mutated bundles: every case must end in success or a clear
EdgedistillError, within 5 s and 300 MB, writing nothing outside its extraction folder and, when
it fails, leaving that folder as it was.

    .venv/bin/python tools/fuzz_bundle.py                                   # 2000 cases, seed 0, JSON to stdout
    .venv/bin/python tools/fuzz_bundle.py --cases 150 --seed 1 --out /tmp/fuzz_bundle.json
    .venv/bin/python tools/fuzz_bundle.py --replay 1234 --seed 0            # one case, here, with its traceback

The start is a valid bundle that `make_bundle` writes from a small synthetic run (a GGUF, an ONNX
folder, tokenizer files), re-packed with fixed times so that (seed, case index) rebuilds a case
exactly. Each case applies one mutation:
- to the compressed file: flipped bits, an overwritten range, a cut, appended garbage;
- to the tar (then re-compressed): a header's size, name ('../x', an absolute path into the case's
  folder, another top folder), type (links, devices, sparse, unknown), mode or checksum; random
  header bytes; pax headers (a huge size, a huge declared file, a chain of 1500, a bad sparse map,
  a bad record); GNU long names; dropped, doubled, reordered, unlisted or changed members; no end
  of archive; a compression bomb with an honest manifest;
- to manifest.json: not JSON, a list or a scalar, missing or mistyped keys, bad entries (sizes,
  hashes, paths), extra or renamed files, deep nesting, a 5000-digit number, 17 MiB of padding.
The worker runs `verify_bundle(case, extract_to=<case folder>/out)` and then checks that folder:
a failed case must leave it empty or absent, a passing one must leave only the bundle's folder;
otherwise the outcome is failed_check (error_type leftover_files). The worker's address space is
capped at 2 GiB, so a runaway allocation is a MemoryError (a raw_traceback), not a swapping
machine. Outcomes, limits, the outside-write check (any new file outside <case folder>/out) and
the JSON are tools/fuzz_harness.py's.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import resource
import sys
import tarfile
from pathlib import Path

from edgedistill.bundle import make_bundle, verify_bundle

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fuzz_harness import Case, classify  # noqa: E402
from fuzz_harness import main as harness_main  # noqa: E402

# a runaway allocation in the worker fails as MemoryError (a raw_traceback) instead of swapping the machine
WORKER_ADDRESS_SPACE_BYTES = 2 << 30
BLOCK = tarfile.BLOCKSIZE


# ---- the valid bundle every case starts from

def _synthetic_run(root: Path) -> Path:
    run = root / "run"
    export, onnx, distill = run / "export", run / "export_onnx" / "student-int4", run / "distill"
    for folder in (export, onnx, distill):
        folder.mkdir(parents=True)
    noise = random.Random(0)
    (export / "student-q4_k_m.gguf").write_bytes(b"GGUF" + noise.randbytes(3000))
    (export / "manifest.json").write_text(json.dumps({"config": {"name": "fuzz"}, "result": {"Q4_K_M": {
        "file": "student-q4_k_m.gguf", "verification": {"passed": True}}}}))
    (onnx / "model.onnx").write_bytes(noise.randbytes(500))
    (onnx / "onnx_export.json").write_text('{"format": "onnx"}')
    (distill / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": {"a": 0, "b": 1}}}))
    (distill / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}", "eos_token": "</s>"}))
    return run


def pack(top: str, files: dict[str, bytes]) -> bytes:
    """An uncompressed tar of `files` under `top/` in make_bundle's layout, with fixed times."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path, data in files.items():
            info = tarfile.TarInfo(f"{top}/{path}")
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def compress(tar: bytes) -> bytes:
    return gzip.compress(tar, compresslevel=6, mtime=0)


class Base:
    """The valid bundle: its files (manifest.json last), the tar, its members' offsets, the .tar.gz."""

    def __init__(self, scratch: Path):
        made = make_bundle(_synthetic_run(scratch / "base"), scratch / "base" / "fuzz-student.tar.gz")
        with tarfile.open(made["file"]) as tar:
            self.top = made["name"]
            self.files = {member.name.partition("/")[2]: tar.extractfile(member).read()
                          for member in tar.getmembers() if member.isfile()}
        self.manifest = json.loads(self.files.pop("manifest.json"))
        self.manifest["created"] = "2000-01-01T00:00:00+0000"
        self.tar = self.pack()
        self.gz = compress(self.tar)
        with tarfile.open(fileobj=io.BytesIO(self.tar)) as tar:
            self.members = [(member.offset, member.offset_data, member.size) for member in tar.getmembers()]
        self.end = self.members[-1][1] + _blocks(self.members[-1][2])
        assert verify_bundle(self._check_file(scratch))["files"] == len(self.files)

    def pack(self, manifest: bytes | None = None, files: dict[str, bytes] | None = None) -> bytes:
        manifest = json.dumps(self.manifest, indent=2).encode() if manifest is None else manifest
        return pack(self.top, {**(self.files if files is None else files), "manifest.json": manifest})

    def _check_file(self, scratch: Path) -> Path:
        path = scratch / "base" / "repacked.tar.gz"
        path.write_bytes(self.gz)
        return path


def _blocks(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


# ---- tar header surgery

def _checksum(header: bytearray) -> None:
    header[148:156] = b" " * 8
    header[148:155] = b"%06o\0" % sum(header)


def _number(value: int, width: int) -> bytes:
    """A tar number field: octal when it fits, else GNU base-256 (negative too)."""
    if 0 <= value < 8 ** (width - 1):
        return b"%0*o\0" % (width - 1, value)
    return (b"\x80" if value >= 0 else b"\xff") + (value % 256 ** (width - 1)).to_bytes(width - 1, "big")


def _header(name: str, type_: bytes, size: int, linkname: str = "") -> bytes:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname = type_, size, linkname
    return info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")


def _member(name: str, data: bytes, type_: bytes = tarfile.REGTYPE) -> bytes:
    return _header(name, type_, len(data)) + data + bytes(_blocks(len(data)) - len(data))


def _pax(records: dict[str, str] | bytes, declared: int | None = None) -> bytes:
    if isinstance(records, dict):
        data = b""
        for key, value in records.items():
            body = f" {key}={value}\n".encode("utf-8", "surrogateescape")
            length = len(body) + 1
            while len(body) + len(str(length)) != length:  # the length counts its own digits
                length = len(body) + len(str(length))
            data += str(length).encode() + body
    else:
        data = records
    header = bytearray(_header("././@PaxHeader", tarfile.XHDTYPE, len(data)))
    if declared is not None:
        header[124:136] = _number(declared, 12)
        _checksum(header)
    return bytes(header) + data + bytes(_blocks(len(data)) - len(data))


def _edit_header(base: Base, rng: random.Random, edit, fix_checksum: bool = True) -> bytes:
    tar = bytearray(base.tar)
    offset = rng.choice(base.members)[0]
    header = tar[offset: offset + BLOCK]
    edit(header)
    if fix_checksum:
        _checksum(header)
    tar[offset: offset + BLOCK] = header
    return bytes(tar)


def _set(start: int, end: int, value: bytes):
    def edit(header: bytearray) -> None:
        header[start:end] = value.ljust(end - start, b"\0")[: end - start]
    return edit


def _first_member(base: Base) -> tuple[int, int]:
    offset, data, size = base.members[0]
    return offset, data + _blocks(size)


# ---- the mutations: each takes (base, rng, case_dir) and returns the case's .tar.gz bytes; case_dir
# gives absolute paths that would land outside the extraction folder

def gz_flip_bits(base, rng, case_dir):
    data = bytearray(base.gz)
    for _ in range(rng.randint(1, 8)):
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    return bytes(data)


def gz_overwrite(base, rng, case_dir):
    data = bytearray(base.gz)
    start = rng.randrange(len(data))
    length = rng.randint(1, 64)
    data[start: start + length] = rng.randbytes(len(data[start: start + length]))
    return bytes(data)


def gz_truncate(base, rng, case_dir):
    return base.gz[: rng.randrange(len(base.gz))]


def gz_append(base, rng, case_dir):
    return base.gz + rng.choice([rng.randbytes(rng.randint(1, 100)), compress(rng.randbytes(600)),
                                 compress(base.tar), bytes(rng.randint(1, 50))])


def tar_size(base, rng, case_dir):
    size = rng.choice([0, 1, 511, 513, 4096, rng.randrange(10**6), 8**11 - 1, 100 * 2**30, 2**80, -1, -(2**40)])
    return compress(_edit_header(base, rng, lambda header: header.__setitem__(slice(124, 136), _number(size, 12))))


def tar_name(base, rng, case_dir):
    name = rng.choice(["../x", f"{base.top}/../../escaped", str(case_dir / "escaped"), "/etc/evil", "other/x",
                       base.top, f"{base.top}/", "", f"{base.top}/a\x01b", f"{base.top}//x", f"{base.top}/./x",
                       f"{base.top}/" + "n" * 90, "C:/x", f"{base.top}\\x", f"{base.top}/\xff".encode("latin-1")])
    value = name if isinstance(name, bytes) else name.encode()
    return compress(_edit_header(base, rng, _set(0, 100, value)))


def tar_type(base, rng, case_dir):
    type_ = rng.choice([b"1", b"2", b"3", b"4", b"5", b"6", b"7", b"S", b"x", b"g", b"L", b"K", b"V", b"M", b"N",
                        b"Z", b"\0", bytes([rng.randrange(256)])])
    link = rng.choice([b"", b"/etc/passwd", b"../../escaped", b"fuzz-student/README.md"])

    def edit(header: bytearray) -> None:
        header[156:157] = type_
        header[157:257] = link.ljust(100, b"\0")
    return compress(_edit_header(base, rng, edit))


def tar_mode_and_more(base, rng, case_dir):
    field = rng.choice([(100, 108), (108, 116), (116, 124), (136, 148), (257, 265), (329, 337), (345, 500)])
    value = rng.choice([b"7777777", b"4755", b"zzz", rng.randbytes(field[1] - field[0]), b""])
    return compress(_edit_header(base, rng, _set(*field, value)))


def tar_checksum(base, rng, case_dir):
    value = rng.choice([b"0000000", b"9999999", b"       ", rng.randbytes(8)])
    return compress(_edit_header(base, rng, _set(148, 156, value), fix_checksum=False))


def tar_random_header_bytes(base, rng, case_dir):
    def edit(header: bytearray) -> None:
        for _ in range(rng.randint(1, 6)):
            header[rng.randrange(BLOCK)] = rng.randrange(256)
    return compress(_edit_header(base, rng, edit, fix_checksum=rng.random() < 0.8))


def tar_random_bytes(base, rng, case_dir):
    tar = bytearray(base.tar)
    for _ in range(rng.randint(1, 6)):
        tar[rng.randrange(len(tar))] = rng.randrange(256)
    return compress(bytes(tar))


def tar_pax(base, rng, case_dir):
    offset = rng.choice(base.members)[0]
    choice = rng.randrange(8)
    if choice == 0:  # the pax header's own size: 100 GiB, data: a few bytes
        pax = _pax({"path": "x"}, declared=100 * 2**30)
    elif choice == 1:
        pax = _pax({"size": str(rng.choice([100 * 2**30, -5, 2**70]))})
    elif choice == 2:
        pax = _pax({"size": "12x"})
    elif choice == 3:
        pax = _pax({"GNU.sparse.major": "0", "GNU.sparse.minor": "1", "GNU.sparse.map": "1,x,3",
                    "GNU.sparse.size": "99"})
    elif choice == 4:
        pax = _pax({"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "a",
                    "GNU.sparse.realsize": "10**9"})
    elif choice == 5:
        pax = _pax(rng.choice([b"99999 path=x\n", b"5 x\n", b"abc", rng.randbytes(40), b"0 =\n"]))
    elif choice == 6:
        pax = _pax({"path": rng.choice(["../pax-escaped", str(case_dir / "pax-escaped"), "fuzz-student/\udcff",
                                        "fuzz-student/" + "p" * 300, "other/x"])})
    else:
        pax = _pax({"hdrcharset": "BINARY", "path": "fuzz-student/\udcfe\udcff"})
    return compress(base.tar[:offset] + pax + base.tar[offset:])


def tar_header_chains(base, rng, case_dir):
    offset = rng.choice(base.members)[0]
    if rng.random() < 0.5:
        chain = _pax({"comment": "x"}) * 1500
    else:
        chain = _member("././@LongLink", b"fuzz-student/long\0", tarfile.GNUTYPE_LONGNAME) * 1500
    return compress(base.tar[:offset] + chain + base.tar[offset:])


def tar_members(base, rng, case_dir):
    start, end = _first_member(base)
    first = base.tar[start:end]
    choice = rng.randrange(8)
    if choice == 0:  # dropped
        tar = base.tar[:start] + base.tar[end:]
    elif choice == 1:  # doubled
        tar = base.tar[:end] + first + base.tar[end:]
    elif choice == 2:  # moved after the manifest
        tar = base.tar[end: base.end] + first + base.tar[base.end:]
    elif choice == 3:  # unlisted
        tar = base.tar[: base.end] + _member(f"{base.top}/extra.bin", b"extra") + base.tar[base.end:]
    elif choice == 4:  # folders, listed or not
        tar = _member(f"{base.top}/", b"", tarfile.DIRTYPE) + _member(f"{base.top}/student-int4", b"",
                                                                         tarfile.DIRTYPE) + base.tar
    elif choice == 5:  # no end of archive
        tar = base.tar[: base.end]
    elif choice == 6:  # a changed byte of data
        offset, data, size = rng.choice(base.members)
        tar = bytearray(base.tar)
        tar[data + rng.randrange(max(size, 1))] ^= 0x55
        tar = bytes(tar)
    else:  # garbage after the end
        tar = base.tar + rng.randbytes(rng.randint(1, 2000))
    return compress(tar)


def tar_bomb(base, rng, case_dir):
    size = 32 << 20
    manifest = json.loads(json.dumps(base.manifest))
    manifest["files"]["zeros.bin"] = {"bytes": size, "sha256": _zeros_sha256(size)}
    return _bomb_gz(base, json.dumps(manifest).encode(), size)


_BOMBS: dict[bytes, bytes] = {}


def _zeros_sha256(size: int) -> str:
    return hashlib.sha256(bytes(size)).hexdigest()


def _bomb_gz(base: Base, manifest: bytes, size: int) -> bytes:
    if manifest not in _BOMBS:
        _BOMBS[manifest] = compress(base.pack(manifest, {**base.files, "zeros.bin": bytes(size)}))
    return _BOMBS[manifest]


def _with_manifest(base: Base, manifest) -> bytes:
    data = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
    return compress(base.pack(data))


def manifest_not_json(base, rng, case_dir):
    text = json.dumps(base.manifest).encode()
    return _with_manifest(base, rng.choice([b"", rng.randbytes(50), text[: rng.randrange(len(text))],
                                            b"\xff\xfe" + text, b"[" * 100_000, b'{"a": ' + b"9" * 5000 + b"}",
                                            b"{" + b" " * (17 << 20) + b"}", b"NaN"]))


def manifest_type(base, rng, case_dir):
    return _with_manifest(base, rng.choice([[], [base.manifest], "manifest", 1, None, True]))


def manifest_keys(base, rng, case_dir):
    manifest = json.loads(json.dumps(base.manifest))
    key = rng.choice(["format", "format_version", "name", "files", "run", "artifacts", "edgedistill_version"])
    if rng.random() < 0.3:
        manifest.pop(key)
    else:
        manifest[key] = rng.choice([None, True, 1, 1.0, 2, 0, "1", "x", [], {}, ["a", 1], {"a": 1}, 10**30,
                                    float("nan")])
    return _with_manifest(base, manifest)


def manifest_entry(base, rng, case_dir):
    manifest = json.loads(json.dumps(base.manifest))
    path = rng.choice(sorted(manifest["files"]))
    entry = manifest["files"][path]
    choice = rng.randrange(4)
    if choice == 0:
        manifest["files"][path] = rng.choice([None, [], "x", 5, [entry]])
    elif choice == 1:
        entry.pop(rng.choice(["bytes", "sha256"]))
    elif choice == 2:
        entry["bytes"] = rng.choice([-1, 1.5, "12", True, None, 10**30, entry["bytes"] + 1, 0, 100 * 2**30])
    else:
        entry["sha256"] = rng.choice(["0" * 64, entry["sha256"].upper(), entry["sha256"][:-1], 5, None,
                                      entry["sha256"] + "0", "g" * 64])
    return _with_manifest(base, manifest)


def manifest_paths(base, rng, case_dir):
    manifest = json.loads(json.dumps(base.manifest))
    path = rng.choice(["../x", "/abs", str(case_dir / "manifest-escaped"), "a/../b", "", "x/", "manifest.json",
                       "a\nb", ".", "dir/./x", "student-q4_k_m.gguf/x", "C:/x", "a\\b", "n" * 300,
                       "extra.bin", "\udcff"])
    entry = {"bytes": 5, "sha256": hashlib.sha256(b"extra").hexdigest()}
    if rng.random() < 0.5:  # renamed: the file is then unlisted as well
        entry = manifest["files"].pop(rng.choice(sorted(manifest["files"])))
    manifest["files"][path] = entry
    data = json.dumps(manifest).encode("utf-8", "surrogatepass")
    return _with_manifest(base, data)


MUTATIONS = [gz_flip_bits, gz_overwrite, gz_truncate, gz_append, tar_size, tar_name, tar_type, tar_mode_and_more,
             tar_checksum, tar_random_header_bytes, tar_random_bytes, tar_pax, tar_header_chains, tar_members,
             tar_bomb, manifest_not_json, manifest_type, manifest_keys, manifest_entry, manifest_paths]


# ---- the harness's side: the base per scratch root, one case, the worker's run of it

_BASES: dict[Path, Base] = {}


def setup(root: Path) -> dict:
    """The valid bundle every case starts from, in root/base."""
    base = _BASES[root] = Base(root)
    return {"base": {"name": base.top, "files": len(base.files), "bytes": len(base.gz)}}


def make_case(index: int, rng: random.Random, case_dir: Path) -> Case:
    mutation = rng.choice(MUTATIONS)
    bundle = case_dir / f"case-{index:05d}.tar.gz"
    bundle.write_bytes(mutation(_BASES[case_dir.parent], rng, case_dir))
    out = case_dir / "out"
    line = json.dumps({"bundle": str(bundle), "out": str(out), "top": _BASES[case_dir.parent].top})
    return Case(line, [mutation.__name__], may_write=[out])


def run_case(line: str) -> dict:
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY or soft > WORKER_ADDRESS_SPACE_BYTES:
        resource.setrlimit(resource.RLIMIT_AS, (WORKER_ADDRESS_SPACE_BYTES, hard))
    case = json.loads(line)
    out = Path(case["out"])
    result = classify(lambda: verify_bundle(Path(case["bundle"]), extract_to=out))
    # verify_bundle promises a failed extract leaves the target as it was (here: absent)
    left = sorted(path.name for path in out.iterdir()) if out.is_dir() else []
    wanted = [case["top"]] if result["outcome"] == "ok" else []
    if left != wanted and result["outcome"] in ("ok", "clear"):
        return {"outcome": "failed_check", "error_type": "leftover_files", "left": left[:10],
                "message": f"{out} holds {left[:5]} after {result['outcome']}: {result.get('message', '')}"[:400]}
    return result


if __name__ == "__main__":
    sys.exit(harness_main("fuzz_bundle", Path(__file__).resolve(), make_case, run_case, default_cases=2000,
                          description=__doc__.splitlines()[0], setup=setup))
