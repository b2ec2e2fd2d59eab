"""Check shards before a long run: count samples, decode them, show the class histogram and every problem.

    python -m pretrain.data.check SOURCE [SOURCE ...] [--decode all|none|N] [--workers K]

SOURCE is a writer's output directory (all its splits; counts are compared with its index), a
directory of ``.tar`` or ``.parquet`` shards (a Hugging Face Hub dataset repo: every shard below
it), a brace pattern, or shard URLs (``pipe:``, ``http(s)://``, fsspec, ``hf://``). Each shard is
read by its format's reader, as a run reads it; Parquet class names come from the files' metadata.
``--decode N`` decodes every N-th sample of each shard (default: all). The exit code is 1 when
there is any problem, 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import Counter
from contextlib import closing
from multiprocessing import get_context
from pathlib import Path

from pretrain.data import readers
from pretrain.data.hub import repo_shards
from pretrain.data.readers.parquet import Columns, footer
from pretrain.data.shards import INDEX_NAME, BrokenShard, ShardError, is_local, read_index
from pretrain.data.decode import BadSample, decode, label_of
from pretrain.data.urls import expand
from pretrain.errors import reported

MAX_LISTED = 50


def shards_of(sources: list[str]) -> tuple[list[tuple[str, int | None]], list[str] | None]:
    """[(url, samples the index promises or None)], class names if an index names them."""
    shards, classes = [], None
    for source in sources:
        path = Path(source).expanduser()
        if is_local(source) and path.is_dir() and (path / INDEX_NAME).exists():
            index_splits = json.loads((path / INDEX_NAME).read_text()).get("splits", {})
            for split in index_splits:
                found = read_index(path, split)
                shards += list(zip(found.urls, found.counts))
                classes = found.classes
        elif is_local(source) and path.is_dir():
            found = [str(p) for p in repo_shards(path)]
            if not found:
                raise ShardError(f"{path}: no {INDEX_NAME} and no .tar or .parquet shards")
            shards += [(f, None) for f in found]
        else:
            shards += [(url, None) for url in expand(source)]  # footers unread: a broken one is reported
    return shards, classes


def check_shard(job: tuple[str, int | None, int, Columns]) -> dict:
    """Count, and decode every ``every``-th sample of (0: none), one shard; its ClassLabel names."""
    url, expected, every, columns = job
    labels: Counter = Counter()
    problems: list[str] = []
    samples = decoded = 0
    classes = None
    try:
        if readers.format_of(url) == "parquet":
            classes = footer(url, columns)[1].classes
        with closing(readers.reader_for(url).samples(url, columns=columns)) as stream:
            for sample in stream:
                samples += 1
                try:
                    if every and (samples - 1) % every == 0:
                        _, label = decode(sample)
                        decoded += 1
                    else:
                        label = label_of(sample)
                    labels[label] += 1
                except BadSample as e:
                    problems.append(f"{url}: {e}")
    except BrokenShard as e:
        if e.reason == "empty_shard":
            problems.append(f"{url}: empty shard ({e})")
        else:  # named by the reader's own error (ReadError, ArrowInvalid, ...)
            problems.append(f"{url}: unreadable after {samples} samples: {type(e.__cause__ or e).__name__}: {e}")
    if expected is not None and samples != expected:
        problems.append(f"{url}: {samples} samples, the index says {expected}")
    return {"url": url, "samples": samples, "decoded": decoded, "labels": labels, "problems": problems,
            "classes": classes}


def histogram_lines(labels: Counter, classes: list[str] | None) -> list[str]:
    names = classes or [str(c) for c in range(max(labels, default=-1) + 1)]
    counts = [labels.get(i, 0) for i in range(len(names))]
    if not counts:
        return ["no labelled samples"]
    lines = [f"{len(names)} classes; samples per class: min {min(counts)}, median {statistics.median(counts):g}, "
             f"max {max(counts)}; {sum(c == 0 for c in counts)} classes without samples"]
    ranked = sorted(range(len(names)), key=lambda i: (-counts[i], i))
    shown = ranked if len(ranked) <= 40 else ranked[:10] + [None] + ranked[-10:]
    width = max(counts)
    for i in shown:
        if i is None:
            lines.append(f"  ... {len(ranked) - 20} more")
            continue
        bar = "#" * round(30 * counts[i] / width) if width else ""
        lines.append(f"  {names[i]:<24.24} {counts[i]:>8} {bar}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.data.check", description=__doc__.split("\n\n")[0])
    parser.add_argument("sources", nargs="+",
                        help="writer output dir, dir of .tar or .parquet shards, brace pattern or URLs")
    parser.add_argument("--decode", default="all", help="'all' (default), 'none', or N: decode every N-th sample")
    parser.add_argument("--workers", type=int, default=1, help="shards checked in parallel (default 1)")
    parser.add_argument("--image-column", help="Parquet: the image column, if not one the reader looks for "
                                               "(as data.image_column)")
    parser.add_argument("--label-column", help="Parquet: the label column (as data.label_column)")
    args = parser.parse_args(argv)
    if args.decode == "all":
        every = 1
    elif args.decode == "none":
        every = 0
    elif args.decode.isdigit() and int(args.decode) > 0:
        every = int(args.decode)
    else:
        parser.error(f"--decode {args.decode!r}: use all, none or a positive number")
    return reported(_check, args, every)


def _check(args: argparse.Namespace, every: int) -> int:
    """Check the shards ``args.sources`` names, decoding every ``every``-th sample; print the table,
    the class histogram and the problems; 1 when there are problems."""
    shards, classes = shards_of(args.sources)
    columns = Columns(args.image_column, args.label_column)
    jobs = [(url, expected, every, columns) for url, expected in shards]
    if args.workers > 1:
        with get_context("fork" if sys.platform == "linux" else "spawn").Pool(args.workers) as pool:
            results = pool.map(check_shard, jobs)
    else:
        results = [check_shard(job) for job in jobs]
    labels: Counter = Counter()
    problems: list[str] = []
    named = next((r for r in results if r["classes"] is not None), None)
    for r in results:  # every Parquet file's ClassLabel must number the classes alike
        if r["classes"] is not None and r["classes"] != named["classes"]:
            problems.append(f"{r['url']}: its ClassLabel names ({len(r['classes'])}: {r['classes'][:4]}) differ "
                            f"from those of {named['url']} ({len(named['classes'])}: {named['classes'][:4]})")
    if classes is None and named is not None:
        classes = named["classes"]
    print(f"{'shard':<60} {'samples':>8} {'decoded':>8} {'problems':>8}")
    for r in results:
        labels.update(r["labels"])
        problems += r["problems"]
        print(f"{r['url'][-60:]:<60} {r['samples']:>8} {r['decoded']:>8} {len(r['problems']):>8}")
    if classes is not None:
        out_of_range = sorted(label for label in labels if not 0 <= label < len(classes))
        problems += [f"class index {label} ({labels[label]} samples) is outside the {len(classes)} named classes"
                     for label in out_of_range]
    print(f"{sum(r['samples'] for r in results)} samples in {len(results)} shards, "
          f"{sum(r['decoded'] for r in results)} decoded")
    print("\n".join(histogram_lines(labels, classes)))
    if problems:
        print(f"{len(problems)} problems:")
        for line in problems[:MAX_LISTED]:
            print(f"  {line}")
        if len(problems) > MAX_LISTED:
            print(f"  ... and {len(problems) - MAX_LISTED} more")
        return 1
    print("no problems")
    return 0


if __name__ == "__main__":
    sys.exit(main())
