"""What the workbench knows about its inputs before anything runs: the prompts' tokens and what
is wrong with them, the model's next-token predictions, and which answer and wrong token fit.

`WorkbenchController` holds one `Inputs` and hands its methods to the view, so the token
preview, the pickers' suggestions and the warnings are computed (and tested) without a browser.

    >>> import nnpatch
    >>> from nnpatch.jupyter.workbench_inputs import Inputs
    >>> inputs = Inputs(nnpatch.models.load("ioi"))
    >>> clean = "When Mary and John went to the store, John gave a drink to"
    >>> corrupt = "When Mary and John went to the store, Mary gave a drink to"
    >>> inputs.suggest(clean, corrupt)
    (' Mary', ' John')
    >>> inputs.fit(clean, corrupt, " Kate", " Tom", origin={"answer": "pair", "wrong": "pair"})
    (' Mary', ' John')
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass

import torch

from ..engine.inputs import input_device, model_limits, token_id
from ..errors import NNPatchError

TOP_K = 8


@dataclass(frozen=True)
class Token:
    text: str  # the token as the tokenizer decodes it
    source: str  # the slice of the prompt it came from ("" when the tokenizer cannot say)
    unknown: bool  # the tokenizer had no token for `source` and used its unknown token


@dataclass(frozen=True)
class Preview:
    """The two prompts' tokens, and where they disagree."""

    clean: list[Token]
    corrupt: list[Token]
    differ: list[int]  # positions (within the shorter prompt) where the tokens differ
    warning: str  # why a run would fail as things stand ("" when it would not)


class Inputs:
    """Tokens, checks and predictions for the prompts and tokens a user types."""

    def __init__(self, model):
        self.model = model
        self.context = model_limits(model.module)[1]  # (limit, config field) or None
        self._logits: dict[str, torch.Tensor] = {}  # prompt -> last-position logits, while typing

    def tokens(self, prompt: str) -> list[Token]:
        tok = self.model.tokenizer
        ids = self.model.to_tokens(prompt) if prompt else []
        texts = [tok.decode([i]) for i in ids]
        unk = getattr(tok, "unk_token_id", None)
        spans = _offsets(tok, prompt, len(ids))
        return [Token(t, s, unk is not None and i == unk and s.strip() != tok.unk_token)
                for i, t, s in zip(ids, texts, spans)]

    def preview(self, clean: str, corrupt: str) -> Preview:
        a, b = self.tokens(clean), self.tokens(corrupt)
        differ = [p for p, (x, y) in enumerate(zip(a, b)) if x.text != y.text]
        return Preview(a, b, differ, self.problem(clean, corrupt, a, b) or "")

    def problem(self, clean: str, corrupt: str, a: list[Token] | None = None,
                b: list[Token] | None = None) -> str | None:
        """Why a run on these prompts would fail, in words; None when it would not."""
        a = self.tokens(clean) if a is None else a
        b = self.tokens(corrupt) if b is None else b
        return _too_long(self.context, a, b) or _prompt_problem(clean, corrupt, a, b)

    # -- the model's predictions ---------------------------------------------------------------------
    def logits(self, prompt: str) -> torch.Tensor | None:
        """The plain model's last-position logits `[vocab]` after `prompt` (None when the model
        cannot read it: empty or longer than its context)."""
        if not prompt or (self.context and len(self.model.to_tokens(prompt)) > self.context[0]):
            return None
        if prompt not in self._logits:
            ids = torch.tensor([self.model.to_tokens(prompt)], device=input_device(self.model.module))
            with torch.no_grad():
                logits = self.model(input_ids=ids).logits[0, -1]  # [vocab]
            if len(self._logits) >= 16:
                self._logits.pop(next(iter(self._logits)))
            self._logits[prompt] = logits.detach().float().cpu()
        return self._logits[prompt]

    def predictions(self, prompt: str, k: int = TOP_K) -> list[tuple[str, float]]:
        """The model's top-k next tokens after `prompt`, with probabilities."""
        logits = self.logits(prompt)
        return [] if logits is None else top(self.model.tokenizer, logits, k)

    def probability(self, prompt: str, token: str) -> float | None:
        """p(token) after `prompt` (None when the token or prompt cannot be read)."""
        logits, i = self.logits(prompt), self.token(token)
        return None if logits is None or i is None else float(torch.softmax(logits, -1)[i])

    def token(self, text: str) -> int | None:
        """The id of a one-token string, or None when it is not one token of the vocabulary."""
        if not text:
            return None
        try:
            return token_id(self.model.tokenizer, text, what="token")
        except NNPatchError:
            return None

    # -- answer and wrong token ----------------------------------------------------------------------
    def suggest(self, clean: str, corrupt: str) -> tuple[str, str]:
        """Answer and wrong token to start from: the clean and the corrupt run's top predictions
        (the corrupt run's best other token when both runs predict the same)."""
        answer = next((t for t, _ in self.predictions(clean) if t), "")  # special tokens decode to ""
        wrong = next((t for t, _ in self.predictions(corrupt) if t and t != answer), "")
        return answer, wrong

    def fits(self, token: str, prompt: str, clean: str, corrupt: str) -> bool:
        """Whether `token` still belongs to these prompts: its word occurs in one of them (IOI's
        names, a table's values), or it is what the run `prompt` predicts most."""
        if self.token(token) is None:
            return False
        word = token.strip()
        best = next(iter(self.predictions(prompt, 1)), ("", 0.0))[0]
        return token == best or bool(word) and (word in clean or word in corrupt)

    def fit(self, clean: str, corrupt: str, answer: str, wrong: str, origin: dict) -> tuple[str, str]:
        """The answer and wrong token after the prompts changed. `origin[name]` says who picked
        each: "user" (typed: kept), "pair" (from an example: kept while it still fits the
        prompts), "auto" (the app's suggestion: follows the new prompts)."""
        suggested = dict(zip(("answer", "wrong"), self.suggest(clean, corrupt)))
        now = {"answer": answer, "wrong": wrong}
        for name, prompt in (("answer", clean), ("wrong", corrupt)):
            how = origin.get(name, "auto")
            stays = now[name] and (how == "user" or how == "pair" and self.fits(now[name], prompt, clean, corrupt))
            if not stays:
                now[name] = suggested[name]
        if now["wrong"] == now["answer"] and origin.get("wrong") != "user":
            now["wrong"] = next((t for t, _ in self.predictions(corrupt) if t and t != now["answer"]), now["wrong"])
        return now["answer"], now["wrong"]

    def answer_warning(self, pairs: list[tuple[str, str]], k: int = TOP_K) -> str:
        """A warning when the answer is not among the clean run's top-k next tokens, for
        (clean prompt, answer) pairs; "" when it is (or when the inputs cannot be read yet)."""
        missing = []
        for clean, answer in pairs:
            p = self.probability(clean, answer)
            if p is not None and all(t != answer for t, _ in self.predictions(clean, k)):
                missing.append((answer, p))
        if not missing:
            return ""
        if len(pairs) == 1:
            answer, p = missing[0]
            return (f"the answer {answer!r} is not among the clean run's top {k} next tokens "
                    f"(p = {p:.3f}): the heatmap would measure a token the model does not predict; "
                    "pick one of the suggested answers")
        return (f"the answer is not among the clean run's top {k} next tokens in {len(missing)} of "
                f"{len(pairs)} pairs (e.g. {missing[0][0]!r}, p = {missing[0][1]:.3f})")


