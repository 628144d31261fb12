"""Fuzz the GGUF loader: damaged copies of a small valid GGUF through open_gguf and read_tokenizer_metadata.

    .venv/bin/python tools/fuzz_gguf.py                                   # 3000 cases, seed 0, JSON to stdout
    .venv/bin/python tools/fuzz_gguf.py --cases 300 --seed 7 --out /tmp/fuzz_gguf.json
    .venv/bin/python tools/fuzz_gguf.py --replay 1234 --seed 7            # one case here, with its traceback

The sample is a vocabulary-and-two-tensors GGUF written by gguf-py (a byte-level BPE vocabulary of
a few hundred tokens, merges, scalar, string and u32-array keys, an F32, an F16 and a Q8_0 tensor).
Each case applies one to three mutations, chosen by a generator seeded with (seed, case index) so
any case can be replayed alone: flip a bit or set a byte (0x00, 0xff, random) in the header, set a
type field to 0-13 (the issue's damage: a string's type byte 8 made 9, an array), overwrite a
u32/u64 of the header (a length, count or type field of the sample, or a 4-aligned offset) with a
boundary value, truncate, insert or delete a byte.

The cases run in one reused worker process (this file with --worker), restarted after a hang, a
crash or memory past the limit. Outcomes per case: ok, clear (EdgedistillError; those that
edgedistill mapped from a gguf-py exception rather than refused in its own header check are
counted again as clear_from_gguf_py), raw_traceback (any other exception), hang (no answer within
--timeout-s), rss_over (the worker's resident memory past --rss-limit-mb, polled while the case
runs and read from VmHWM, reset per case, after it), crash (the worker died). Outside writes: the
worker runs in an empty folder with HOME and TMPDIR pointed at another, and the case folder should
hold only the case; anything else appearing there is recorded. The JSON gives the counts, the
peak memory and the slowest case, and up to 20 examples of each bad outcome with the command that
replays it. Exit status 1 if any case hangs, crashes, ends in a raw traceback, passes the memory
limit or writes a file.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

import numpy as np

BAD_OUTCOMES = ("raw_traceback", "hang", "rss_over", "crash")
BOUNDARY_VALUES = (0, 1, 2**31, 2**32 - 1, 2**63, 2**64 - 1)  # and the file's size, added per file
MAX_EXAMPLES = 20


def byte_symbols() -> list[str]:
    """GPT-2's 256 byte-level BPE symbols (transformers' bytes_to_unicode, without importing it)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(shifted))]


