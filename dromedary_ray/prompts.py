"""Prompt documents, written here, rendered through the model's own chat template.

Self-Align §3.2: the model sees the principles, a few exemplars whose answers open with internal
thoughts naming the rules used, then the new query; it continues in the same pattern. We encode
the thoughts between `<thoughts>` tags inside the assistant turn so the parser can split them
from the answer without guessing, and pre-fill the opening tag so the model starts by thinking.
"""

from __future__ import annotations

from typing import Any

from dromedary_ray.principles import PrincipleSet

THOUGHTS_OPEN = "<thoughts>\n"
THOUGHTS_CLOSE = "</thoughts>"

# For base models without a chat template (LLaMA-65B, say): a plain transcript of our own.
PLAIN_ROLES = {"system": "### System", "user": "### User", "assistant": "### Assistant"}
PLAIN_STOP = "\n### User"

Message = dict[str, str]


def principles_system_message(principles: PrincipleSet) -> str:
    rules = "\n".join(f"{r.id} ({r.name}). {r.text}" for r in principles.rules)
    return f"{principles.preamble}\n\nRules:\n{rules}"


def assistant_turn(thoughts: str, answer: str) -> str:
    return f"{THOUGHTS_OPEN}{thoughts}\n{THOUGHTS_CLOSE}\n{answer}"


def self_align_messages(principles: PrincipleSet, query: str) -> list[Message]:
    """The whole Self-Align document as chat messages, ending with the user's query."""
    messages = [{"role": "system", "content": principles_system_message(principles)}]
    for ex in principles.exemplars:
        messages.append({"role": "user", "content": ex.query})
        messages.append({"role": "assistant", "content": assistant_turn(ex.thoughts, ex.answer)})
    messages.append({"role": "user", "content": query})
    return messages


def render_chat(tokenizer: Any, messages: list[Message], prefill: str = "") -> str:
    """Render `messages` ready for the assistant's next turn, followed by `prefill`.

    Uses the tokenizer's chat template when it has one, else our plain transcript format.
    """
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = "".join(f"{PLAIN_ROLES[m['role']]}\n{m['content']}\n\n" for m in messages)
        text += f"{PLAIN_ROLES['assistant']}\n"
    return text + prefill


def chat_stop_strings(tokenizer: Any) -> tuple[str, ...]:
    """Stop strings that end an assistant turn for this tokenizer's format."""
    return () if getattr(tokenizer, "chat_template", None) else (PLAIN_STOP,)


def self_align_prompt(tokenizer: Any, principles: PrincipleSet, query: str) -> str:
    return render_chat(tokenizer, self_align_messages(principles, query), prefill=THOUGHTS_OPEN)
