"""`python -m keras_ema export TRAINING_FILE PLAIN_FILE [--sigma-rel S]`;
`python -m keras_ema soup OUT FILES... [--weights W ...]`."""

import argparse
import os
import sys
import zipfile

import keras

from keras_ema import _startup
from keras_ema import loading
from keras_ema._files import atomic_path
from keras_ema._soup_files import check_path
from keras_ema.export import rebuilding
from keras_ema.soup import soup


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
        return _fail(parser, "export", error)
    width = "" if args.sigma_rel is None else f" (sigma_rel={args.sigma_rel})"
    print(f"wrote {args.plain_file}: the averaged weights{width} of "
          f"{args.training_file} as a plain model")
    return 0


def _fail(parser, command, error):
    """One line on standard error: what went wrong and what to do instead;
    the exit status 2."""
    message = " ".join(str(error).split())
    print(f"{parser.prog} {command}: error: {message}", file=sys.stderr)
    return 2


def _soup(parser, args):
    try:
        _write_soup_file(args.out, args.files, weights=args.weights)
    except (ValueError, OSError) as error:
        return _fail(parser, "soup", error)
    kind = "uniform" if args.weights is None else "weighted"
    print(f"wrote {args.out}: the {kind} soup of {len(args.files)} files as "
          "a plain model")
    return 0


def _write_soup_file(out, files, weights=None):
    """`python -m keras_ema soup`: the soup of `files` in the model of the
    first `.keras` file among them, saved as a plain `.keras` file (no
    optimizer) to `out`, atomically. Returns the model."""
    out = os.fspath(out)
    files = [check_path(f, "keras_ema soup") for f in files]
    if not out.endswith(".keras"):
        raise ValueError(
            "keras_ema soup does not support the file type of "
            f"OUT={out!r}. Instead, pass a path that ends in `.keras`."
        )
    folder = os.path.dirname(out) or os.curdir
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            f"keras_ema soup found no folder {folder!r} for OUT={out!r}. "
            "Instead, create it first."
        )
    if os.path.exists(out) and any(os.path.samefile(out, f) for f in files):
        raise ValueError(
            "keras_ema soup does not support writing over one of FILES. "
            "Instead, pass another OUT."
        )
    architecture = next((f for f in files if f.endswith(".keras")), None)
    if architecture is None:
        raise ValueError(
            "keras_ema soup does not support `.weights.h5` files alone: they "
            "hold values, not the architecture. Instead, add a `.keras` file "
            "of the architecture among FILES, or call `keras_ema.soup(files, "
            "model)` from Python."
        )
    if not zipfile.is_zipfile(architecture):
        raise ValueError(
            "keras_ema soup does not support files that are not Keras "
            f"archives: {architecture!r} cannot be read as one. Instead, "
            "pass `.keras` files written by `model.save`."
        )
    with rebuilding("keras_ema soup"):
        # No compile: the soup is written plain, and a custom loss or metric
        # would need its code.
        model = keras.models.load_model(architecture, compile=False)
    soup(files, model, weights=weights)
    with atomic_path(out) as path:
        model.save(path)
    return model


if __name__ == "__main__":
    sys.exit(main())
