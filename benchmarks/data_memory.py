"""Memory and time to tokenize and pack a large training file: Python lists against the token store.

    python -m benchmarks.data_memory [--megabytes 100] [--tokenizer var/models/tiny-random-smollm2]

Writes a JSONL file of generated chat examples (one to three turns, a system
prompt on some), then, each in a fresh child process so its peak is its own:

- lists: what the engine did before the token store: every example rendered
  and kept as a RenderedExample of Python int lists (the old `read_jsonl`
  collected them in a list, then kept those with a trained token);
- store: `llm.train.data.load_examples`, which writes ids and masks to flat
  arrays in an anonymous temporary file while the input streams, memory-mapped.

Both then pack the whole file into micro-batches (`llm.train.packing.pack`),
one at a time, as validation and the DPO reference do. Reported per variant:
peak resident memory (ru_maxrss) above the child's resident memory before
loading (Python, torch, transformers and the tokenizer), anonymous memory held after loading
(RssAnon: the heap, not the file pages the kernel may drop), and the seconds
spent loading and packing. The token store's files are written next to the
input file.
"""

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TOKENIZER = REPO / "var" / "models" / "tiny-random-smollm2"
_WORDS = (
    "account balance card payment transfer refund pending declined limit app verify identity "
    "exchange rate fee cash machine contactless top up direct debit statement charge"
).split()


def write_chat_file(path: Path, megabytes: float, *, seed: int = 0) -> int:
    """Write about megabytes of chat examples to path; return how many lines."""
    rng = random.Random(seed)

    def sentence(low: int, high: int) -> str:
        return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(low, high))).capitalize() + "."

    target, written, lines = megabytes * 1e6, 0, 0
    with open(path, "w", encoding="utf-8") as out:
        while written < target:
            messages = [{"role": "system", "content": "You are a bank's support assistant."}] if lines % 3 == 0 else []
            for _ in range(rng.randint(1, 3)):
                messages.append({"role": "user", "content": sentence(6, 30)})
                messages.append({"role": "assistant", "content": " ".join(sentence(5, 25) for _ in range(3))})
            line = json.dumps({"messages": messages}) + "\n"
            out.write(line)
            written += len(line.encode())
            lines += 1
    return lines


def _status_kib(field: str) -> int:
    """A memory figure of this process from /proc/self/status (VmRSS, RssAnon...), in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return 0


def _child(variant: str, path: Path, tokenizer_dir: str, max_seq_len: int, budget: int) -> dict[str, float]:
    """Load and pack path one way, in this process; return the figures."""
    from transformers import AutoTokenizer

    from llm.train.data import load_examples, read_jsonl, render_example
    from llm.train.packing import pack

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    render_example(tokenizer, {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    baseline_rss, baseline_anon = _status_kib("VmRSS"), _status_kib("RssAnon")

    started = time.perf_counter()
    if variant == "lists":
        rendered: list = []
        read_jsonl(
            path,
            lambda example: render_example(tokenizer, example, max_seq_len=max_seq_len),  # type: ignore[arg-type]
            rendered.append,
            name="train_file",
            what="examples",
        )
        examples = [example for example in rendered if example.trained_tokens]
        del rendered
        tokens = sum(len(example.input_ids) for example in examples)
    else:
        examples = load_examples(
            path, tokenizer, loss_on="assistant", max_seq_len=max_seq_len, spill_dir=path.parent
        ).examples
        tokens = examples.tokens
    loaded = time.perf_counter()
    held_anon = _status_kib("RssAnon") - baseline_anon

    batches = packed_tokens = 0
    for batch in pack(examples, budget):
        batches += 1
        packed_tokens += batch.tokens
    packed = time.perf_counter()
    assert packed_tokens == tokens
    return {
        "examples": len(examples),
        "tokens": tokens,
        "batches": batches,
        "load_s": loaded - started,
        "pack_s": packed - loaded,
        "baseline_mib": baseline_rss / 1024,
        "peak_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline_rss) / 1024,
        "held_anon_mib": held_anon / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--megabytes", type=float, default=100, help="size of the generated JSONL file")
    parser.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER), help="a model folder with a chat template")
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch-tokens", type=int, default=8192)
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "FILE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        variant, path = args.child
        figures = _child(variant, Path(path), args.tokenizer, args.max_seq_len, args.micro_batch_tokens)
        print(json.dumps(figures))
        return
    if not Path(args.tokenizer, "tokenizer_config.json").is_file():
        sys.exit(
            f"no tokenizer at {args.tokenizer}: run the tests once (they build the tiny model) or pass --tokenizer"
        )

    with tempfile.TemporaryDirectory(prefix="data-memory-") as folder:
        path = Path(folder) / "train.jsonl"
        lines = write_chat_file(path, args.megabytes)
        print(f"file: {path.stat().st_size / 1e6:.1f} MB, {lines:,} examples; tokenizer {args.tokenizer}")
        results = {}
        for variant in ("lists", "store"):
            command = [sys.executable, "-m", "benchmarks.data_memory", "--child", variant, str(path)]
            command += ["--tokenizer", args.tokenizer, "--max-seq-len", str(args.max_seq_len)]
            command += ["--micro-batch-tokens", str(args.micro_batch_tokens)]
            done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
            if done.returncode:
                sys.exit(f"{variant} failed:\n{done.stderr}")
            results[variant] = figures = json.loads(done.stdout.strip().splitlines()[-1])
            per_token = figures["peak_mib"] * 2**20 / figures["tokens"]
            print(
                f"{variant:>5}: {figures['tokens']:,} tokens in {figures['examples']:,} examples; "
                f"load {figures['load_s']:.1f} s, pack {figures['pack_s']:.1f} s ({figures['batches']:,} micro-batches); "
                f"peak +{figures['peak_mib']:.0f} MiB over {figures['baseline_mib']:.0f} MiB ({per_token:.1f} B/token), "
                f"heap held after load +{figures['held_anon_mib']:.0f} MiB"
            )
        lists, store = results["lists"], results["store"]
        assert (lists["tokens"], lists["examples"]) == (store["tokens"], store["examples"])
        print(
            f"lists / store: peak memory {_ratio(lists['peak_mib'], store['peak_mib'])}, "
            f"heap held {_ratio(lists['held_anon_mib'], store['held_anon_mib'])}, "
            f"load time {_ratio(lists['load_s'], store['load_s'])}, pack time {_ratio(lists['pack_s'], store['pack_s'])}"
        )


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b >= 1 else f"{a:.1f} against under 1"


if __name__ == "__main__":
    main()
