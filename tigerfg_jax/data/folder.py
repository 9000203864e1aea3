"""Reader and validator of the dataset folder format (docs/DATA.md).

  <root>/<split>/items.jsonl    {"item_id": str, "image": path, "title": str}
  <root>/<split>/queries.jsonl  {"query_id": str, "image": path, "item_ids": [str, ...],
                                 "box": [x0, y0, x1, y1] | null}
  <root>/<split>/text_queries.jsonl  (optional) {"query_id": str, "text": str,
                                 "item_ids": [str, ...]}: typed queries, their relevant items

Image paths are relative to the split folder. `box` is the target's box in pixels of
the image of `item_ids[0]` (continuous coordinates: 0 <= x0 < x1 <= width). Every line
and every image is checked (images are decoded); each problem names the file, the line
and what was expected. By default any problem raises one `DatasetError` listing them
all; `skip_bad=True` drops the bad lines instead and reports how many and why. A query
whose positive item was dropped is dropped too. `read_splits` checks every split of a
root and reports the problems of all of them together.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import os

from PIL import Image

ITEMS_FILE = "items.jsonl"
QUERIES_FILE = "queries.jsonl"
TEXT_QUERIES_FILE = "text_queries.jsonl"
# Problems quoted in full in a DatasetError / skip report; the rest are counted.
_MAX_LISTED = 20
SKIP_BAD_FLAG = "--config.data.skip_bad=true"


class DatasetError(ValueError):
  """Invalid dataset folder or records; `problems` holds one line per problem."""

  def __init__(self, message: str, problems: list[str] | None = None):
    self.problems = problems or [message]
    super().__init__(message)


@dataclasses.dataclass(frozen=True)
class ItemRecord:
  """One valid line of items.jsonl; `row` is its index among the split's valid items."""
  row: int
  item_id: str
  image: str
  title: str
  width: int
  height: int


@dataclasses.dataclass(frozen=True)
class QueryRecord:
  """One valid line of queries.jsonl; `positives` are item rows, `box` item pixels."""
  row: int
  query_id: str
  image: str
  positives: tuple[int, ...]
  box: tuple[float, float, float, float] | None


@dataclasses.dataclass(frozen=True)
class TextQueryRecord:
  """One valid line of text_queries.jsonl; `positives` are the relevant item rows."""
  row: int
  query_id: str
  text: str
  positives: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class SplitRecords:
  """A validated split: valid records in file order and the problems skipped;
  `text_queries` is empty when the split has no text_queries.jsonl."""
  name: str
  directory: str
  items: list[ItemRecord]
  queries: list[QueryRecord]
  skipped: list[str]
  text_queries: list[TextQueryRecord] = dataclasses.field(default_factory=list)


def decode_rgb(data: bytes, draft_size: int | None = None) -> Image.Image:
  """Encoded image bytes (any format Pillow reads) -> RGB image, fully decoded.

  With `draft_size` a JPEG may decode at a reduced scale (1/2, 1/4, 1/8) that still
  leaves both sides >= draft_size: much faster for large photos about to be shrunk.
  """
  image = Image.open(io.BytesIO(data))
  if draft_size:
    image.draft("RGB", (draft_size, draft_size))
  image.load()
  return image.convert("RGB")


def eval_splits(root: str) -> list[str]:
  """Split folders of `root` whose name starts with 'eval', sorted."""
  return sorted(name for name in os.listdir(root)
                if name.startswith("eval") and os.path.isdir(os.path.join(root, name)))


def split_names(root: str) -> list[str]:
  """The splits a run reads: 'train', then every eval split."""
  if not os.path.isdir(root):
    raise DatasetError(f"{root}: dataset folder does not exist")
  return ["train", *eval_splits(root)]


def summarize(problems: list[str]) -> str:
  listed = "\n  ".join(problems[:_MAX_LISTED])
  more = len(problems) - _MAX_LISTED
  return listed + (f"\n  ... and {more} more" if more > 0 else "")


def _jsonl_objects(path: str, problems: list[str]):
  """Yields (line number, dict) for each line that is UTF-8 JSON holding an object."""
  try:
    with open(path, "rb") as f:
      raw_lines = f.read().split(b"\n")
  except OSError as e:
    raise DatasetError(f"{path}: cannot read: {e.strerror}") from e
  for number, raw in enumerate(raw_lines, start=1):
    where = f"{path}:{number}"
    try:
      text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
      problems.append(f"{where}: not UTF-8 ({e.reason} at byte {e.start})")
      continue
    if not text.strip():
      continue
    try:
      obj = json.loads(text)
    except json.JSONDecodeError as e:
      problems.append(f"{where}: bad JSON ({e.msg} at column {e.colno})")
      continue
    if not isinstance(obj, dict):
      problems.append(f"{where}: expected a JSON object, got {type(obj).__name__}")
      continue
    yield number, obj


