"""User data read into rows: one dict of fields per example, from JSONL, CSV, Parquet, plain text or
a folder written by Hugging Face `datasets` (`Dataset.save_to_disk`), each row named for errors.

    python -c "from pathlib import Path; from edgedistill.data.readers import read_rows; \
rows = read_rows(Path('recipes/data/sentiment.jsonl')); print(len(rows), rows[0])"

A row keeps every field its source has (nested values as Python lists and dicts); which fields a
task uses is for the prompt template (data/templates.py) and the recipe to say, not for the reader.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from edgedistill.errors import EdgedistillError

SUPPORTED = ".jsonl, .csv, .parquet, .txt (one prompt a line) or a folder written by datasets' save_to_disk"
# Arrow record batches are turned into Python rows this many at a time: the Arrow side stays
# memory-mapped, so a large file costs its Python rows, never a second whole copy.
BATCH_ROWS = 4096


JSON_KINDS = {bool: "true/false", int: "a number", float: "a number", str: "a string", list: "an array",
              type(None): "null"}


def utf8_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text with its line ending) per line of a UTF-8 file; a byte that is not UTF-8
    is an EdgedistillError naming its line and byte offset (a UTF-8 byte-order mark is dropped)."""
    if not path.is_file():
        raise EdgedistillError(f"{path} does not exist", "check the path (relative paths in a recipe are "
                                                         "relative to the recipe's folder)")
    lines = []
    offset = 0
    with open(path, "rb") as handle:
        for line_no, raw in enumerate(handle, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise EdgedistillError(
                    f"{path}:{line_no}: not UTF-8 (byte 0x{raw[exc.start]:02x} at byte offset {offset + exc.start})",
                    f"save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8 {path.name} > fixed{path.suffix})"
                ) from None
            lines.append((line_no, text.removeprefix("\ufeff") if line_no == 1 else text))
            offset += len(raw)
    return lines


def numbered_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) per non-blank line of a JSONL file of user data: every reader of
    such a file goes through here, so that a bad line is an EdgedistillError naming the file, the
    line and what is wrong (not UTF-8, not valid JSON, not a JSON object)."""
    rows = []
    for line_no, line in utf8_lines(path):
        if not line.strip():
            continue
        fix = f"each line must be one whole JSON object ({{...}}): fix or delete line {line_no}"
        try:
            row = json.loads(line.rstrip("\r\n"))
        except json.JSONDecodeError as exc:
            # "Unterminated string starting at", "Expecting value": then where
            raise EdgedistillError(f"{path}:{line_no}: not valid JSON ({exc.msg.removesuffix(' at')} at column "
                                   f"{exc.colno})", fix) from None
        if not isinstance(row, dict):
            shown = line.strip() if len(line.strip()) <= 40 else line.strip()[:37] + "..."
            raise EdgedistillError(f"{path}:{line_no}: not a JSON object (got {JSON_KINDS[type(row)]}: {shown})",
                                   fix)
        rows.append((line_no, row))
    return rows


@dataclass(frozen=True)
class Row:
    """One example: `where` names it in an error ("prompts.jsonl:12", "prompts.parquet row 12"),
    `fields` is its data."""
    where: str
    fields: dict


def read_rows(path: Path, *, text_field: str = "text") -> list[Row]:
    """Every row of `path`, by its suffix (a folder: a `save_to_disk` folder); a .txt line becomes
    {text_field: line}. An unknown format, a bad row or a source with no rows is an EdgedistillError."""
    path = Path(path)
    if not path.exists():
        raise EdgedistillError(f"{path} does not exist", "check the path (relative paths in a recipe are "
                                                         "relative to the recipe's folder)")
    suffix = path.suffix.lower()
    if path.is_dir():
        rows = _saved_dataset_rows(path)
    elif suffix == ".jsonl":
        rows = [Row(f"{path.name}:{line_no}", row) for line_no, row in numbered_jsonl(path)]
    elif suffix == ".csv":
        rows = _csv_rows(path)
    elif suffix == ".parquet":
        rows = _parquet_rows(path)
    elif suffix == ".txt":
        rows = [Row(f"{path.name}:{line_no}", {text_field: line.rstrip("\r\n")})
                for line_no, line in utf8_lines(path) if line.strip()]
    else:
        raise EdgedistillError(f"{path}: cannot read '{path.suffix or path.name}' files",
                               f"give the data as {SUPPORTED}")
    if not rows:
        raise EdgedistillError(f"{path} holds no examples", "add at least one example to it")
    return rows


def _csv_rows(path: Path) -> list[Row]:
    """Rows of a CSV file whose first record is the header; `where` is the line a record starts on
    (a quoted cell may span lines). csv.reader, not DictReader: DictReader hides a ragged record in
    a None key or None values, and reports no line for a blank line it skips."""
    reader = csv.reader(text for _, text in utf8_lines(path))
    header = None
    rows = []
    while True:
        line_no = reader.line_num + 1
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise EdgedistillError(f"{path}:{reader.line_num}: not valid CSV ({exc})",
                                   "save the file as CSV with a header row (quote cells holding commas, quotes or "
                                   "line breaks)") from None
        if not cells:  # a blank line
            continue
        if header is None:
            header = cells
            repeated = sorted({name for name in header if header.count(name) > 1})
            if repeated:
                raise EdgedistillError(f"{path}:{line_no}: the CSV header names {', '.join(map(repr, repeated))} "
                                       "more than once", "give every column its own name")
            continue
        if len(cells) != len(header):
            raise EdgedistillError(f"{path}:{line_no}: {len(cells)} cells where the header has {len(header)} "
                                   f"({', '.join(header)})",
                                   "give every record one cell per column (quote a cell holding a comma)")
        rows.append(Row(f"{path.name}:{line_no}", dict(zip(header, cells))))
    return rows


def _parquet_rows(path: Path) -> list[Row]:
    import pyarrow  # here, not at the top: importing edgedistill starts no Arrow
    import pyarrow.parquet

    try:
        parquet = pyarrow.parquet.ParquetFile(path, memory_map=True)
        return _batch_rows(parquet.iter_batches(batch_size=BATCH_ROWS), parquet.schema_arrow, path.name)
    except (pyarrow.ArrowException, OSError) as exc:
        raise EdgedistillError(f"{path}: not a readable Parquet file ({exc})",
                               "write it again (e.g. pandas' DataFrame.to_parquet or datasets' Dataset.to_parquet)"
                               ) from None


def _saved_dataset_rows(folder: Path) -> list[Row]:
    """Rows of a folder written by `Dataset.save_to_disk`: state.json lists the data files, each
    an Arrow IPC stream. Read with pyarrow alone, so that `datasets` is no dependency at run time."""
    import pyarrow  # here, not at the top: importing edgedistill starts no Arrow
    import pyarrow.ipc

    if (folder / "dataset_dict.json").is_file():
        splits = _json_file(folder / "dataset_dict.json").get("splits") or sorted(
            child.name for child in folder.iterdir() if (child / "state.json").is_file())
        example = folder / str(splits[0] if splits else "train")
        raise EdgedistillError(f"{folder} holds several splits ({', '.join(map(str, splits))}), not one data set",
                               f"point data.prompts at one split, e.g. {example}")
    if not (folder / "state.json").is_file():
        raise EdgedistillError(f"{folder} is a folder without state.json, so not one written by datasets' "
                               "save_to_disk", f"give the data as {SUPPORTED}")
    data_files = _json_file(folder / "state.json").get("_data_files")
    if not isinstance(data_files, list) or not all(isinstance(f, dict) and "filename" in f for f in data_files):
        raise EdgedistillError(f"{folder / 'state.json'}: no list of data files (_data_files)",
                               "write the folder again with datasets' Dataset.save_to_disk")
    rows = []
    for data_file in data_files:
        arrow_path = folder / data_file["filename"]
        try:
            stream = pyarrow.ipc.open_stream(pyarrow.memory_map(str(arrow_path)))
            # row numbers run on across the shards, as the data set's own index does
            rows += _batch_rows(stream, stream.schema, folder.name, first=len(rows) + 1)
        except (pyarrow.ArrowException, OSError) as exc:
            raise EdgedistillError(f"{arrow_path}: not a readable Arrow stream ({exc})",
                                   "write the folder again with datasets' Dataset.save_to_disk") from None
    return rows


def _batch_rows(batches, schema, name: str, first: int = 1) -> list[Row]:
    """Rows of Arrow record batches, numbered from `first` ("name row N", 1 for the first row).
    A column that `datasets` marks as a ClassLabel holds integers: they are given back as the
    label names its features list, since a gold label is compared by name (-1, datasets' missing
    label, becomes None)."""
    label_names = _class_label_names(schema)
    rows = []
    for batch in batches:
        for fields in batch.to_pylist():
            for column, names in label_names.items():
                value = fields.get(column)
                if isinstance(value, int) and -1 <= value < len(names):
                    fields[column] = None if value == -1 else names[value]
            rows.append(Row(f"{name} row {first + len(rows)}", fields))
    return rows


def _class_label_names(schema) -> dict[str, list[str]]:
    """{column: label names} for the top-level ClassLabel columns that `datasets` describes in the
    schema's b"huggingface" metadata (save_to_disk folders and datasets' Parquet files carry it)."""
    try:
        features = json.loads((schema.metadata or {})[b"huggingface"])["info"]["features"]
    except (KeyError, TypeError, ValueError):
        return {}
    if not isinstance(features, dict):
        return {}
    return {column: feature["names"] for column, feature in features.items()
            if isinstance(feature, dict) and feature.get("_type") == "ClassLabel"
            and isinstance(feature.get("names"), list)}


def _json_file(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EdgedistillError(f"{path}: not valid JSON ({exc})",
                               "write the folder again with datasets' save_to_disk") from None
    if not isinstance(value, dict):
        raise EdgedistillError(f"{path}: not a JSON object", "write the folder again with datasets' save_to_disk")
    return value
