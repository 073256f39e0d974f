"""The `nnpatch` console command (also `python -m nnpatch`).

    nnpatch sweep                                   # IOI model, its default pairs, resid_pre x pos
    nnpatch sweep --model table-max --site attn_out --by layer --out table.html
    nnpatch sweep --clean "When Mary and John went to the store, John gave a drink to" \\
                  --corrupt "When Mary and John went to the store, Mary gave a drink to" \\
                  --answer " Mary" --wrong " John"
    nnpatch sweep --nproc 2 --pairs 64             # the sweep shared by 2 processes (torchrun)
    nnpatch lab                                     # JupyterLab on the notebooks/ folder

`sweep` runs `nnpatch.activation_patching` (or `attribution_patching` with --attribution) on a
bundled model, prints a compact text heatmap and writes the interactive plotly heatmap as a
self-contained HTML file.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from .errors import NNPatchError, NNPatchValueError
from .patching.metrics import REGISTRY

_DESCRIPTION = """\
nnpatch answers "which part of this model does that?" for PyTorch and Hugging Face models:
patching sweeps over a model's layers, positions and heads, on your own machine.

  nnpatch sweep     activation patching of a bundled model: a text heatmap here, an
                    interactive one in results.html
  nnpatch lab       JupyterLab on the tutorial notebooks

In Python: `import nnpatch`, then `nnpatch.models.load("ioi")`, `model.trace()`,
`nnpatch.activation_patching(...)`; in Jupyter: `%load_ext nnpatch`.
"""

_SWEEP_DESCRIPTION = """\
Patch one site of a bundled model, layer by layer (and position by position, or head by head),
over the model's default clean/corrupt prompt pairs or one pair you give. Each cell is the
fraction of the clean logit difference the patch restores (0: corrupt, 1: clean). Prints a text
heatmap and writes the interactive plotly heatmap as a self-contained HTML file.

Bundled models: ioi (GPT-2, 4 layers, indirect object identification) and table-max (Llama,
4 layers, the maximum of a table). Sites: resid_pre, resid_mid, resid_post, attn_out, mlp_out,
head_out (with --by layer,head or layer,head,pos).
"""

_SWEEP_EXAMPLES = """\
examples:
  nnpatch sweep                                     # ioi, 8 pairs, resid_pre by layer x position
  nnpatch sweep --model table-max --site attn_out --by layer --out table.html
  nnpatch sweep --site head_out --by layer,head --attribution
  nnpatch sweep --pairs 256 --nproc 4               # 4 processes share the pairs (torchrun)
  nnpatch sweep --clean "When Mary and John went to the store, John gave a drink to" \\
                --corrupt "When Mary and John went to the store, Mary gave a drink to" \\
                --answer " Mary" --wrong " John" --save ioi.safetensors