def write_sample_gguf(path: Path, n_merged_tokens: int = 200) -> Path:
    """A small valid GGUF as gguf-py writes one: a byte-level BPE vocabulary (3 specials, the 256 byte
    symbols, `n_merged_tokens` merged ones and their merges), scalar and u32-array keys, 3 tensors."""
    import gguf

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    symbols = byte_symbols()
    letters = [s for s in symbols if s.isalpha()][:40]
    merges = [f"{a} {b}" for a in letters[:20] for b in letters[20:]][:n_merged_tokens]
    tokens = specials + symbols + [m.replace(" ", "") for m in merges]
    writer = gguf.GGUFWriter(path, arch="llama")
    writer.add_context_length(2048)
    writer.add_embedding_length(8)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL] * (len(tokens) - 3))
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(False)
    writer.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")
    writer.add_key_value("fuzz.u32_array", [1, 7, 2**32 - 1], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.UINT32)
    writer.add_uint64("fuzz.u64", 2**40)
    rng = np.random.default_rng(0)
    writer.add_tensor("token_embd.weight", rng.standard_normal((4, 8), dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.ones(8, dtype=np.float16))
    q8 = gguf.quants.quantize(rng.standard_normal((2, 64), dtype=np.float32), gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("output.weight", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def header_fields(path: Path) -> tuple[int, dict[str, list[tuple[int, int]]]]:
    """The sample's header size and the (offset, width) of its u32/u64 fields: "types" (value, array
    item and tensor types), "sizes" (string lengths of keys, names and values, array lengths, counts,
    dimensions, data offsets) and "any" (those and every string length inside arrays)."""
    import gguf

    reader = gguf.GGUFReader(path)
    base = reader.data.__array_interface__["data"][0]

    def at(part, index: int = 0) -> tuple[int, int]:
        return part.__array_interface__["data"][0] - base + index * part.itemsize, part.itemsize

    types, sizes, any_field = [], [(4, 4), (8, 8), (16, 8)], []  # version, tensor count, kv count
    for field in list(reader.fields.values())[3:]:  # after the three header fields gguf-py lists first
        key_length, _, value_type, *value = field.parts
        types.append(at(value_type))
        sizes.append(at(key_length))
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            types.append(at(value[0]))
            sizes.append(at(value[1]))
        elif field.types[0] == gguf.GGUFValueType.STRING:
            sizes.append(at(value[0]))
        any_field += [at(part) for part in value if part.size == 1 and part.itemsize in (4, 8)]
    for tensor in reader.tensors:
        name_length, _, n_dims, dims, tensor_type, data_offset = tensor.field.parts
        types.append(at(tensor_type))
        sizes += [at(name_length), at(n_dims), at(data_offset), *(at(dims, i) for i in range(dims.size))]
    return int(reader.data_offset), {"types": types, "sizes": sizes, "any": sorted({*types, *sizes, *any_field})}


def mutate(data: bytes, rng: random.Random, header_bytes: int, fields: dict) -> tuple[bytes, list[str]]:
    """One to three mutations of `data`, and what each did."""
    out, done = bytearray(data), []
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        header = min(header_bytes, len(out))
        kind = rng.choice(("flip_bit", "set_byte", "retype", "boundary_value", "truncate", "insert_byte",
                           "delete_byte"))
        at = rng.randrange(max(header, 1))
        if kind == "flip_bit" and out:
            bit = rng.randrange(8)
            out[at] ^= 1 << bit
            done.append(f"flip_bit {at:#x} bit {bit}")
        elif kind == "set_byte" and out:
            value = rng.choice((0x00, 0xFF, rng.randrange(256)))
            out[at] = value
            done.append(f"set_byte {at:#x}={value:#04x}")
        elif kind == "retype":  # the damage: a type byte changed, e.g. string (8) -> array (9)
            at, _ = rng.choice(fields["types"])
            value = rng.randrange(14)
            out[at : at + 1] = bytes([value])
            done.append(f"retype {at:#x}={value}")
        elif kind == "boundary_value":
            roll = rng.random()
            if roll < 0.8:
                at, width = rng.choice(fields["sizes" if roll < 0.5 else "any"])
            else:
                at, width = at - at % 4, rng.choice((4, 8))
            value = rng.choice((*BOUNDARY_VALUES, len(out))) % 2 ** (8 * width)
            out[at : at + width] = value.to_bytes(width, "little")
            done.append(f"boundary_value {at:#x} u{8 * width}={value}")
        elif kind == "truncate":
            cut = rng.randrange(len(out)) if rng.random() < 0.2 else at
            del out[cut:]
            done.append(f"truncate {cut:#x}")
        elif kind == "insert_byte":
            value = rng.randrange(256)
            out.insert(at, value)
            done.append(f"insert_byte {at:#x}={value:#04x}")
        elif kind == "delete_byte" and out:
            del out[at]
            done.append(f"delete_byte {at:#x}")
    return bytes(out), done


def case_rng(seed: int, index: int) -> random.Random:
    return random.Random(f"{seed}:{index}")


def run_case(path: Path) -> dict:
    """open_gguf and read_tokenizer_metadata on one file, in this process: the outcome and its error."""
    from edgedistill.errors import EdgedistillError
    from edgedistill.sources.gguf import _open_gguf_cached, open_gguf, read_tokenizer_metadata

    _open_gguf_cached.cache_clear()  # drop the last case's memory map
    try:
        open_gguf(path)
        read_tokenizer_metadata(path)
    except EdgedistillError as error:
        cause = error.__cause__
        return {"outcome": "clear", "message": error.problem[:400],
                "from_gguf_py": None if cause is None else f"{type(cause).__name__}: {cause}"[:300]}
    except Exception as error:
        return {"outcome": "raw_traceback", "error_type": type(error).__name__, "message": str(error)[:400],
                "traceback": traceback.format_exc(limit=-4)[-1500:]}
    finally:
        _open_gguf_cached.cache_clear()
    return {"outcome": "ok"}


def _status_kb(pid: int | str, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def worker() -> None:
    """Answer one JSON line per case path read from stdin, with the case's peak memory."""
    import edgedistill.sources.gguf  # noqa: F401  (imported before "ready", outside any case's time)

    # The answers get their own copy of stdout; anything the library prints goes to stderr.
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    out.write("ready\n")
    out.flush()
    for line in sys.stdin:
        try:  # so VmHWM is this case's peak, not the process's
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass
        start = time.perf_counter()
        result = run_case(Path(line.strip()))
        result["seconds"] = time.perf_counter() - start
        result["vmhwm_kb"] = _status_kb("self", "VmHWM")
        out.write(json.dumps(result) + "\n")
        out.flush()


class Worker:
    """The worker process seen from the fuzzer: send a path, wait for the answer or a limit."""

    def __init__(self, cwd: Path, env: dict, stderr: Path):
        self.cwd, self.env, self.stderr_path = cwd, env, stderr
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        self.stderr = self.stderr_path.open("ab")
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                     cwd=self.cwd, env=self.env)
        self.starts += 1
        line = self._line(timeout_s=120, rss_limit_kb=None)
        if line != "ready":
            raise RuntimeError(f"the fuzz worker did not start: {line!r}; see {self.stderr_path}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.stderr.close()
            self.proc = None

    def _line(self, timeout_s: float, rss_limit_kb: int | None) -> str | dict:
        """The worker's next line, or {"outcome": "hang"/"rss_over"/"crash"} (it is then stopped)."""
        fd, buffered, deadline, peak_kb = self.proc.stdout.fileno(), b"", time.monotonic() + timeout_s, 0
        while b"\n" not in buffered:
            if time.monotonic() > deadline:
                self.stop()
                return {"outcome": "hang", "peak_rss_kb": peak_kb}
            readable, _, _ = select.select([fd], [], [], 0.05)
            if readable:
                chunk = os.read(fd, 65536)
                if not chunk:
                    code = self.proc.wait()
                    self.stop()
                    stderr = self.stderr_path.read_text(errors="replace")[-800:]
                    return {"outcome": "crash", "message": f"the worker exited with status {code}: {stderr}"}
                buffered += chunk
            elif rss_limit_kb is not None:
                peak_kb = max(peak_kb, _status_kb(self.proc.pid, "VmRSS"))
                if peak_kb > rss_limit_kb:
                    self.stop()
                    return {"outcome": "rss_over", "peak_rss_kb": peak_kb}
        return buffered.decode().strip()

    def run(self, path: Path, timeout_s: float, rss_limit_kb: int) -> dict:
        if self.proc is None:
            self.start()
        start = time.perf_counter()
        self.proc.stdin.write(f"{path}\n".encode())
        self.proc.stdin.flush()
        answer = self._line(timeout_s, rss_limit_kb)
        if isinstance(answer, dict):  # the worker is gone: the wall time is the case's time
            answer["seconds"] = time.perf_counter() - start
            return answer
        result = json.loads(answer)
        if result["vmhwm_kb"] > rss_limit_kb:
            result["outcome"] = "rss_over"
            self.stop()  # its peak stays; start afresh
        return result


def unexpected_files(folders: list[Path], allowed: set[Path]) -> list[str]:
    return sorted(str(p) for folder in folders for p in folder.rglob("*") if p not in allowed)


def fuzz(cases: int, seed: int, timeout_s: float, rss_limit_mb: float) -> dict:
    root = Path(tempfile.mkdtemp(prefix="fuzz_gguf-"))
    case_dir, cwd, home = root / "cases", root / "cwd", root / "home"
    env = {**os.environ, "HOME": str(home), "TMPDIR": str(home), "XDG_CACHE_HOME": str(home / ".cache")}
    worker_proc = Worker(cwd, env, root / "worker-stderr.log")
    counts, mutations = Counter(), Counter()
    examples: dict[str, list[dict]] = {}
    outside_writes: list[dict] = []
    peak_kb = max_case_s = 0.0
    start = time.perf_counter()
    try:
        for folder in (case_dir, cwd, home):
            folder.mkdir()
        sample = write_sample_gguf(root / "sample.gguf")
        data = sample.read_bytes()
        header_bytes, fields = header_fields(sample)
        for index in range(cases):
            mutant, done = mutate(data, case_rng(seed, index), header_bytes, fields)
            mutations.update(m.split()[0] for m in done)
            path = case_dir / f"case-{index:05d}.gguf"
            path.write_bytes(mutant)
            result = worker_proc.run(path, timeout_s, int(rss_limit_mb * 1024))
            counts[result["outcome"]] += 1
            if result.get("from_gguf_py"):
                counts["clear_from_gguf_py"] += 1
            peak_kb = max(peak_kb, result.get("vmhwm_kb", 0), result.get("peak_rss_kb", 0))
            max_case_s = max(max_case_s, result["seconds"])
            wanted = result["outcome"] in BAD_OUTCOMES or result.get("from_gguf_py")
            key = result["outcome"] if result["outcome"] in BAD_OUTCOMES else "clear_from_gguf_py"
            if wanted and len(examples.setdefault(key, [])) < MAX_EXAMPLES:
                examples[key].append({
                    "case": index, "seed": seed, "mutations": done,
                    **{k: v for k, v in result.items() if k not in ("outcome", "vmhwm_kb")},
                    "reproduce": f"python tools/fuzz_gguf.py --replay {index} --seed {seed}",
                })
            written = unexpected_files([case_dir, cwd, home], {path})
            if written:
                outside_writes.append({"case": index, "seed": seed, "files": written[:10]})
                for folder in (case_dir, cwd, home):  # start the next case clean
                    shutil.rmtree(folder)
                    folder.mkdir()
            path.unlink(missing_ok=True)
    finally:
        worker_proc.stop()
        shutil.rmtree(root, ignore_errors=True)
    return {
        "cases": cases,
        "seed": seed,
        "sample_bytes": len(data),
        "header_bytes": header_bytes,
        "counts": {k: counts[k] for k in ("ok", "clear", *BAD_OUTCOMES, "clear_from_gguf_py")},
        "outside_writes": len(outside_writes),
        "peak_rss_mb": round(peak_kb / 1024, 1),
        "max_case_seconds": round(max_case_s, 3),
        "seconds_total": round(time.perf_counter() - start, 1),
        "worker_starts": worker_proc.starts,
        "mutations": dict(sorted(mutations.items())),
        "limits": {"timeout_s": timeout_s, "rss_limit_mb": rss_limit_mb},
        "examples": {**examples, "outside_writes": outside_writes[:MAX_EXAMPLES]},
    }


def replay(index: int, seed: int) -> int:
    """Rebuild one case and run it in this process, printing the full traceback of a raw error."""
    with tempfile.TemporaryDirectory(prefix="fuzz_gguf-replay-") as root:
        sample = write_sample_gguf(Path(root) / "sample.gguf")
        header_bytes, fields = header_fields(sample)
        mutant, done = mutate(sample.read_bytes(), case_rng(seed, index), header_bytes, fields)
        path = Path(root) / f"case-{index:05d}.gguf"
        path.write_bytes(mutant)
        print(f"case {index} seed {seed}: {', '.join(done)}")
        result = run_case(path)
        print(json.dumps({k: v for k, v in result.items() if k != "traceback"}, indent=1))
        if "traceback" in result:
            print(result["traceback"])
    return 1 if result["outcome"] in BAD_OUTCOMES else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout-s", type=float, default=5.0, help="a case running longer is a hang")
    parser.add_argument("--rss-limit-mb", type=float, default=300.0)
    parser.add_argument("--out", type=Path, help="write the JSON here (default: stdout)")
    parser.add_argument("--replay", type=int, metavar="CASE", help="run this one case here and show its result")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker()
        return 0
    if args.replay is not None:
        return replay(args.replay, args.seed)
    report = fuzz(args.cases, args.seed, args.timeout_s, args.rss_limit_mb)
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    else:
        print(text)
    bad = sum(report["counts"][k] for k in BAD_OUTCOMES) + report["outside_writes"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