def top(tokenizer, logits: torch.Tensor, k: int = TOP_K, probs: torch.Tensor | None = None) -> list[tuple[str, float]]:
    """The k most likely tokens of `logits` `[vocab]` (or of `probs`), decoded, with probabilities."""
    probs = torch.softmax(logits.detach().float(), dim=-1) if probs is None else probs  # [vocab]
    p, ids = probs.topk(min(k, probs.numel()))
    return [(tokenizer.decode([i]), float(v)) for v, i in zip(p.tolist(), ids.tolist())]


def _too_long(context, a: list[Token], b: list[Token]) -> str | None:
    if context is None:
        return None
    limit, field = context
    for role, tokens in (("clean", a), ("corrupt", b)):
        if len(tokens) > limit:
            return (f"the {role} prompt is {len(tokens)} tokens; this model reads at most {limit} "
                    f"(config.{field}): shorten it")
    return None


def _prompt_problem(clean: str, corrupt: str, a: list[Token], b: list[Token]) -> str | None:
    for role, text in (("clean", clean), ("corrupt", corrupt)):
        if not text.strip():
            return f"the {role} prompt is empty: type a prompt"
    for role, tokens in (("clean", a), ("corrupt", b)):
        unknown = [f"{p} ({t.source!r})" for p, t in enumerate(tokens) if t.unknown]
        if unknown:
            return (f"the {role} prompt has words the model's tokenizer does not know, at position "
                    f"{', '.join(unknown)}: the model would read each as its unknown token. "
                    "Use words of the model's vocabulary")
    if len(a) != len(b):
        return (f"the prompts differ in length: clean has {len(a)} tokens, corrupt has {len(b)}; "
                f"{_where_lengths_part(a, b)}. Patching pairs positions one to one, so edit the "
                "prompts until they have the same number of tokens")
    return None


def _where_lengths_part(a: list[Token], b: list[Token]) -> str:
    """The first stretch where one prompt has more tokens than the other, in words."""
    ta, tb = [t.text for t in a], [t.text for t in b]
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, ta, tb, autojunk=False).get_opcodes():
        if i2 - i1 != j2 - j1:
            def where(start, stop):
                return f"position {start}" if stop - start == 1 else f"positions {start}-{stop - 1}"
            if i1 == i2:
                return f"corrupt has {tb[j1:j2]} at {where(j1, j2)} where clean has none"
            if j1 == j2:
                return f"clean has {ta[i1:i2]} at {where(i1, i2)} where corrupt has none"
            return f"clean has {ta[i1:i2]} at {where(i1, i2)} where corrupt has {tb[j1:j2]}"
    return "the token lists part at the end"


def _offsets(tok, prompt: str, n: int) -> list[str]:
    """The slice of `prompt` behind each token, from a fast tokenizer's offsets."""
    if not prompt:
        return []
    try:
        spans = tok(prompt, return_offsets_mapping=True)["offset_mapping"]
    except (NotImplementedError, TypeError, ValueError, KeyError):
        return [""] * n
    if len(spans) != n:
        return [""] * n
    return [prompt[a:b] for a, b in spans]
