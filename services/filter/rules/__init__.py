"""Checks run on each message at the end of DATA, in order, before it is queued.

One rule per module, each a small class with a `name` and `async check(...) -> Verdict`.
Spam and virus scanning (issue 3) will be rules here, calling clients in backends/.
"""

from services.filter.rules.bare_newline import BareNewlineRule
from services.filter.rules.base import Rule, Verdict, default_rules, first_refusal

__all__ = ["BareNewlineRule", "Rule", "Verdict", "default_rules", "first_refusal"]
