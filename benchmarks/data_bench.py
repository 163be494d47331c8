"""How fast crma reads and tokenises conversational training data: N records of about 200 tokens each.

    python benchmarks/data_bench.py [--records 100000] [--model smollm2-135m] [--out benchmarks/results/data]

Writes N seeded synthetic conversations (a user question, an assistant answer; about 200 SmolLM2 tokens
together) to a JSONL file, then times what `crma add` does with them before training: read and validate
the records (crma.data.read_records) and render them with the model's chat template, tokenise, and mark
the answer tokens (crma.data.build_examples, loss on completions, windows of max_len 512). Prints the
figures and writes them, with the machine's thread count and load, to OUT/data_bench.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

from crma.data import build_examples, read_records  # noqa: E402
from crma.io import write_json  # noqa: E402
from crma.method.models import load_model  # noqa: E402

WORDS = ("the machine water pressure grinder setting coffee espresso milk steam wand clean descale tank filter "
         "warranty error code display light button shot cup temperature minutes litre beans dose tamp basket "
         "portafilter pump valve seal gasket order return shipping refund replace check turn press hold wait "
         "reset manual support team model serial number every week month daily often when after before if").split()


def sentence(rng: random.Random, n: int) -> str:
    words = [rng.choice(WORDS) for _ in range(n)]
    return " ".join(words).capitalize() + "."


def write_records(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            q = sentence(rng, rng.randint(25, 40)).rstrip(".") + "?"
            a = " ".join(sentence(rng, rng.randint(12, 20)) for _ in range(rng.randint(5, 7)))
            f.write(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
                    + "\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=100_000)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "data")
    args = p.parse_args()
    _, tok = load_model(args.model)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "conversations.jsonl"
        write_records(path, args.records)
        size = path.stat().st_size
        start = time.perf_counter()
        records = read_records(path)
        read_s = time.perf_counter() - start
        start = time.perf_counter()
        examples, _, stats = build_examples(records, tok, args.max_len, "window", 0, "completion")
        tokenise_s = time.perf_counter() - start
    total = read_s + tokenise_s
    result = {
        "records": args.records, "file_bytes": size, "model": args.model, "max_len": args.max_len,
        "tokens_read": stats.tokens_read, "tokens_per_record": round(stats.tokens_read / args.records, 1),
        "tokens_trained": stats.tokens_trained, "examples": stats.examples, "tokens_dropped": stats.tokens_dropped,
        "read_seconds": round(read_s, 2), "render_tokenise_seconds": round(tokenise_s, 2),
        "total_seconds": round(total, 2), "records_per_second": round(args.records / total),
        "target_seconds": 60, "within_target": total <= 60,
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM", "default (on)"),
                    "loadavg_before": [round(x, 2) for x in load_before],
                    "loadavg_after": [round(x, 2) for x in os.getloadavg()],
                    "python": platform.python_version(), "platform": platform.platform()},
        "command": "python " + " ".join(sys.argv),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "data_bench.json", result)
    print(f"{args.records} conversational records ({stats.tokens_read / args.records:.0f} tokens each, "
          f"{size / 1e6:.1f} MB): read {read_s:.1f} s + render and tokenise {tokenise_s:.1f} s = {total:.1f} s "
          f"(target <= 60 s: {'met' if total <= 60 else 'MISSED'}); {stats.tokens_trained} answer tokens of "
          f"{stats.tokens_read}; {os.cpu_count()} cpus, load before {load_before[0]:.2f}")
    print(f"wrote {args.out / 'data_bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
