"""Two example tools for the Runs worker, written against its tool interface (services/run_worker/tools/base.py).

word_count counts the words, lines and characters of its `text`; top_words lists the `n` most
frequent words of its `text`. Both refuse arguments that do not fit (a closed schema: an unknown
argument is named too) with a ToolError that is not retryable, so a bad step fails at once instead
of being retried. They are deterministic, touch nothing but their output and return at once
(`instant`), and carry a version: change it when their output for the same arguments changes (the
step cache keys on it).
"""

from __future__ import annotations

import re
from collections import Counter

from services.run_worker.tools import Json, Tool, ToolContext, ToolError, check_args
from shared.tool_args import Arg, Kind, ToolArgs

_WORD = re.compile(r"[^\W_]+(?:['\u2019-][^\W_]+)*")  # letters and digits, with inner apostrophes or hyphens

WORD_COUNT_ARGS = ToolArgs({"text": Arg(required=True, doc="the text to count (may be empty)")},
                           closed=True, tool="word_count")
TOP_WORDS_ARGS = ToolArgs({
    "text": Arg(required=True, doc="the text to read"),
    "n": Arg(Kind.NUMBER, default=3, minimum=1, doc="how many words to list (a whole number >= 1)"),
}, closed=True, tool="top_words")


def _text(args: Json) -> str:
    """The `text` argument, which must be a string (empty is fine)."""
    text = args["text"]
    if not isinstance(text, str):
        raise ToolError(f"text must be a string, got {type(text).__name__}", retryable=False)
    return text


async def word_count(args: Json, ctx: ToolContext) -> Json:
    """Count the words, lines and characters of `text`."""
    check_args(WORD_COUNT_ARGS, args)
    text = _text(args)
    return {"words": len(_WORD.findall(text)), "lines": len(text.splitlines()), "characters": len(text)}


async def top_words(args: Json, ctx: ToolContext) -> Json:
    """The `n` most frequent words of `text` (case folded), most frequent first, ties by first use."""
    check_args(TOP_WORDS_ARGS, args)
    text = _text(args)
    n = TOP_WORDS_ARGS.get(args, "n")
    if n != int(n):
        raise ToolError(f"n must be a whole number, got {n}", retryable=False)
    counts = Counter(word.casefold() for word in _WORD.findall(text))
    return {"top": [{"word": word, "count": count} for word, count in counts.most_common(int(n))]}


WORD_COUNT = Tool("word_count", word_count, version="1", schema=WORD_COUNT_ARGS, instant=True)
TOP_WORDS = Tool("top_words", top_words, version="1", schema=TOP_WORDS_ARGS, instant=True)
