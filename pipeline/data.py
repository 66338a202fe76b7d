"""Read, repair and validate Kaggle "LMSYS - Chatbot Arena" layout files.

Everything here is pure apart from `read_table`/`load_pairs`, which only read the file. Repairs are
counted per kind and reported; no row is ever dropped: a row that cannot be repaired is an error that
names its id.
"""
from __future__ import annotations

import io
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.errors import UserError

TEXT_COLUMNS = ("prompt", "response_a", "response_b")
LABEL_COLUMNS = ("winner_model_a", "winner_model_b", "winner_tie")
LABEL_NAMES = ("a", "b", "tie")
TRAIN_COLUMNS = ("id", *TEXT_COLUMNS, *LABEL_COLUMNS)
TEST_COLUMNS = ("id", *TEXT_COLUMNS)
NO_LABEL = -1


@dataclass
class PairData:
    """Tidy rows: `frame` has id (str), prompt/response_a/response_b (list[str] turns), label (0=a, 1=b, 2=tie,
    -1 when unlabelled). `repairs` counts repairs by kind; `n_repaired` counts rows with at least one."""

    frame: pd.DataFrame
    source: str
    n_repaired: int = 0
    repairs: dict[str, int] = field(default_factory=dict)

    @property
    def has_labels(self) -> bool:
        return bool((self.frame["label"] != NO_LABEL).all())

    def label_counts(self) -> dict[str, int]:
        counts = self.frame["label"].value_counts()
        return {name: int(counts.get(k, 0)) for k, name in enumerate(LABEL_NAMES)}


def fix_surrogates(text: str) -> tuple[str, bool]:
    """Join valid UTF-16 surrogate pairs and replace lone surrogates with U+FFFD (they break str.encode)."""
    try:
        text.encode("utf-8")
        return text, False
    except UnicodeEncodeError:
        fixed = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        return fixed, True


def turn_to_text(turn: Any) -> tuple[str, str | None]:
    """One turn as text, plus the repair kind applied (None when the turn was already a string)."""
    if turn is None or (isinstance(turn, float) and math.isnan(turn)):
        return "", "null_turn"
    if isinstance(turn, str):
        return turn, None
    if isinstance(turn, (bool, int, float)):
        return json.dumps(turn), "scalar_turn"
    return json.dumps(turn, ensure_ascii=False), "nested_turn"


def parse_turns(cell: Any) -> tuple[list[str], list[str]]:
    """Parse one prompt/response cell into a list of turn strings, and the list of repairs applied.

    Accepts a JSON list of turns (the Kaggle encoding, `null` and scalar turns included), plain text that is not
    JSON, an empty cell, or a list already decoded (parquet)."""
    repairs: list[str] = []
    if isinstance(cell, (list, tuple, np.ndarray)):
        raw_turns: list[Any] = list(cell)
    elif cell is None or (isinstance(cell, float) and math.isnan(cell)) or str(cell).strip() == "":
        return [""], ["empty_cell"]
    else:
        text = str(cell)
        try:
            decoded = json.loads(text, strict=False)  # raw newlines inside strings, as Excel writes them
        except (json.JSONDecodeError, RecursionError):
            decoded = None
        if isinstance(decoded, list):
            raw_turns = decoded
        elif isinstance(decoded, str):
            raw_turns, repairs = [decoded], ["json_string"]
        else:
            # Not JSON, or a bare number / `true`: more likely plain text that happens to parse as JSON.
            raw_turns, repairs = [text], ["plain_text"]
    if not raw_turns:
        return [""], repairs + ["empty_list"]
    turns: list[str] = []
    for raw in raw_turns:
        text, kind = turn_to_text(raw)
        if kind:
            repairs.append(kind)
        text, had_surrogates = fix_surrogates(text)
        if had_surrogates:
            repairs.append("lone_surrogate")
        turns.append(text)
    return turns, repairs


def parse_label(row_id: str, values: dict[str, Any], source: str) -> tuple[int, bool]:
    """Label index from the three winner columns (accepts 1, "1", 1.0, "1.0", True / "true", as parquet and
    spreadsheets write them); names the id on error."""
    parsed = []
    repaired = False
    for column in LABEL_COLUMNS:
        raw = values[column]
        text = str(raw).strip()
        if isinstance(raw, (bool, np.bool_)) or text.lower() in ("true", "false"):
            parsed.append(int(text.lower() == "true"))
            repaired = True
            continue
        try:
            number = float(text)
        except ValueError:
            raise UserError(f"{source}: row id {row_id}: column {column} is {text!r}, expected 0 or 1") from None
        if number not in (0.0, 1.0):
            raise UserError(f"{source}: row id {row_id}: column {column} is {text!r}, expected 0 or 1")
        repaired |= text not in ("0", "1")
        parsed.append(int(number))
    if sum(parsed) != 1:
        raise UserError(
            f"{source}: row id {row_id}: expected exactly one winner among {', '.join(LABEL_COLUMNS)}, "
            f"got {sum(parsed)}"
        )
    return parsed.index(1), repaired


def normalise_id(raw: Any) -> str:
    """Ids are kept as text, exactly (" 5" and "5" are different ids); a float that pandas upcast from an integer
    column (`123.0`) becomes "123". A missing id becomes "" (reported by the caller with its row)."""
    if raw is None or (isinstance(raw, float) and math.isnan(raw)) or raw is pd.NA:
        return ""
    if isinstance(raw, float) and raw.is_integer():
        return str(int(raw))
    return str(raw)


