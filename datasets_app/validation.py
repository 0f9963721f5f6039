"""Validate an uploaded JSON Lines dataset in one streaming pass.

`validate_stream` reads a binary file object line by line, never the whole file,
so memory stays flat whatever the upload size: per line a json.loads and the
format checks, and a compact table of line fingerprints to spot duplicates.
Valid examples can be written out at the same time as normalized chat JSONL,
the only thing the training engine reads. Plain Python (no Django).
"""

import json
import sys
from array import array
from collections import Counter
from dataclasses import dataclass, field

from datasets_app.formats import CONVERTED_FORMATS, Issue, check_example, type_name

__all__ = ["Issue", "ValidationReport", "example_lines", "validate_stream"]

MAX_LINE_BYTES = 32 * 1024 * 1024
"""Room for one 20 MB image in base64 with its conversation; a longer line is refused unread."""
RECOMMENDED_MIN_EXAMPLES = 50
_SNIFF_BYTES = 8192
_BOM = b"\xef\xbb\xbf"
_BINARY_SIGNATURES = {
    b"PK\x03\x04": "a ZIP archive (or an .xlsx/.docx file)",
    b"\x1f\x8b": "a gzip archive",
    b"BZh": "a bzip2 archive",
    b"\xfd7zXZ\x00": "an xz archive",
    b"7z\xbc\xaf\x27\x1c": "a 7-Zip archive",
    b"%PDF": "a PDF document",
    b"PAR1": "a Parquet file",
    b"SQLite format 3\x00": "an SQLite database",
    b"\x89PNG": "a PNG image",
    b"\xff\xd8\xff": "a JPEG image",
    b"GIF8": "a GIF image",
}


@dataclass
class ValidationReport:
    ok: bool = True
    format: str = "unknown"
    """chat, function_calling, image, preference, prompt_completion, alpaca, sharegpt, mixed,
    or unknown when no line could be read."""
    examples: int = 0
    """Valid examples, the ones written out."""
    errors: list[Issue] = field(default_factory=list)
    error_counts: dict[str, int] = field(default_factory=dict)
    warnings: list[Issue] = field(default_factory=list)
    warning_counts: dict[str, int] = field(default_factory=dict)
    stats: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "ok": self.ok,
            "format": self.format,
            "examples": self.examples,
            "errors": [issue.to_dict() for issue in self.errors],
            "error_counts": dict(self.error_counts),
            "warnings": [issue.to_dict() for issue in self.warnings],
            "warning_counts": dict(self.warning_counts),
            "stats": self.stats,
        }

    def summary_text(self) -> str:
        """Describe the result in plain text, for a status_details field or a log."""
        if self.ok:
            lines = [f"Valid {self.format} dataset: {self.examples} examples."]
        else:
            total = sum(self.error_counts.values())
            lines = [f"Invalid dataset: {total} error{'s' if total != 1 else ''}; fix them and upload the file again."]
        sections = (("Errors", self.errors, self.error_counts), ("Warnings", self.warnings, self.warning_counts))
        for title, issues, counts in sections:
            if not counts:
                continue
            lines.append(f"{title} by kind: " + ", ".join(f"{code} {count}" for code, count in sorted(counts.items())))
            total = sum(counts.values())
            shown = f" (first {len(issues)} of {total})" if len(issues) < total else ""
            lines.append(f"{title}{shown}:")
            lines.extend(f"  {issue}" for issue in issues)
        return "\n".join(lines)


def validate_stream(fp, *, out=None, max_listed: int = 100) -> ValidationReport:
    """Validate the JSON Lines in binary file object fp; write each valid example, normalized, to out."""
    run = _Run(max_listed)
    for number, raw in _lines(fp, run):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as problem:
            run.error(
                number,
                "",
                "invalid_utf8",
                f"byte {problem.start + 1} (0x{raw[problem.start]:02x}) is not valid UTF-8; save the file as UTF-8",
            )
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as problem:
            run.error(number, "", "invalid_json", _json_problem(text, problem))
            continue
        except RecursionError:
            run.error(number, "", "invalid_json", "the JSON is nested too deeply to be an example")
            continue
        except ValueError:
            # Not a JSONDecodeError: Python refuses to read integers this long (CVE-2020-10735 limit).
            limit = sys.get_int_max_str_digits()
            message = f"a number has more than {limit:,} digits, too long to read; write it as a string"
            run.error(number, "", "invalid_json", message)
            continue
        if not isinstance(obj, dict):
            run.error(number, "", "not_an_object", _not_an_object(obj))
            continue
        checked = check_example(obj)
        run.formats[checked.format] += 1
        run.first_line_of.setdefault(checked.format, number)
        for issue in checked.errors:
            run.error(number, issue.path, issue.code, issue.message)
        if checked.errors:
            continue
        if not run.same_kind(number, checked.format):
            continue
        for issue in checked.warnings:
            run.warn(number, issue.path, issue.code, issue.message)
        first = run.seen.add(hash(raw), number)
        if first is not None:
            run.warn(number, "", "duplicate_example", f"same as line {first}")
        run.count(checked)
        if out is not None:
            # A line already in the normalized shape is copied as it is, sparing a json.dumps.
            same = checked.example == obj  # cheap: the values are the same objects
            out.write((raw if same else _dump(checked.example)) + b"\n")
    return run.finish()


