"""Checks run on each message at the end of DATA, in order, before it is queued.

One rule per module, each a small class with a `name` and `async check(...) -> Verdict`.
Spam and virus scanning are rules here too, calling the scanner clients in backends/.
"""

from services.filter.rules.bare_newline import BareNewlineRule
from services.filter.rules.base import (
    Decision,
    Rule,
    Verdict,
    default_rules,
    evaluate,
    format_headers,
)

__all__ = ["BareNewlineRule", "Decision", "Rule", "Verdict", "default_rules", "evaluate",
           "format_headers"]
