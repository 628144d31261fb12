"""The check that a bundle arrived intact, and its extraction: `verify_bundle` trusts nothing in
the archive before checking it. Also the bundle format's single source of truth (FORMAT,
FORMAT_VERSION, MANIFEST), which edgedistill/bundle.py writes.

    edgedistill verify sentiment-student.tar.gz --extract deploy/
    python -c "from pathlib import Path; from edgedistill.bundle_verify import verify_bundle; \
print(verify_bundle(Path('sentiment-student.tar.gz'), extract_to=Path('deploy')))"

A fault is an EdgedistillError naming the fault and the fix. The .tar.gz is read twice as a
stream, forward only, a chunk at a time: a GiB bundle is never held in memory.

First pass, nothing written:
- every tar header: a plain file or folder (no link, device or sparse file), a plain relative
  path inside the one top folder (no `..`, leading `/`, `\\`, drive, control character), a size
  >= 0, and, before any of its data is read, within the caps;
- the caps: each file and all of them together at most `max_bytes` (MAX_BYTES, 64 GiB: a 30B
  model in 16 bits), all of them at most `max_ratio` (MAX_RATIO, 200) times the .tar.gz's size.
  A bundle of the tiny run expands 1.7-2.0x (GGUF and ONNX weights hardly compress, tokenizer
  JSON about 4x) while gzip shrinks zeros about 1000x: 200x leaves real bundles a 100-fold margin
  and refuses a bomb of zeros. At most MAX_MEMBERS members, a manifest of at most 16 MiB, a tar
  header's own data (a pax record, a long name) at most 64 KiB, and decompression stops past
  what the headers declare plus their own blocks;
- gzip's CRC and a cut anywhere: "truncated or damaged ... copy it again";
- the manifest: JSON, an object of this `format` and `format_version`, `name` the top folder,
  `files` an object {relative path: {"bytes": int >= 0, "sha256": 64 lowercase hex}}, `route`
  (when present) one of those files; a bad field is named. The archive's files are exactly the manifest's (and manifest.json), each of the size
  the manifest says.
Then with `extract_to`, its filesystem must have the files' bytes free plus a 4 KiB block per
file and a 64 MiB margin (FREE_SPACE_MARGIN_BYTES).
Second pass: every file is read up to its declared size, counted and hashed, and with
`extract_to` written into a hidden `extract_to/.<name>.*.partial/<name>/` that is renamed to
`extract_to/<name>` only when every hash matched. A failure removes it (and `extract_to` if this
call created it): a failed extract leaves the target as it was.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from edgedistill.errors import EdgedistillError

FORMAT = "edgedistill-bundle"
FORMAT_VERSION = 1
# the archive's own list of files, sizes and hashes (named like a stage's manifest, but another format)
MANIFEST = "manifest.json"
CHUNK_BYTES = 1 << 20
GZIP_MAGIC = b"\x1f\x8b"
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
# the caps of verify_bundle (the module docstring says why these values)
MAX_BYTES = 64 << 30
MAX_RATIO = 200
MAX_MEMBERS = 10_000
MAX_MANIFEST_BYTES = 16 << 20
MAX_HEADER_READ = 64 << 10
FREE_SPACE_MARGIN_BYTES = 64 << 20
# errors raised by tarfile's header parser on a malformed header: ReadError and friends, ValueError
# from a bad pax number or GNU sparse map, RecursionError from a long chain of pax headers
_TAR_PARSE_ERRORS = (tarfile.TarError, ValueError, RecursionError)
_REBUILD = "rebuild it with `edgedistill bundle`"


def _size(count: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} bytes"


def path_problem(path: str) -> str | None:
    """Why `path` (a tar member name or a manifest key) is not a plain relative path, or None."""
    parts = path.split("/")
    if path.startswith("/") or ".." in parts:
        return "escapes the target folder"
    # a backslash or drive letter is a separator or a root on Windows
    if "\\" in path or ":" in parts[0] or "" in parts or "." in parts:
        return "is not a plain relative path"
    # control characters and undecodable bytes (surrogates) garble every message that names the file
    if not all(character.isprintable() or character == " " for character in path):
        return "has a control character or bytes that are not UTF-8"
    if any(len(part.encode()) > 255 for part in parts):
        return "has a name longer than 255 bytes"
    return None


class _ForwardStream:
    """The decompressed bytes of a .tar.gz for tarfile, read forward only: tarfile never needs to
    seek back when it lists members and we read their data in order. It refuses to decompress
    more than `limit` bytes in all, and any single read by tarfile over MAX_HEADER_READ (tarfile
    reads a pax or GNU long-name header's data in one read of the size that header declares)."""

    def __init__(self, file: Path, limit: int):
        self.file, self.limit, self.position = file, limit, 0
        self.raw = open(file, "rb")
        self.gzip = gzip.GzipFile(fileobj=self.raw, mode="rb")

    def read_data(self, size: int) -> bytes:
        try:
            data = self.gzip.read(size)
        except (EOFError, OSError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
            raise _damaged(self.file, exc) from exc
        self.position += len(data)
        if self.position > self.limit:
            raise EdgedistillError(f"{self.file} decompresses to more than {_size(self.limit)}, beyond what its "
                                   "members declare (a compression bomb?)", "do not extract this archive; " + _REBUILD)
        return data

    def read(self, size: int) -> bytes:
        if size is None or not 0 <= size <= MAX_HEADER_READ:
            raise _damaged(self.file, f"a tar header asks for a read of {size} bytes")
        return self.read_data(size)

    def seek(self, position: int, whence: int = os.SEEK_SET) -> int:
        if whence != os.SEEK_SET or position < self.position:
            raise _damaged(self.file, "a tar header points backwards")
        while self.position < position:
            if not self.read_data(min(CHUNK_BYTES, position - self.position)):
                break
        return self.position

    def tell(self) -> int:
        return self.position

    def close(self) -> None:
        self.gzip.close()
        self.raw.close()


def _damaged(file: Path, cause) -> EdgedistillError:
    return EdgedistillError(f"{file} is truncated or damaged ({cause})", "copy it again or rebuild it with "
                            "`edgedistill bundle`")


def _open_tar(stream: _ForwardStream) -> tarfile.TarFile:
    try:
        return tarfile.TarFile(fileobj=stream, mode="r", encoding="utf-8")
    except _TAR_PARSE_ERRORS as exc:
        raise _damaged(stream.file, exc) from exc


def _next_member(tar: tarfile.TarFile, file: Path) -> tarfile.TarInfo | None:
    try:
        return tar.next()
    except _TAR_PARSE_ERRORS as exc:
        raise _damaged(file, exc) from exc


def _member_chunks(stream: _ForwardStream, member: tarfile.TarInfo):
    """The member's data in chunks, exactly `member.size` bytes counted here (tarfile is not trusted)."""
    stream.seek(member.offset_data)
    left = member.size
    while left:
        chunk = stream.read_data(min(CHUNK_BYTES, left))
        if not chunk:
            raise _damaged(stream.file, f"{member.name} ends {left} bytes early")
        left -= len(chunk)
        yield chunk


@dataclass
class _Contents:
    """What the first pass learned: the top folder, each file's size in archive order, the manifest,
    and how many bytes the archive may decompress to."""
    top: str
    sizes: dict[str, int]
    manifest: dict
    manifest_sha256: str
    stream_limit: int


def _check_member(file: Path, member: tarfile.TarInfo, top: str | None) -> str | None:
    """Refuse a member that could land outside the extraction folder or is not plain data; return
    its path inside the top folder (None for a folder, which is not extracted as such)."""
    problem = path_problem(member.name)
    if problem:
        raise EdgedistillError(f"{file}: member {member.name[:200]!r} {problem}",
                               "do not extract this archive; " + _REBUILD)
    # GNU sparse files read back larger than they are stored: refused like links
    if member.type not in (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE) or member.sparse is not None:
        raise EdgedistillError(f"{file}: member {member.name[:200]!r} is a link or special file, not plain data",
                               "do not extract this archive; " + _REBUILD)
    first, _, relpath = member.name.partition("/")
    if top is not None and first != top:
        raise EdgedistillError(f"{file} holds more than one top folder ({top!r}, {first[:200]!r})", _REBUILD)
    if member.isdir():
        return None
    if not relpath:
        raise EdgedistillError(f"{file}: {member.name!r} is a file outside the bundle's folder", _REBUILD)
    if member.size < 0:
        raise _damaged(file, f"{member.name} declares {member.size} bytes")
    return relpath


def _check_caps(file: Path, member: tarfile.TarInfo, declared: int, max_bytes: int, max_ratio: float) -> None:
    """Refuse before any of the member's data is read (see the module docstring for the caps)."""
    hint = ("do not extract it: this looks like a compression bomb; if you trust the bundle, call "
            "verify_bundle with a larger max_bytes / max_ratio")
    if member.size > max_bytes:
        raise EdgedistillError(f"{file}: {member.name} declares {member.size} bytes ({_size(member.size)}), "
                               f"over the {_size(max_bytes)} limit", hint)
    if declared > max_bytes:
        raise EdgedistillError(f"{file} declares more than {_size(max_bytes)} of files, over the limit", hint)
    compressed = file.stat().st_size
    if declared > max_ratio * compressed:
        raise EdgedistillError(f"{file} declares {_size(declared)} of files in {_size(compressed)}: it would "
                               f"expand over {declared / compressed:.0f}x, beyond the {max_ratio:g}x limit "
                               "(real bundles expand about 2x)", hint)


def _scan(file: Path, max_bytes: int, max_ratio: float) -> _Contents:
    """First pass, nothing written: every header checked, the manifest read, gzip's own check read."""
    # beyond the data the caps allow: headers, padding and the end of the archive
    overhead = MAX_MEMBERS * 4 * tarfile.BLOCKSIZE + tarfile.RECORDSIZE
    stream_limit = min(max_bytes, int(max_ratio * file.stat().st_size)) + overhead
    stream = _ForwardStream(file, stream_limit)
    try:
        tar = _open_tar(stream)
        top, sizes, declared, manifest_data, members = None, {}, 0, None, 0
        while (member := _next_member(tar, file)) is not None:
            members += 1
            if members > MAX_MEMBERS:
                raise EdgedistillError(f"{file} has more than {MAX_MEMBERS} members", _REBUILD)
            relpath = _check_member(file, member, top)
            top = member.name.partition("/")[0]
            if relpath is None:
                continue
            if relpath in sizes:
                raise EdgedistillError(f"{file}: {top}/{relpath} appears twice in the archive", _REBUILD)
            declared += member.size
            _check_caps(file, member, declared, max_bytes, max_ratio)
            sizes[relpath] = member.size
            if relpath == MANIFEST:
                if member.size > MAX_MANIFEST_BYTES:
                    raise EdgedistillError(f"{file}: {member.name} has {_size(member.size)}, more than a "
                                           f"manifest's {_size(MAX_MANIFEST_BYTES)}", _REBUILD)
                manifest_data = b"".join(_member_chunks(stream, member))
        # to the end, so that gzip checks its CRC and a cut after the last member shows
        while stream.read_data(CHUNK_BYTES):
            pass
    finally:
        stream.close()
    if top is None or manifest_data is None:
        raise EdgedistillError(f"{file} has no {top or '<name>'}/{MANIFEST}", _REBUILD)
    manifest = _parse_manifest(file, top, manifest_data)
    _match_manifest(file, top, sizes, manifest["files"])
    return _Contents(top, sizes, manifest, hashlib.sha256(manifest_data).hexdigest(), stream_limit)


def _bad_field(field: str, entry: dict, key: str, wanted: str) -> str:
    return f"{field}.{key} is {str(entry[key])[:100]}, not {wanted}" if key in entry else f"{field}.{key} is missing"


def _parse_manifest(file: Path, top: str, data: bytes) -> dict:
    """The manifest, checked field by field before anything in it is trusted."""
    where = f"{file}: {top}/{MANIFEST}"
    try:
        manifest = json.loads(data)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise EdgedistillError(f"{where} is not valid JSON ({str(exc)[:200]})", _REBUILD) from exc
    if not isinstance(manifest, dict):
        kind = {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}
        raise EdgedistillError(f"{where} is a JSON {kind.get(type(manifest), 'null')}, not an object", _REBUILD)
    if manifest.get("format") != FORMAT:
        raise EdgedistillError(f"{where}: format is {manifest.get('format')!r}, not {FORMAT!r}",
                               "give a .tar.gz that `edgedistill bundle` wrote")
    version = manifest.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:
        newer = type(version) is int and version > FORMAT_VERSION
        raise EdgedistillError(f"{where}: format_version is {version!r}, this edgedistill reads {FORMAT_VERSION}",
                               "upgrade edgedistill" if newer else _REBUILD)
    if manifest.get("name") != top:
        raise EdgedistillError(f"{where}: name is {manifest.get('name')!r}, the archive's folder is {top!r}", _REBUILD)
    for key in ("run", "edgedistill_version"):
        if not isinstance(manifest.get(key, ""), str):
            raise EdgedistillError(f"{where}: {key} is {manifest[key]!r}, not a string", _REBUILD)
    artifacts = manifest.get("artifacts", [])
    if not isinstance(artifacts, list) or not all(isinstance(name, str) for name in artifacts):
        raise EdgedistillError(f"{where}: artifacts is {str(artifacts)[:100]}, not a list of names", _REBUILD)
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise EdgedistillError(f"{where}: files is {str(files)[:100]}, not an object of path: {{bytes, sha256}}",
                               _REBUILD)
    for relpath, entry in files.items():
        field = f"{where}: files[{relpath!r}]"
        problem = path_problem(relpath)
        if problem:
            raise EdgedistillError(f"{field}: the path {problem}", _REBUILD)
        parents = ["/".join(relpath.split("/")[:depth]) for depth in range(1, relpath.count("/") + 1)]
        if relpath == MANIFEST or any(parent in files or parent == MANIFEST for parent in parents):
            raise EdgedistillError(f"{field}: the path clashes with another file's", _REBUILD)
        if not isinstance(entry, dict):
            raise EdgedistillError(f"{field} is {str(entry)[:100]}, not {{bytes, sha256}}", _REBUILD)
        size, sha256 = entry.get("bytes"), entry.get("sha256")
        if type(size) is not int or size < 0:
            raise EdgedistillError(_bad_field(field, entry, "bytes", "a whole number of bytes"), _REBUILD)
        if not isinstance(sha256, str) or not SHA256_HEX.fullmatch(sha256):
            raise EdgedistillError(_bad_field(field, entry, "sha256", "64 lowercase hex digits"), _REBUILD)
    # route: the routing file for `edgedistill serve --route` (edgedistill.route), when the run had one
    if "route" in manifest and (not isinstance(manifest["route"], str) or manifest["route"] not in files):
        raise EdgedistillError(f"{where}: route is {str(manifest['route'])[:100]}, not one of the files", _REBUILD)
    return manifest


def _match_manifest(file: Path, top: str, sizes: dict[str, int], files: dict) -> None:
    unlisted = [relpath for relpath in sizes if relpath not in files and relpath != MANIFEST]
    if unlisted:
        raise EdgedistillError(f"{file}: {top}/{unlisted[0]} is not in the manifest "
                               f"({len(unlisted)} unlisted file(s))", _REBUILD)
    for relpath, entry in files.items():
        if relpath not in sizes:
            raise EdgedistillError(f"{file}: {top}/{relpath} is in the manifest but missing",
                                   "copy the archive again or rebuild it with `edgedistill bundle`")
        if sizes[relpath] != entry["bytes"]:
            raise EdgedistillError(f"{file}: {top}/{relpath} has {sizes[relpath]} bytes, the manifest says "
                                   f"{entry['bytes']}", "copy the archive again or rebuild it")


def _hash_and_write(file: Path, contents: _Contents, folder: Path | None) -> None:
    """Second pass: hash every file (and write it under `folder`), in chunks, against the manifest."""
    files = contents.manifest["files"]
    expected = {relpath: (files[relpath]["sha256"] if relpath != MANIFEST else contents.manifest_sha256)
                for relpath in contents.sizes}
    order = iter(contents.sizes.items())
    stream = _ForwardStream(file, contents.stream_limit)
    try:
        tar = _open_tar(stream)
        while (member := _next_member(tar, file)) is not None:
            if member.isdir():
                continue
            relpath, size = next(order, (None, None))
            if member.name != f"{contents.top}/{relpath}" or member.size != size:
                raise _damaged(file, "it changed while it was being read")
            sha256 = hashlib.sha256()
            target = None
            if folder is not None:
                (folder / relpath).parent.mkdir(parents=True, exist_ok=True)
                target = open(folder / relpath, "xb")
            try:
                for chunk in _member_chunks(stream, member):
                    sha256.update(chunk)
                    if target is not None:
                        target.write(chunk)
            finally:
                if target is not None:
                    target.close()
            if sha256.hexdigest() != expected[relpath]:
                raise EdgedistillError(f"{file}: {contents.top}/{relpath} does not match its sha256 in the manifest",
                                       "copy the archive again or rebuild it")
    finally:
        stream.close()


def _missing_folders(folder: Path) -> list[Path]:
    """`folder` and its ancestors that do not exist yet, outermost first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.insert(0, folder)
        folder = folder.parent
    return missing


def _check_free_space(file: Path, extract_to: Path, contents: _Contents) -> None:
    existing = extract_to
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    # each file can take a block more than its bytes; the margin keeps the disk from filling up
    needed = sum(contents.sizes.values()) + 4096 * len(contents.sizes) + FREE_SPACE_MARGIN_BYTES
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise EdgedistillError(f"{extract_to} has {_size(free)} free; extracting {file} needs {_size(needed)} "
                               f"({_size(sum(contents.sizes.values()))} of files and a "
                               f"{_size(FREE_SPACE_MARGIN_BYTES)} margin)",
                               "free some space there or extract elsewhere (--extract DIR)")


def _extract(file: Path, contents: _Contents, extract_to: Path) -> Path:
    """Write into a hidden folder beside the target and rename it into place only when every hash
    matched: a failure leaves `extract_to` as it was (and removes it if this call created it)."""
    target = extract_to / contents.top
    if target.exists() or target.is_symlink():
        raise EdgedistillError(f"{target} already exists", "remove it or extract elsewhere")
    _check_free_space(file, extract_to, contents)
    created = _missing_folders(extract_to)
    partial = None
    try:
        extract_to.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=f".{contents.top}.", suffix=".partial", dir=extract_to))
        _hash_and_write(file, contents, partial / contents.top)
        os.rename(partial / contents.top, target)
    except OSError as exc:
        raise EdgedistillError(f"could not extract {file} into {extract_to}: {exc}",
                               "check that the folder is writable and has space, or extract elsewhere") from exc
    finally:
        if partial is not None:
            shutil.rmtree(partial, ignore_errors=True)
        if not target.exists():
            for folder in reversed(created):
                try:
                    folder.rmdir()
                except OSError:
                    break
    return target


def verify_bundle(file: Path, *, extract_to: Path | None = None, max_bytes: int = MAX_BYTES,
                  max_ratio: float = MAX_RATIO) -> dict:
    """Check every path, size and sha256 in the archive `file` against its manifest.json; then,
    when `extract_to` is given, extract it there (as `extract_to/<name>/`). Returns a summary.
    `max_bytes` and `max_ratio` cap what the archive may expand to (see the module docstring)."""
    file = Path(file)
    if not file.is_file():
        raise EdgedistillError(f"{file} does not exist", "give the .tar.gz that `edgedistill bundle` wrote")
    with open(file, "rb") as head:
        if head.read(2) != GZIP_MAGIC:
            raise EdgedistillError(f"{file} is not a .tar.gz (it does not start with gzip's signature)",
                                   "give the .tar.gz that `edgedistill bundle` wrote")
    contents = _scan(file, max_bytes, max_ratio)
    extracted = None
    if extract_to is None:
        _hash_and_write(file, contents, None)
    else:
        extracted = str(_extract(file, contents, Path(extract_to)))
    manifest = contents.manifest
    return {"file": str(file), "name": contents.top, "run": manifest.get("run"),
            "edgedistill_version": manifest.get("edgedistill_version"), "artifacts": manifest.get("artifacts", []),
            "route": manifest.get("route"),
            "files": len(manifest["files"]), "bytes": sum(entry["bytes"] for entry in manifest["files"].values()),
            "extracted_to": extracted}