def example_lines(fp):
    """Yield the lines of binary file fp that validation reads as examples, without their endings.

    A BOM, blank lines and surrounding whitespace are dropped exactly as validation
    drops them, so line N here is example N of the normalized file.
    """
    for _, raw in _lines(fp, _Run(max_listed=0)):
        yield raw


class _Run:
    """The state of one validation pass: issues so far, counters, fingerprints."""

    def __init__(self, max_listed: int):
        self.max_listed = max_listed
        self.report = ValidationReport()
        self.error_counts: Counter = Counter()
        self.warning_counts: Counter = Counter()
        self.formats: Counter = Counter()
        self.first_line_of: dict[str, int] = {}
        self.seen = _Fingerprints()
        self.kind: str | None = None
        self.lines = self.blank_lines = self.bytes = 0
        self.examples = self.messages = self.max_messages = self.tool_calls = 0
        self.images = self.inline_images = self.max_image_width = self.max_image_height = 0
        self.without_system = 0

    def error(self, line: int | None, path: str, code: str, message: str) -> None:
        self.error_counts[code] += 1
        if len(self.report.errors) < self.max_listed:
            self.report.errors.append(Issue(line, path, code, message))

    def warn(self, line: int | None, path: str, code: str, message: str) -> None:
        self.warning_counts[code] += 1
        if len(self.report.warnings) < self.max_listed:
            self.report.warnings.append(Issue(line, path, code, message))

    def same_kind(self, line: int, example_format: str) -> bool:
        """Keep a file to one kind: the training engine runs either chat or preference data."""
        kind = "preference" if example_format == "preference" else "chat"
        self.kind = self.kind or kind
        if kind == self.kind:
            return True
        other = "a preference pair" if kind == "preference" else "a chat example"
        self.error(
            line,
            "",
            "inconsistent_format",
            f"{other} in a file of {self.kind} examples; a file holds either chat examples or preference pairs",
        )
        return False

    def count(self, checked) -> None:
        self.examples += 1
        self.messages += checked.messages
        self.max_messages = max(self.max_messages, checked.messages)
        self.tool_calls += checked.tool_calls
        self.without_system += not checked.has_system
        for image in checked.images:
            self.images += 1
            if image is not None:
                self.inline_images += 1
                self.max_image_width = max(self.max_image_width, image.width or 0)
                self.max_image_height = max(self.max_image_height, image.height or 0)

    def _warn_mixed_formats(self) -> None:
        """Lines written in several ways (chat, prompt/completion, alpaca, sharegpt) are all taken,
        each converted to chat; say so, since a stray line of another kind is often a mistake."""
        families = Counter()
        first = {}
        for name, count in self.formats.items():
            family = name if name in CONVERTED_FORMATS else ("chat" if name != "unknown" else None)
            if family:
                families[family] += count
                first[family] = min(first.get(family, self.first_line_of[name]), self.first_line_of[name])
        if len(families) < 2:
            return
        main = families.most_common(1)[0][0]
        others = ", ".join(
            f"{count} {family.replace('_', '/')} (first at line {first[family]})"
            for family, count in families.items()
            if family != main
        )
        self.warn(
            None,
            "",
            "mixed_formats",
            f"most examples are {main.replace('_', '/')}, but {others}; each line is converted to chat, "
            "which is fine if the mix is intended",
        )

    def finish(self) -> ValidationReport:
        report = self.report
        if self.lines == 0 and not self.error_counts:
            self.error(None, "", "empty_file", "the file is empty; expected one JSON example per line")
        elif self.lines == self.blank_lines and not self.error_counts:
            self.error(None, "", "empty_file", "the file holds only blank lines; expected one JSON example per line")
        if self.without_system:
            self.warn(
                None,
                "",
                "no_system_message",
                f"{self.without_system} of {self.examples} examples have no system message; "
                "that is fine if you will not send one when using the model",
            )
        self._warn_mixed_formats()
        if 0 < self.examples < RECOMMENDED_MIN_EXAMPLES:
            self.warn(
                None,
                "",
                "too_few_examples",
                f"only {self.examples} example{'s' if self.examples != 1 else ''}: fine-tuning needs "
                "at least 50 to 100, and several hundred for good results",
            )
        report.examples = self.examples
        report.format = _file_format(self.formats)
        report.error_counts = dict(self.error_counts)
        report.warning_counts = dict(self.warning_counts)
        report.ok = not self.error_counts
        report.stats = {
            "lines": self.lines,
            "blank_lines": self.blank_lines,
            "bytes": self.bytes,
            "examples": self.examples,
            "invalid_lines": self.lines - self.blank_lines - self.examples,
            "messages_per_example": {
                "mean": round(self.messages / self.examples, 2) if self.examples else 0,
                "max": self.max_messages,
            },
            "tool_calls": self.tool_calls,
            "images": self.images,
            "inline_images": self.inline_images,
            "largest_image": [self.max_image_width, self.max_image_height] if self.inline_images else None,
            "duplicates": self.warning_counts["duplicate_example"],
            "examples_without_system": self.without_system,
            "formats": dict(self.formats),
            "conversions": {name: count for name, count in self.formats.items() if name in CONVERTED_FORMATS},
        }
        return report