"""

_LAB_DESCRIPTION = """\
Open JupyterLab on the tutorial notebooks: quickstart, activation patching of the IOI circuit,
attribution patching, patching across invokes (and Patchscopes), the magics and the workbench.
Needs the jupyter extra: pip install 'nnpatch[jupyter]' (scripts/install.sh installs it).
"""


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `nnpatch` command; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except NNPatchError as e:
        print(f"nnpatch {args.command}: error: {e}", file=sys.stderr)
        return 2


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("nnpatch")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def _parser() -> argparse.ArgumentParser:
    text = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="nnpatch", description=_DESCRIPTION, formatter_class=text,
                                     epilog="Run `nnpatch COMMAND --help` for a command's options.")
    parser.add_argument("--version", action="version", version=f"nnpatch {_version()}")
    commands = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")

    sweep = commands.add_parser("sweep", help="activation patching heatmap of a bundled model",
                                description=_SWEEP_DESCRIPTION, epilog=_SWEEP_EXAMPLES, formatter_class=text)
    sweep.add_argument("--model", default="ioi", help="bundled model: ioi or table-max (default: ioi)")
    sweep.add_argument("--site", default="resid_pre", help="site to patch (default: resid_pre)")
    sweep.add_argument("--by", default="layer,pos", help="layer | layer,pos | layer,head | layer,head,pos "
                                                         "(default: layer,pos)")
    sweep.add_argument("--metric", default="logit_diff", metavar="METRIC",
                       help="; ".join(f"{m.name}: {m.description}" for m in REGISTRY.values())
                       + " (default: logit_diff)")
    sweep.add_argument("--direction", default="denoise", choices=["denoise", "noise"],
                       help="denoise: clean values into the corrupt run; noise: the reverse (default: denoise)")
    sweep.add_argument("--clean", help="clean prompt (default: the model's task pairs)")
    sweep.add_argument("--corrupt", help="corrupt prompt, same number of tokens as --clean")
    sweep.add_argument("--answer", help="the clean answer token, e.g. ' Mary'")
    sweep.add_argument("--wrong", help="the corrupt answer token, e.g. ' John'")
    sweep.add_argument("--pairs", type=int, default=8, help="number of default task pairs (default: 8)")
    sweep.add_argument("--attribution", action="store_true",
                       help="attribution patching: estimate every cell from one backward pass")
    sweep.add_argument("--out", default="results.html", help="interactive heatmap (default: results.html)")
    sweep.add_argument("--save", help="also save the result (.safetensors, reload with PatchingResult.load)")
    sweep.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    sweep.add_argument("--nproc", type=int, default=1, metavar="N",
                       help="share the sweep among N processes on this machine: runs torchrun "
                            "--standalone --nproc-per-node N for you (several machines: see docs/scale.md)")
    sweep.set_defaults(run=_sweep)

    lab = commands.add_parser("lab", help="JupyterLab on the tutorial notebooks",
                              description=_LAB_DESCRIPTION, formatter_class=text)
    lab.add_argument("--dir", help="folder to open (default: ./notebooks, else the one beside nnpatch)")
    lab.set_defaults(run=_lab)
    return parser


def _check_writable(path: str, option: str) -> None:
    """Fail before any work when `path` cannot be written: a missing folder, a folder given as
    the file, a read-only place. A file that does not exist yet is created and removed again."""
    target = Path(path)
    if target.is_dir():
        raise NNPatchValueError(f"{option} {path} is a folder; give a file name")
    existed = target.exists()
    try:
        with open(target, "ab"):
            pass
    except OSError as e:
        raise NNPatchValueError(f"cannot write {option} {path}: {e.strerror}") from None
    if not existed:
        target.unlink()


def _sweep(args) -> int:
    from . import models
    from .jupyter import heatmap
    from .patching import activation_patching, attribution_patching
    from .patching.pairs import default_pairs

    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        _check_writable(args.out, "--out")
        if args.save:
            _check_writable(args.save, "--save")
    if args.nproc < 1:
        raise NNPatchValueError(f"--nproc {args.nproc}: give a number of processes, 1 or more")
    if args.nproc > 1 and "RANK" not in os.environ:
        if args.attribution:
            raise NNPatchValueError("--attribution runs in one process (two forwards and a backward); "
                                    "leave out --nproc")
        return _launch(args)
    model = models.load(args.model)
    if args.clean is not None or args.corrupt is not None:
        if args.clean is None or args.corrupt is None:
            raise NNPatchValueError("give both --clean and --corrupt, or neither to use the model's task pairs")
        clean, corrupt = args.clean, args.corrupt
    else:
        clean, corrupt = default_pairs(args.model, args.pairs), None
    sweep = attribution_patching if args.attribution else activation_patching
    options = {} if args.attribution else {"distributed": None}  # under torchrun: shared among ranks
    result = sweep(model, clean, corrupt, answer=args.answer, wrong=args.wrong, metric=args.metric,
                   site=args.site, by=args.by, direction=args.direction, progress=not args.quiet, **options)
    if rank != 0:  # every rank holds the grid; rank 0 reports it
        return 0
    print(heatmap.text(result))
    heatmap.plot(result).write_html(args.out, include_plotlyjs=True)  # works offline
    print(f"wrote {args.out}")
    if args.save:
        result.save(args.save)
        print(f"saved {args.save}")
    return 0


def _launch(args) -> int:
    """Run this same command under torchrun with N processes on this machine."""
    argv, skip = [], False
    for a in args.argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            argv.append(a)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
               "-m", "nnpatch", *argv]
    return subprocess.call(command)


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
