"""Measure validation speed and memory on a synthetic chat file.

    python -m datasets_app.bench_validation --mb 200

Writes a file of about that size to a temporary folder, validates it with the
normalized output written next to it, and prints MB/s and the peak resident
memory of the process (both files are deleted afterwards).
"""

import argparse
import json
import random
import resource
import tempfile
import time
from pathlib import Path

from datasets_app.validation import validate_stream

_WORDS = (
    "the model answers questions about invoices refunds shipping orders accounts passwords "
    "please could you help me with my card payment delivery address thanks a lot for waiting "
    "we have updated your request and sent a confirmation email within two business days"
).split()


def write_synthetic_chat(path: Path, megabytes: int, seed: int = 0) -> int:
    """Write about `megabytes` MB of distinct three-message chat examples to path; return the line count."""
    rng = random.Random(seed)
    sentences = [" ".join(rng.choices(_WORDS, k=rng.randint(8, 40))) for _ in range(2000)]
    target = megabytes * 1024 * 1024
    written = lines = 0
    with path.open("wb") as fp:
        while written < target:
            example = {
                "messages": [
                    {"role": "system", "content": "You are a helpful support assistant."},
                    {"role": "user", "content": f"#{lines} {rng.choice(sentences)}"},
                    {"role": "assistant", "content": " ".join(rng.choices(sentences, k=rng.randint(2, 12)))},
                ]
            }
            line = json.dumps(example).encode() + b"\n"
            fp.write(line)
            written += len(line)
            lines += 1
    return lines


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=200, help="size of the synthetic file in MB")
    parser.add_argument("--no-output", action="store_true", help="validate without writing normalized lines")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "train.jsonl"
        lines = write_synthetic_chat(source, args.mb)
        size = source.stat().st_size
        rss_before = peak_rss_mb()
        started = time.perf_counter()
        with source.open("rb") as fp, open(Path(folder) / "normalized.jsonl", "wb") as out:
            report = validate_stream(fp, out=None if args.no_output else out)
        seconds = time.perf_counter() - started
    print(f"file: {size / 1e6:.1f} MB, {lines:,} lines; ok={report.ok} examples={report.examples:,}")
    print(f"validated in {seconds:.1f} s: {size / 1e6 / seconds:.1f} MB/s")
    print(f"peak RSS: {peak_rss_mb():.0f} MB (before validating: {rss_before:.0f} MB)")


if __name__ == "__main__":
    main()