def _dump(example: dict) -> bytes:
    try:
        return json.dumps(example, ensure_ascii=False).encode()
    except UnicodeEncodeError:  # a lone surrogate escape ("\\ud800") only survives as an escape
        return json.dumps(example).encode()


def _lines(fp, run: _Run):
    """Yield (line number, line without its ending) for each non-blank line, sniffing the start once."""
    readline = fp.readline
    number = 0
    while True:
        raw = readline(MAX_LINE_BYTES + 1)
        if not raw:
            return
        number += 1
        run.lines += 1
        run.bytes += len(raw)
        if number == 1:
            binary = _binary_kind(raw[:_SNIFF_BYTES])
            if binary:
                run.error(
                    None,
                    "",
                    "binary_file",
                    f"this is {binary}, not a JSON Lines text file; export the data as .jsonl",
                )
                return
            if raw.startswith(_BOM):
                raw = raw[len(_BOM) :]
        if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
            run.bytes += _skip_rest_of_line(readline)
            run.error(
                number,
                "",
                "line_too_long",
                f"the line is longer than {MAX_LINE_BYTES // (1024 * 1024)} MB; "
                "is the file JSON Lines, one example per line?",
            )
            continue
        raw = raw.strip()
        if not raw:
            run.blank_lines += 1
            continue
        yield number, raw


def _skip_rest_of_line(readline) -> int:
    skipped = 0
    while True:
        chunk = readline(1024 * 1024)
        skipped += len(chunk)
        if not chunk or chunk.endswith(b"\n"):
            return skipped


def _binary_kind(head: bytes) -> str | None:
    for signature, name in _BINARY_SIGNATURES.items():
        if head.startswith(signature):
            return name
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "UTF-16 text"
    if b"\x00" in head:
        return "a binary file"
    return None


def _json_problem(text: str, problem: json.JSONDecodeError) -> str:
    if text in ("[", "{"):
        return (
            "not valid JSON: the file looks like pretty-printed JSON, "
            "but each example must sit on one line (JSON Lines)"
        )
    if problem.pos >= len(text) or problem.msg.startswith("Unterminated string"):
        return "the line ends before its JSON is complete (cut short?); expected one whole JSON object per line"
    return f"not valid JSON: {problem.msg} at column {problem.colno}"


def _not_an_object(obj) -> str:
    if isinstance(obj, list):
        return "is a JSON array; expected one JSON object per line (JSON Lines), not an array of examples"
    return f'is {type_name(obj)}; expected a JSON object such as {{"messages": [...]}}'


def _file_format(formats: Counter) -> str:
    found = {name for name in formats if name != "unknown"}
    if len(found) == 1:
        return found.pop()
    if not found:
        return "unknown"
    if found <= {"chat", "function_calling"}:
        return "function_calling"
    if found <= {"chat", "image"}:
        return "image"
    return "mixed"


class _Fingerprints:
    """Line fingerprints in flat arrays, about 20 bytes a line instead of ~70 for a set of ints.

    An open-addressing table of 64-bit hashes with the line each was first seen on.
    Python's bytes hash is keyed per process, which is all one pass needs.
    """

    def __init__(self, slots: int = 1 << 16):
        self.keys = array("Q", bytes(8 * slots))
        self.lines = array("I", bytes(array("I").itemsize * slots))
        self.used = 0

    def add(self, key: int, line: int) -> int | None:
        """Remember key; return the line it was first seen on if it was seen before."""
        key = (key & 0xFFFFFFFFFFFFFFFF) or 1  # 0 marks an empty slot
        keys = self.keys
        mask = len(keys) - 1
        slot = key & mask
        while True:
            found = keys[slot]
            if found == key:
                return self.lines[slot]
            if found == 0:
                keys[slot] = key
                self.lines[slot] = line
                self.used += 1
                if self.used * 10 > len(keys) * 7:
                    self._grow()
                return None
            slot = (slot + 1) & mask

    def _grow(self) -> None:
        old_keys, old_lines = self.keys, self.lines
        self.__init__(len(old_keys) * 2)
        keys, lines, mask = self.keys, self.lines, len(self.keys) - 1
        for key, line in zip(old_keys, old_lines, strict=False):
            if key:
                slot = key & mask
                while keys[slot]:
                    slot = (slot + 1) & mask
                keys[slot] = key
                lines[slot] = line
                self.used += 1
