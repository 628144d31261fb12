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

Outcomes, limits, the worker and the JSON are tools/fuzz_harness.py's; `clear_from_library` counts
the clear errors edgedistill mapped from a gguf-py exception rather than refused in its own header
check (edgedistill/sources/gguf_header.py).
"""

from __future__ import annotations

import functools
import random
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fuzz_harness import BAD_OUTCOMES, Case, classify  # noqa: E402, F401  (BAD_OUTCOMES: for the tests)
from fuzz_harness import main as harness_main  # noqa: E402

BOUNDARY_VALUES = (0, 1, 2**31, 2**32 - 1, 2**63, 2**64 - 1)  # and the file's size, added per file
SAMPLE = "sample.gguf"


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


@functools.lru_cache(maxsize=1)
def _sample(root: Path) -> tuple[bytes, int, dict]:
    sample = root / SAMPLE
    return sample.read_bytes(), *header_fields(sample)


def setup(root: Path) -> dict:
    write_sample_gguf(root / SAMPLE)
    data, header_bytes, _ = _sample(root)
    return {"sample_bytes": len(data), "header_bytes": header_bytes}


def make_case(index: int, rng: random.Random, case_dir: Path) -> Case:
    data, header_bytes, fields = _sample(case_dir.parent)
    mutant, done = mutate(data, rng, header_bytes, fields)
    path = case_dir / f"case-{index:05d}.gguf"
    path.write_bytes(mutant)
    return Case(str(path), done)


def run_case(line: str) -> dict:
    """open_gguf and read_tokenizer_metadata on one file, in this process."""
    from edgedistill.sources.gguf import _open_gguf_cached, open_gguf, read_tokenizer_metadata

    path = Path(line)

    def read():
        try:
            open_gguf(path)
            read_tokenizer_metadata(path)
        finally:
            _open_gguf_cached.cache_clear()  # drop this case's memory map

    return classify(read)


if __name__ == "__main__":
    sys.exit(harness_main("fuzz_gguf", Path(__file__).resolve(), make_case, run_case, default_cases=3000,
                          description=__doc__.splitlines()[0], setup=setup))
