"""The `nnpatch` console command.

    nnpatch sweep                                   # IOI model, its default pairs, resid_pre x pos
    nnpatch sweep --model table-max --site attn_out --by layer --out table.html
    nnpatch sweep --clean "When Mary and John went to the store, John gave a drink to" \\
                  --corrupt "When Mary and John went to the store, Mary gave a drink to" \\
                  --answer " Mary" --wrong " John"
    nnpatch lab                                     # JupyterLab on the notebooks/ folder

`sweep` runs `nnpatch.activation_patching` (or `attribution_patching` with --attribution) on a
bundled model, prints a compact text heatmap and writes the interactive plotly heatmap as a
self-contained HTML file.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from .errors import NNPatchError, NNPatchValueError
from .patching.metrics import REGISTRY


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `nnpatch` command; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except NNPatchError as e:
        print(f"nnpatch {args.command}: error: {e}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nnpatch", description="Causal interventions on language models.")
    commands = parser.add_subparsers(dest="command")

    sweep = commands.add_parser("sweep", help="activation patching heatmap of a bundled model",
                                description="Sweep a site of a bundled model over its default prompt pairs "
                                            "(or one pair you give), print a text heatmap, write HTML.")
    sweep.add_argument("--model", default="ioi", help="bundled model name (default: ioi)")
    sweep.add_argument("--site", default="resid_pre", help="standard site (default: resid_pre)")
    sweep.add_argument("--by", default="layer,pos", help="layer | layer,pos | layer,head | layer,head,pos")
    sweep.add_argument("--metric", default="logit_diff", metavar="METRIC",
                       help="; ".join(f"{m.name}: {m.description}" for m in REGISTRY.values())
                       + " (default: logit_diff)")
    sweep.add_argument("--direction", default="denoise", choices=["denoise", "noise"])
    sweep.add_argument("--clean", help="clean prompt (default: the model's task pairs)")
    sweep.add_argument("--corrupt", help="corrupt prompt, same number of tokens as --clean")
    sweep.add_argument("--answer", help="the clean answer token, e.g. ' Mary'")
    sweep.add_argument("--wrong", help="the corrupt answer token, e.g. ' John'")
    sweep.add_argument("--pairs", type=int, default=8, help="number of default task pairs (default: 8)")
    sweep.add_argument("--attribution", action="store_true", help="attribution patching instead")
    sweep.add_argument("--out", default="results.html", help="interactive heatmap (default: results.html)")
    sweep.add_argument("--save", help="also save the result (.safetensors, reload with PatchingResult.load)")
    sweep.set_defaults(run=_sweep)

    lab = commands.add_parser("lab", help="open JupyterLab on the notebooks/ folder")
    lab.add_argument("--dir", help="folder to open (default: ./notebooks, else the one beside nnpatch)")
    lab.set_defaults(run=_lab)
    return parser


def _sweep(args) -> int:
    from . import models
    from .jupyter import heatmap
    from .patching import activation_patching, attribution_patching
    from .patching.pairs import default_pairs

    model = models.load(args.model)
    if args.clean is not None or args.corrupt is not None:
        if args.clean is None or args.corrupt is None:
            raise NNPatchValueError("give both --clean and --corrupt, or neither to use the model's task pairs")
        clean, corrupt = args.clean, args.corrupt
    else:
        clean, corrupt = default_pairs(args.model, args.pairs), None
    sweep = attribution_patching if args.attribution else activation_patching
    result = sweep(model, clean, corrupt, answer=args.answer, wrong=args.wrong, metric=args.metric,
                   site=args.site, by=args.by, direction=args.direction)
    print(heatmap.text(result))
    heatmap.plot(result).write_html(args.out, include_plotlyjs=True)  # works offline
    print(f"wrote {args.out}")
    if args.save:
        result.save(args.save)
        print(f"saved {args.save}")
    return 0


def _lab(args) -> int:
    folder = Path(args.dir) if args.dir else _notebooks()
    if not folder.is_dir():
        raise NNPatchError(f"no notebooks folder at {folder}; give one with --dir")
    try:
        import jupyterlab  # noqa: F401 - only to say how to install it
    except ImportError:
        raise NNPatchError("JupyterLab is not installed: pip install 'nnpatch[jupyter]'") from None
    return subprocess.call([sys.executable, "-m", "jupyterlab", f"--notebook-dir={folder}"])


def _notebooks() -> Path:
    here = Path.cwd() / "notebooks"
    return here if here.is_dir() else Path(__file__).resolve().parents[1] / "notebooks"


if __name__ == "__main__":
    sys.exit(main())
