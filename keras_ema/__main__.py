"""`python -m keras_ema export TRAINING_FILE PLAIN_FILE [--sigma-rel S]`;
`python -m keras_ema soup OUT FILES... [--weights W ...]`."""

import argparse
import sys

from keras_ema import _startup
from keras_ema import loading
from keras_ema.soup import write_soup_file


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m keras_ema",
        description="Tools for files written by keras-ema.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser(
        "export",
        help="write the averages of a training .keras file as a plain model",
        description="Writes a plain .keras model (no optimizer, no keras_ema "
        "needed to load it) holding the averaged weights kept by the "
        "ExponentialMovingAverage or PostHocEMA optimizer of TRAINING_FILE, "
        "whether they were saved swapped in or not. PLAIN_FILE is replaced "
        "whole or not at all.",
    )
    export.add_argument("training_file", metavar="TRAINING_FILE",
                        help="a .keras file saved during training")
    export.add_argument("plain_file", metavar="PLAIN_FILE",
                        help="the .keras file to write")
    export.add_argument("--sigma-rel", type=float, default=None, metavar="S",
                        help="with PostHocEMA, the width to export "
                        "(default: its first)")
    soup = commands.add_parser(
        "soup",
        help="write the average of the weights of saved models (a soup)",
        description="Writes to OUT a plain .keras model (no optimizer) whose "
        "weights are the average of the model weights in FILES (.keras and "
        ".weights.h5 files of one architecture; an optimizer in them is "
        "ignored). The architecture is that of the first .keras file among "
        "FILES. OUT is replaced whole or not at all.",
    )
    soup.add_argument("out", metavar="OUT", help="the .keras file to write")
    soup.add_argument("files", metavar="FILES", nargs="+",
                      help="the .keras and .weights.h5 files to average")
    soup.add_argument("--weights", type=float, nargs="+", default=None,
                      metavar="W", help="one weight per file (default: the "
                      "same for all)")
    args = parser.parse_args(argv)
    _startup.start_quietly()
    if args.command == "soup":
        return _soup(parser, args)
    try:
        loading._export_file(args.training_file, args.plain_file,
                             sigma_rel=args.sigma_rel)
    except (ValueError, OSError) as error:
        # One line: what went wrong and what to do instead.
        message = " ".join(str(error).split())
        print(f"{parser.prog} export: error: {message}", file=sys.stderr)
        return 2
    width = "" if args.sigma_rel is None else f" (sigma_rel={args.sigma_rel})"
    print(f"wrote {args.plain_file}: the averaged weights{width} of "
          f"{args.training_file} as a plain model")
    return 0


def _soup(parser, args):
    try:
        write_soup_file(args.out, args.files, weights=args.weights)
    except (ValueError, OSError) as error:
        message = " ".join(str(error).split())
        print(f"{parser.prog} soup: error: {message}", file=sys.stderr)
        return 2
    kind = "uniform" if args.weights is None else "weighted"
    print(f"wrote {args.out}: the {kind} soup of {len(args.files)} files as "
          "a plain model")
    return 0


if __name__ == "__main__":
    sys.exit(main())
