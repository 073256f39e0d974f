"""Reading a magic's line and cell: option parsers, splitting the line into Python expressions,
and the cell's body checked and indented for the code the magic generates.

Every mistake here is a one-line `UsageError`.
"""
from __future__ import annotations

import argparse
import ast
import difflib
import io
import keyword
import tokenize

from IPython.core.error import UsageError

class Parser(argparse.ArgumentParser):
    """argparse whose errors are one-line UsageErrors that show the magic's usage."""

    def __init__(self, prog: str, usage: str):
        super().__init__(prog=prog, usage=usage, add_help=False, allow_abbrev=False)

    def error(self, message):
        if message.startswith("unrecognized arguments"):
            options = [o for a in self._actions for o in a.option_strings]
            unknown = message.split(":", 1)[1].split()
            close = [c for u in unknown if u.startswith("-") for c in difflib.get_close_matches(u, options, n=1)]
            if close:
                message += f" (did you mean {close[0]}?)"
        raise UsageError(f"{self.prog}: {message}; usage: {self.usage}")


def _trace_parser() -> Parser:
    p = Parser("%%trace", "%%trace MODEL [--generate N] [INPUT ...]")
    p.add_argument("model")
    p.add_argument("--generate", type=_new_tokens, metavar="N")
    p.add_argument("inputs", nargs="*")
    return p


def _new_tokens(text: str) -> int:
    """--generate N: how many tokens to generate, a positive integer."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"--generate takes the number of new tokens (1 or more), got {text!r}")
    return n


def _pair_options(p: Parser) -> Parser:
    p.add_argument("model")
    p.add_argument("--clean", required=True)
    p.add_argument("--corrupt")
    p.add_argument("--answer")
    p.add_argument("--wrong")
    p.add_argument("--metric", default="logit_diff", type=_name)
    p.add_argument("--out", type=_out_name)
    return p


def _patch_parser() -> Parser:
    return _pair_options(Parser(
        "%%patch", "%%patch MODEL --clean EXPR [--corrupt EXPR] [--answer TOK --wrong TOK] "
                   "[--metric NAME] [--out NAME]"))


def _sweep_parser() -> Parser:
    p = _pair_options(Parser(
        "%patch_sweep", "%patch_sweep MODEL --clean EXPR [--corrupt EXPR] [--site SITE] [--by layer,pos] "
                        "[--metric NAME] [--answer TOK --wrong TOK] [--direction denoise|noise] "
                        "[--layers EXPR] [--attribution] [--out NAME]"))
    p.add_argument("--site", default="resid_pre", type=_name)
    p.add_argument("--by", default="layer,pos", type=_name)
    p.add_argument("--direction", default="denoise", choices=("denoise", "noise"))
    p.add_argument("--layers")
    p.add_argument("--attribution", action="store_true")
    return p


def _name(text: str) -> str:
    """A name option (a site, a metric, dims), written bare or as a string literal."""
    if text[:1] in "'\"":
        try:
            return str(ast.literal_eval(text))
        except (ValueError, SyntaxError):
            raise argparse.ArgumentTypeError(f"{text} is not a string") from None
    return text


def _out_name(text: str) -> str:
    if not text.isidentifier() or keyword.iskeyword(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a variable name")
    return text


TRACE, PATCH, SWEEP = _trace_parser(), _patch_parser(), _sweep_parser()


def parse(parser: Parser, line: str) -> argparse.Namespace:
    return parser.parse_intermixed_args(words(line))


def words(line: str) -> list[str]:
    """Split a magic line at spaces outside brackets and strings, keeping each word's text, so that
    option values can be Python expressions: `--clean tasks.ioi(8, seed=1)`, `--answer " Mary"`."""
    words: list[str] = []
    start = end = None  # the current word's columns
    depth = 0
    line = line.strip()
    skip = (tokenize.NEWLINE, tokenize.NL, tokenize.ENDMARKER, tokenize.INDENT, tokenize.DEDENT, tokenize.COMMENT)
    try:
        for tok in tokenize.generate_tokens(io.StringIO(line).readline):
            if tok.type in skip:
                continue
            (_, col), (_, col_end) = tok.start, tok.end
            if start is not None and (depth > 0 or col == end):
                end = col_end
            else:
                if start is not None:
                    words.append(line[start:end])
                start, end = col, col_end
            if tok.type == tokenize.OP:
                depth += tok.string in "([{"
                depth -= tok.string in ")]}"
    except (tokenize.TokenError, SyntaxError) as e:
        raise UsageError(f"cannot split the magic line ({e.args[0]}): check its brackets and quotes") from None
    if start is not None:
        words.append(line[start:end])
    return words


def body(cell: str, magic: str) -> str:
    """The cell's code, checked: a syntax error is reported at its line of the cell (the magic
    line is line 1), since the code the cell runs in is generated around it."""
    if not cell.strip():
        raise UsageError(f"{magic}: the cell is empty; write the trace's body below the magic line")
    try:
        ast.parse(cell)
    except SyntaxError as e:
        text = (e.text or "").strip()
        raise UsageError(f"{magic}: SyntaxError in cell line {(e.lineno or 0) + 1}: {e.msg}"
                         + (f": {text}" if text else "")) from None
    return cell


def indent(code: str, levels: int) -> str:
    """Indent code by `levels` blocks, leaving the inside of multi-line strings as it was."""
    lines = code.splitlines(keepends=True)
    inside = set()  # 0-based lines that continue a multi-line string
    try:
        for tok in tokenize.generate_tokens(io.StringIO(code).readline):
            if tok.type == tokenize.STRING and tok.end[0] > tok.start[0]:
                inside.update(range(tok.start[0], tok.end[0]))  # rows after the first, 0-based
    except (tokenize.TokenError, SyntaxError):
        pass  # the compiler will report the problem at its line
    pad = "    " * levels
    out = [line if i in inside or not line.strip() else pad + line for i, line in enumerate(lines)]
    text = "".join(out)
    return text if text.endswith("\n") else text + "\n"


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split())
