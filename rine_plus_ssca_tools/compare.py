"""The compare command: is A better than B on the same test images, and by how much?

    python rine_plus_ssca.py compare --a runs/rine/seed_*/best_rine_plus_ssca.pth \
        --b runs/full/seed_*/best_rine_plus_ssca.pth --data data/test --names rine full

Each side is one checkpoint or several (seeds of one configuration), given as checkpoints (scored here
on --data) or as the per-image score files that eval writes (<table>_scores.csv). Per row and for the
mean row it prints each side's mean +- std over its checkpoints, the difference A - B and a paired
bootstrap interval of it (images resampled, the same images for both sides; with several checkpoints
per side the checkpoints are resampled too), and McNemar's exact test for the accuracy.
"""

import csv
from pathlib import Path

import numpy as np

import rine_plus_ssca as rps
from rine_plus_ssca_tools import statistics


def build_compare_parser():
    """Options of the compare command."""
    parser = rps.OneLineErrorParser(
        prog="rine_plus_ssca.py compare", allow_abbrev=False,
        description="Compare two checkpoints, or two groups of them (e.g. seeds), on the same test images: the "
                    "difference per row with a paired bootstrap interval, and McNemar's test for the accuracy.")
    parser.add_argument("--a", nargs="+", required=True, metavar="FILE",
                        help="side A: checkpoints (.pth) or eval's per-image score files (_scores.csv)")
    parser.add_argument("--b", nargs="+", required=True, metavar="FILE", help="side B, the same way")
    parser.add_argument("--names", nargs=2, default=["A", "B"], metavar=("NAME_A", "NAME_B"),
                        help="what to call the two sides in the tables and file names")
    parser.add_argument("--data", default=None, help="test folder to score checkpoints on (not needed for score files)")
    parser.add_argument("--protocol", default=None, help="protocol file, as for eval")
    parser.add_argument("--real-dir", default=None, help="shared real images, as for eval")
    parser.add_argument("--max-per-class", type=int, default=None, help="seeded sample of at most N images per class and row")
    parser.add_argument("--tencrop", action="store_true", help="score ten crops, as for eval")
    parser.add_argument("--condition", default="clean", help='which condition of score files to compare, e.g. "jpeg quality 50" (default: clean)')
    parser.add_argument("--bootstrap", type=int, default=1000, metavar="N", help="bootstrap resamples for the intervals")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and of the --max-per-class sample")
    parser.add_argument("--out", default=".", help="folder for the CSV, Markdown and plot (default: here)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=4)
    parser.add_argument("--clip-model", default=None, help="load the backbone from here instead of the checkpoints' CLIP_MODEL")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    return parser


def read_score_file(path, condition):
    """One side's entry from eval's per-image scores: {"source", "rows": {row: {path: (label, P(fake))}},
    "rule": (threshold, strict), "protocol"}."""
    with open(path, newline="") as f:
        records = list(csv.DictReader(f))
    if not records or not set(rps.SCORE_COLUMNS) <= set(records[0]):
        raise rps.UserError(f"{path} is not a per-image score file written by eval (columns {', '.join(rps.SCORE_COLUMNS)}); "
                            "give checkpoints or eval's <table>_scores.csv.")
    chosen = [r for r in records if r["condition"] == condition]
    if not chosen:
        found = ", ".join(dict.fromkeys(r["condition"] for r in records))
        raise rps.UserError(f"{path} holds no {condition!r} scores; it has: {found}. Choose one with --condition.")
    rows = {}
    for r in chosen:
        rows.setdefault(r["row"], {})[r["path"]] = (int(r["label"]), float(r["p_fake"]))
    return {"source": str(path), "rows": rows, "rule": (float(chosen[0]["threshold"]), chosen[0]["fake_when"] == ">"),
            "protocol": chosen[0]["protocol"]}


def score_checkpoint(path, args, items):
    """One side's entry from a checkpoint scored on the test items (the clean images)."""
    model = rps.load_detector(path, clip_model=args.clip_model, device=args.device)
    _, kept, labels, probs, _ = rps.evaluate_items(model, items, args.batch_size, args.num_workers, tencrop=args.tencrop)
    rows = {}
    for (image, label, row), p in zip(kept, probs):
        rows.setdefault(row, {})[image] = (int(label), float(p))
    return {"source": str(path), "rows": rows, "rule": (model.config["THRESHOLD"], rps.scores_as_rine(model.config)),
            "protocol": args.protocol or ""}


def read_sides(args):
    """The entries of sides A and B, scored or read, and refused in one line when they do not match."""
    files = [Path(f) for f in args.a + args.b]
    for path in files:
        if not path.is_file():
            raise rps.UserError(f"No file {path}; give checkpoints (.pth) or eval's _scores.csv files.")
    checkpoints = [path for path in files if path.suffix.lower() != ".csv"]
    items = None
    if checkpoints:
        if args.data is None:
            raise rps.UserError(f"{checkpoints[0]} is a checkpoint: give --data (and --protocol if any) to score it, "
                                "or give eval's _scores.csv files instead.")
        if args.condition != "clean":
            raise rps.UserError("checkpoints are scored on the clean images; for another --condition give eval's "
                                "_scores.csv files written with that perturbation.")
        items = rps.collect_test_items(args.data, args.real_dir, args.max_per_class, args.seed, args.protocol)
    entries = [read_score_file(path, args.condition) if path.suffix.lower() == ".csv" else score_checkpoint(path, args, items)
               for path in files]
    check_same_images(entries)
    return entries[:len(args.a)], entries[len(args.a):]


def check_same_images(entries):
    """UserError unless every entry scored the same images, in the same rows, under the same protocol."""
    first = entries[0]
    for entry in entries[1:]:
        if entry["protocol"] != first["protocol"]:
            raise rps.UserError(f"{entry['source']} was scored with protocol {entry['protocol'] or 'none'!r} and "
                                f"{first['source']} with {first['protocol'] or 'none'!r}; compare scores of one protocol.")
        if set(entry["rows"]) != set(first["rows"]):
            raise rps.UserError(f"{entry['source']} and {first['source']} have different rows "
                                f"({sorted(set(entry['rows']) ^ set(first['rows']))[:3]}); score both on the same images.")
        for row, images in first["rows"].items():
            other = entry["rows"][row]
            if {p: v[0] for p, v in images.items()} != {p: v[0] for p, v in other.items()}:
                differing = sorted(set(images) ^ set(other)) or [p for p in images if images[p][0] != other[p][0]]
                raise rps.UserError(f"{entry['source']} and {first['source']} scored other images in row {row!r} "
                                    f"({len(other)} vs {len(images)}, e.g. {differing[0]}); compare needs the same "
                                    "images on both sides.")


def paired_arrays(entries):
    """(rows [(name, labels)], per entry [P(fake) per row]) with every entry's images in one order."""
    order = {row: sorted(images) for row, images in entries[0]["rows"].items()}
    rows = [(row, np.array([entries[0]["rows"][row][p][0] for p in paths])) for row, paths in order.items()]
    probs = [[np.array([entry["rows"][row][p][1] for p in paths]) for row, paths in order.items()] for entry in entries]
    return rows, probs


def comparison_table(results, names):
    """(columns, printable rows, CSV rows) of compare_groups' result."""
    a, b = names
    columns = ["generator", "metric", a, b, f"{a} - {b}", "95% interval", "McNemar p"]
    csv_columns = ["generator", "images", "metric", f"{a}_mean", f"{a}_std", f"{b}_mean", f"{b}_std", "difference",
                   "low", "high", "mcnemar_p"]
    printed, written = [], []
    for result in results:
        for metric in statistics.METRICS:
            m = result[metric]
            if np.isnan(m["difference"]):
                continue
            p = result["mcnemar_p"] if metric == "acc" and result["mcnemar_p"] is not None else None
            printed.append([result["row"], metric, _mean_std(m["a_mean"], m["a_std"]), _mean_std(m["b_mean"], m["b_std"]),
                            f"{m['difference']:+.4f}", f"[{m['interval'][0]:+.4f}, {m['interval'][1]:+.4f}]",
                            "" if p is None else f"{p:.3g}"])
            written.append([result["row"], result["images"] or "", metric, m["a_mean"], m["a_std"], m["b_mean"],
                            m["b_std"], m["difference"], *m["interval"], "" if p is None else p])
    return columns, printed, csv_columns, written


def _mean_std(mean, std):
    return f"{mean:.4f}" if np.isnan(std) else f"{mean:.4f} ± {std:.4f}"


def run_compare(args):
    """The compare command."""
    rps.check_numbers(args)
    if args.bootstrap < 1:
        raise rps.UserError(f"--bootstrap must be at least 1 for compare (got {args.bootstrap}).")
    side_a, side_b = read_sides(args)
    rows, probs = paired_arrays(side_a + side_b)
    probs_a, probs_b = probs[:len(side_a)], probs[len(side_a):]
    rules_a, rules_b = [e["rule"] for e in side_a], [e["rule"] for e in side_b]
    results = statistics.compare_groups(rows, probs_a, probs_b, rules_a, rules_b, args.bootstrap, args.seed)
    columns, printed, csv_columns, written = comparison_table(results, args.names)
    a, b = args.names
    header = (f"{a}: {len(side_a)} checkpoint(s), {b}: {len(side_b)} checkpoint(s); mean ± std over checkpoints; "
              f"95% paired bootstrap interval of the difference ({args.bootstrap} resamples of the images"
              + (" and of the checkpoints" if max(len(side_a), len(side_b)) > 1 else "") + f", seed {args.seed}); "
              "McNemar: exact test of the accuracy" + (" (the largest p over the pairs A_i, B_i)" if
                                                        max(len(side_a), len(side_b)) > 1 else ""))
    print(header)
    print(rps.format_table(columns, printed))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"compare_{a}_vs_{b}".replace(" ", "_").replace("/", "_")
    with open(out / f"{stem}.csv", "w", newline="") as f:
        csv.writer(f).writerows([csv_columns] + [[rps._cell(v) for v in row] for row in written])
    sources = [f"- {a}: {e['source']}" for e in side_a] + [f"- {b}: {e['source']}" for e in side_b]
    (out / f"{stem}.md").write_text("\n".join([f"# {a} against {b}\n", header + "\n", *sources, "",
                                               rps.format_markdown_table(columns, printed)]) + "\n")
    written_files = [f"{stem}.csv", f"{stem}.md"]
    try:
        plots = rps.tools_module("plots", "compare's plot")
        plots.plot_differences(results, args.names, out / f"{stem}.png")
        written_files.append(f"{stem}.png")
    except ImportError as missing:  # matplotlib absent: the tables are enough
        print(f"note: no plot ({missing})")
    print(f"wrote in {out}: " + ", ".join(written_files))
    return results


COMMANDS = {"compare": (build_compare_parser, run_compare)}  # what the script's main runs