def parse_frame(raw: pd.DataFrame, source: str, with_labels: bool) -> PairData:
    """Validate and repair a raw Kaggle-layout frame. Extra columns are ignored."""
    raw = raw.rename(columns=lambda c: str(c).strip().lstrip("\ufeff"))
    required = TRAIN_COLUMNS if with_labels else TEST_COLUMNS
    missing = [c for c in required if c not in raw.columns]
    if missing:
        raise UserError(f"{source}: missing required column {', '.join(missing)} (has: {', '.join(map(str, raw.columns))})")
    if len(raw) == 0:
        raise UserError(f"{source}: no rows")
    ids = [normalise_id(v) for v in raw["id"].tolist()]
    for position, row_id in enumerate(ids):
        if row_id.strip() == "":
            raise UserError(f"{source}: row {position + 2}: empty or null id")
    duplicated = pd.Series(ids)[pd.Series(ids).duplicated()]
    if len(duplicated):
        raise UserError(f"{source}: duplicate id {duplicated.iloc[0]} ({duplicated.nunique()} duplicated ids in all)")

    repairs: Counter[str] = Counter()
    n_repaired = 0
    columns: dict[str, list] = {c: [] for c in TEXT_COLUMNS}
    labels: list[int] = []
    records = raw.to_dict("records")
    for row_id, record in zip(ids, records):
        row_repairs: list[str] = []
        for column in TEXT_COLUMNS:
            turns, kinds = parse_turns(record[column])
            columns[column].append(turns)
            row_repairs += kinds
        if with_labels:
            label, label_repaired = parse_label(row_id, record, source)
            labels.append(label)
            if label_repaired:
                row_repairs.append("label_format")
        else:
            labels.append(NO_LABEL)
        if row_repairs:
            n_repaired += 1
            repairs.update(row_repairs)
    frame = pd.DataFrame({"id": pd.Series(ids, dtype=object), **columns, "label": np.asarray(labels, dtype=np.int64)})
    # Other columns (model_a, source, ...) ride along as text: cv.group_by may name one.
    for column in raw.columns:
        if column not in frame.columns and column not in LABEL_COLUMNS:
            frame[column] = raw[column].astype(str).to_numpy()
    return PairData(frame=frame, source=source, n_repaired=n_repaired, repairs=dict(sorted(repairs.items())))


def read_table(path: str | Path) -> pd.DataFrame:
    """Read a CSV (UTF-8, BOM and CRLF tolerated) or parquet file with every cell as text or native value."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a folder; give the CSV or parquet file inside it")
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    if path.suffix.lower() in (".parquet", ".pq"):
        try:
            return pd.read_parquet(path)
        except Exception as exc:  # pyarrow raises many types for a corrupt file
            raise UserError(f"{path}: not a readable parquet file ({type(exc).__name__}: {exc})") from None
    data = decompress(path, path.read_bytes())
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 (invalid byte at offset {exc.start}); re-save the file as UTF-8") from None
    try:
        return pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise UserError(f"{path}: no rows") from None
    except pd.errors.ParserError as exc:
        raise UserError(f"{path}: malformed CSV ({str(exc).strip()})") from None


def decompress(path: Path, data: bytes) -> bytes:
    """A compressed CSV (gzip, bzip2, xz, or a zip holding one file), recognised by its first bytes whatever its
    name; any other file as it is."""
    import bz2
    import gzip
    import lzma
    import zipfile

    try:
        if data[:2] == b"\x1f\x8b":
            return gzip.decompress(data)
        if data[:3] == b"BZh":
            return bz2.decompress(data)
        if data[:6] == b"\xfd7zXZ\x00":
            return lzma.decompress(data)
        if data[:4] == b"PK\x03\x04":
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                names = [n for n in archive.namelist() if not n.endswith("/")]
                if len(names) != 1:
                    raise UserError(f"{path}: a zip archive must hold exactly one CSV file (holds {len(names)})")
                return archive.read(names[0])
    except (OSError, EOFError, lzma.LZMAError, zipfile.BadZipFile, ValueError) as exc:
        raise UserError(f"{path}: a damaged compressed file ({exc})") from None
    return data


def load_pairs(path: str | Path, with_labels: bool) -> PairData:
    """Read and validate one train (with_labels) or test file."""
    return parse_frame(read_table(path), source=str(path), with_labels=with_labels)


def pair_keys(frame: pd.DataFrame, swap: bool = False) -> np.ndarray:
    """A content key per row: the prompt and both responses (all turns), responses in A/B order or swapped. Two
    rows with equal keys are the same pair whatever their ids."""
    first, second = ("response_b", "response_a") if swap else ("response_a", "response_b")
    return np.asarray(["\x1e".join("\x1f".join(turns) for turns in cells)
                       for cells in zip(frame["prompt"], frame[first], frame[second])], dtype=object)


def shared_pairs(frame: pd.DataFrame, other: pd.DataFrame) -> list[str]:
    """Ids of `frame` whose pair (prompt and responses, in either A/B order) is also a row of `other`."""
    known = set(pair_keys(other))
    keys, swapped = pair_keys(frame), pair_keys(frame, swap=True)
    return [str(i) for i, key, mirror in zip(frame["id"], keys, swapped) if key in known or mirror in known]


def swap_label(label: int) -> int:
    """The label of the same pair with response_a and response_b exchanged (a<->b, tie stays)."""
    return {0: 1, 1: 0, 2: 2, NO_LABEL: NO_LABEL}[int(label)]


def swap_probabilities(probs: np.ndarray) -> np.ndarray:
    """Probabilities predicted for the swapped pair, put back in the original orientation."""
    return probs[..., [1, 0, 2]]