def _non_empty_string(obj: dict, key: str, where: str) -> str:
  value = obj.get(key)
  if not isinstance(value, str) or not value.strip():
    raise ValueError(f"{where}: field {key!r} must be a non-empty string, got {value!r}")
  return value


def _image_size(split_dir: str, obj: dict, where: str) -> tuple[str, int, int]:
  """(relative path, width, height) of the decodable image named by obj['image']."""
  path = _non_empty_string(obj, "image", where)
  if os.path.isabs(path):
    raise ValueError(f"{where}: image path {path!r} must be relative to {split_dir}")
  full = os.path.join(split_dir, path)
  if not os.path.isfile(full):
    raise ValueError(f"{where}: image file {full} does not exist")
  try:
    with open(full, "rb") as f:
      image = decode_rgb(f.read())
  except Image.UnidentifiedImageError as e:  # Its message names the BytesIO, not the file.
    raise ValueError(f"{where}: cannot decode image {full}: not in an image format "
                     "Pillow reads (or damaged)") from e
  except Exception as e:  # Pillow raises many types for bad data.
    raise ValueError(f"{where}: cannot decode image {full}: {e}") from e
  return path, image.width, image.height


def _box(value, width: int, height: int, where: str):
  """The validated box as a float tuple, or None."""
  if value is None:
    return None
  if (not isinstance(value, list) or len(value) != 4 or
      not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
              for v in value)):
    raise ValueError(f"{where}: field 'box' must be null or [x0, y0, x1, y1] of 4 finite "
                     f"numbers, got {value!r}")
  x0, y0, x1, y1 = (float(v) for v in value)
  if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
    raise ValueError(f"{where}: box {value} must satisfy 0 <= x0 < x1 <= {width} and "
                     f"0 <= y0 < y1 <= {height} (the image of item_ids[0])")
  return x0, y0, x1, y1


def _read_items(split_dir: str,
                problems: list[str]) -> tuple[list[ItemRecord], dict[str, int]]:
  """Valid items and the line of every item_id named (valid or not, to word query errors)."""
  path = os.path.join(split_dir, ITEMS_FILE)
  items, seen = [], {}
  for number, obj in _jsonl_objects(path, problems):
    where = f"{path}:{number}"
    try:
      item_id = _non_empty_string(obj, "item_id", where)
      if item_id in seen:
        raise ValueError(f"{where}: duplicate item_id {item_id!r} "
                         f"(first on line {seen[item_id]})")
      seen[item_id] = number
      title = _non_empty_string(obj, "title", where).strip()
      image, width, height = _image_size(split_dir, obj, where)
    except ValueError as e:
      problems.append(str(e))
      continue
    items.append(ItemRecord(len(items), item_id, image, title, width, height))
  return items, seen


def _new_query_id(obj: dict, where: str, seen: dict[str, int], number: int) -> str:
  """obj['query_id'], a non-empty string not in `seen` (id -> line), which records it."""
  query_id = _non_empty_string(obj, "query_id", where)
  if query_id in seen:
    raise ValueError(f"{where}: duplicate query_id {query_id!r} "
                     f"(first on line {seen[query_id]})")
  seen[query_id] = number
  return query_id


def _positive_rows(obj: dict, where: str, row_of: dict[str, int],
                   item_lines: dict[str, int], skip_bad: bool) -> tuple[int, ...]:
  """The item rows of `obj['item_ids']`: a non-empty list of distinct valid item ids."""
  ids = obj.get("item_ids")
  if (not isinstance(ids, list) or not ids or
      not all(isinstance(i, str) and i for i in ids)):
    raise ValueError(f"{where}: field 'item_ids' must be a non-empty list of item_id "
                     f"strings, got {ids!r}")
  if len(set(ids)) != len(ids):
    raise ValueError(f"{where}: field 'item_ids' lists an item twice: {ids!r}")
  for i in ids:
    if i not in row_of:
      if i not in item_lines:
        raise ValueError(f"{where}: item_id {i!r} is not in {ITEMS_FILE}")
      state = "skipped" if skip_bad else f"see {ITEMS_FILE}:{item_lines[i]}"
      raise ValueError(f"{where}: item_id {i!r} is invalid ({state})")
  return tuple(row_of[i] for i in ids)


def _read_text_queries(split_dir: str, items: list[ItemRecord], item_lines: dict[str, int],
                       skip_bad: bool, problems: list[str]) -> list[TextQueryRecord]:
  """The valid lines of the optional text_queries.jsonl ([] without the file)."""
  path = os.path.join(split_dir, TEXT_QUERIES_FILE)
  if not os.path.isfile(path):
    return []
  row_of = {item.item_id: item.row for item in items}
  queries, seen = [], {}
  for number, obj in _jsonl_objects(path, problems):
    where = f"{path}:{number}"
    try:
      query_id = _new_query_id(obj, where, seen, number)
      text = _non_empty_string(obj, "text", where).strip()
      positives = _positive_rows(obj, where, row_of, item_lines, skip_bad)
    except ValueError as e:
      problems.append(str(e))
      continue
    queries.append(TextQueryRecord(len(queries), query_id, text, positives))
  return queries


def _read_queries(split_dir: str, items: list[ItemRecord], item_lines: dict[str, int],
                  skip_bad: bool, problems: list[str]) -> list[QueryRecord]:
  path = os.path.join(split_dir, QUERIES_FILE)
  row_of = {item.item_id: item.row for item in items}
  queries, seen = [], {}
  for number, obj in _jsonl_objects(path, problems):
    where = f"{path}:{number}"
    try:
      query_id = _new_query_id(obj, where, seen, number)
      positives = _positive_rows(obj, where, row_of, item_lines, skip_bad)
      first = items[positives[0]]
      box = _box(obj.get("box"), first.width, first.height, where)
      image, _, _ = _image_size(split_dir, obj, where)
    except ValueError as e:
      problems.append(str(e))
      continue
    queries.append(QueryRecord(len(queries), query_id, image, positives, box))
  return queries


def _empty_files(split_dir: str) -> list[str]:
  """One line per missing or empty (blank) jsonl file of the split."""
  problems = []
  for name in (ITEMS_FILE, QUERIES_FILE, TEXT_QUERIES_FILE):
    path = os.path.join(split_dir, name)
    if not os.path.isfile(path):
      if name == TEXT_QUERIES_FILE:  # optional.
        continue
      problems.append(f"{path}: missing; a split folder needs {ITEMS_FILE} and "
                      f"{QUERIES_FILE} (docs/DATA.md)")
      continue
    with open(path, "rb") as f:
      if not f.read().strip():
        problems.append(f"{path}: file is empty; expected one JSON object per line "
                        "(docs/DATA.md)")
  return problems


def scan_split(root: str, split: str, *, skip_bad: bool = False
               ) -> tuple[SplitRecords, list[str]]:
  """(the valid records of `root/split`, one line per bad record); raises nothing for
  bad records. `SplitRecords.skipped` holds the bad records' lines when `skip_bad`.

  Raises DatasetError when the split folder or a jsonl file is missing or empty.
  """
  split_dir = os.path.join(root, split)
  if not os.path.isdir(split_dir):
    raise DatasetError(f"{split_dir}: split folder does not exist")
  problems = _empty_files(split_dir)
  if problems:
    raise DatasetError("\n".join(problems), problems)
  problems = []
  items, item_lines = _read_items(split_dir, problems)
  queries = _read_queries(split_dir, items, item_lines, skip_bad, problems)
  text_queries = _read_text_queries(split_dir, items, item_lines, skip_bad, problems)
  records = SplitRecords(split, split_dir, items, queries, problems if skip_bad else [],
                         text_queries)
  return records, problems


def check_scan(records: SplitRecords, problems: list[str], skip_bad: bool) -> None:
  """Raises the DatasetError `read_split` raises for a scan (see there)."""
  if problems and not skip_bad:
    raise DatasetError(f"{len(problems)} problem(s) in {records.directory} "
                       f"({SKIP_BAD_FLAG} skips the bad records):\n  {summarize(problems)}",
                       problems)
  if not records.items or not records.queries:
    raise DatasetError(f"{records.directory}: no valid items or queries left "
                       f"({len(records.items)} items, {len(records.queries)} queries)",
                       problems or None)


def read_split(root: str, split: str, *, skip_bad: bool = False) -> SplitRecords:
  """Reads and validates `root/split`.

  Raises DatasetError listing every problem unless `skip_bad`; then the bad lines are
  left out, logged (count and a sample) and returned in `SplitRecords.skipped`.
  Always raises when a file is missing or empty or no valid item or query is left.
  """
  records, problems = scan_split(root, split, skip_bad=skip_bad)
  check_scan(records, problems, skip_bad)
  if problems:
    logging.warning("skipped %d bad record(s) in %s:\n  %s", len(problems),
                    records.directory, summarize(problems))
  return records


def collect_errors(root: str, names: list[str], read) -> dict:
  """{name: read(name)} for every split, or one DatasetError with the problems of all.

  `read(name)` may raise DatasetError; the others are still read, so one run reports
  every bad split.
  """
  results, errors = {}, []
  for name in names:
    try:
      results[name] = read(name)
    except DatasetError as e:
      errors.append(e)
  if errors:
    problems = [p for e in errors for p in e.problems]
    raise DatasetError(f"{len(errors)} of {len(names)} split(s) of {root} are invalid:\n"
                       + "\n".join(str(e) for e in errors), problems)
  return results


def read_splits(root: str, *, skip_bad: bool = False) -> dict[str, SplitRecords]:
  """Validates every split of `root` (`split_names`) and reports all problems together.

  Returns {split: SplitRecords}; raises one DatasetError listing the problems of every
  bad split (`problems` holds them all), not only of the first.
  """
  return collect_errors(root, split_names(root),
                        lambda name: read_split(root, name, skip_bad=skip_bad))
