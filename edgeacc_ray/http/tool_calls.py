"""Tool calling in the Hermes / Qwen format: tools described to the model, `<tool_call>{"name": ...,
"arguments": {...}}</tool_call>` blocks parsed out of its output, and the grammar that enforces a
call (tool_choice "required" or a named function) so its arguments always parse against the
function's schema.

A chat template that renders `tools` itself (Qwen2.5/Qwen3, Hermes models) gets them as they are;
for one that does not, the tools go into the system prompt and earlier calls and tool answers are
written as Hermes text, so every ChatML model can take part. Another model family's format would be
another class with the same three methods."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from edgeacc_ray.engine.request import StructuredOutput
from edgeacc_ray.http.errors import APIError
from edgeacc_ray.http.protocol.openai import NamedToolChoice, Tool

OPEN, CLOSE = "<tool_call>", "</tool_call>"
# Calls one forced answer may hold (parallel_tool_calls): bounds a model that never leaves the grammar.
MAX_CALLS = 8
_CALL = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*" + re.escape(CLOSE), re.DOTALL)
_SYSTEM_PROMPT = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{{"name": <function-name>, "arguments": <args-json-object>}}\n'
    "</tool_call>"
)


@dataclass
class ParsedCall:
    name: str
    arguments: str  # JSON text

    def to_openai(self, index: int | None = None) -> dict[str, Any]:
        call = {
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }
        return call if index is None else {"index": index, **call}


class HermesTools:
    """The request's tools and tool_choice, in the Hermes format."""

    def __init__(
        self, tools: list[Tool], choice: str | NamedToolChoice | None, parallel: bool
    ) -> None:
        self.tools = {t.function.name: t for t in tools}
        if len(self.tools) != len(tools):
            raise APIError(400, "tool names must be unique", param="tools")
        self.choice = choice or "auto"
        self.parallel = parallel
        if isinstance(self.choice, NamedToolChoice) and self.choice.function.name not in self.tools:
            raise APIError(
                400,
                f"tool_choice names {self.choice.function.name!r}, which is not in tools",
                param="tool_choice",
            )

    @property
    def parses_calls(self) -> bool:
        return self.choice != "none"

    # ---- the prompt ----
    def template_tools(self) -> list[dict[str, Any]]:
        return [t.model_dump(exclude_none=True, by_alias=True) for t in self.tools.values()]

    def describe_in_system_prompt(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """For templates without tool support: the tools go into the system prompt."""
        out = list(messages)
        described = _SYSTEM_PROMPT.format(
            tools="\n".join(json.dumps(t, ensure_ascii=False) for t in self.template_tools())
        )
        if out and out[0]["role"] in ("system", "developer"):
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{described}"}
        else:
            out.insert(0, {"role": "system", "content": described})
        return out

    # ---- the grammar ----
    def grammar(self) -> StructuredOutput | None:
        """For "required" and a named function: output must be tool calls whose arguments follow the
        schema, one (parallel_tool_calls false) or up to MAX_CALLS. After each call the grammar may
        end, and ends where the model leaves it (a newline it does not follow with another call, or
        anything else), so a finished answer stops there instead of being forced into one more."""
        if self.choice in ("auto", "none"):
            return None
        names = (
            [self.choice.function.name]
            if isinstance(self.choice, NamedToolChoice)
            else list(self.tools)
        )
        bodies = [_call_schema(name, self.tools[name]) for name in names]
        body = bodies[0] if len(bodies) == 1 else {"anyOf": bodies}
        repeat = f' ("\\n" call){{0,{MAX_CALLS - 1}}}' if self.parallel else ""
        lark = (
            f'start: call{repeat} "\\n"?\ncall: "{OPEN}\\n" body "\\n{CLOSE}"\n'
            f"body: %json {json.dumps({**body, 'x-guidance': {'whitespace_flexible': False}})}"
        )
        return StructuredOutput("lark", lark, end_when_left=True)

    def stop_strings(self) -> list[str]:
        """parallel_tool_calls=false with tool_choice "auto": generation ends with the first call (the
        grammar of "required" and of a named function already allows only one)."""
        return [CLOSE] if not self.parallel and self.choice == "auto" else []

    # ---- the output ----
    @staticmethod
    def untrim(text: str, stop_reason: str | int | None) -> str:
        """The output with the `</tool_call>` that stopped it put back (a matched stop string is cut)."""
        return text + CLOSE if stop_reason == CLOSE else text

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        """(content before the calls or None, the calls). Blocks that do not parse, or name a tool
        not offered, stay in the content."""
        calls, kept, last = [], [], 0
        for match in _CALL.finditer(text):
            call = self._call(match.group(1))
            if call is None:
                continue
            kept.append(text[last : match.start()])
            last = match.end()
            calls.append(call)
        if not calls:
            return text, []
        kept.append(text[last:])
        content = "".join(kept).strip()
        return content or None, calls if self.parallel else calls[:1]

    def _call(self, body: str) -> ParsedCall | None:
        try:
            data = json.loads(body)
        except json.JSONDecodeError:
            return None
        if not isinstance(data, dict) or data.get("name") not in self.tools:
            return None
        arguments = data.get("arguments", data.get("parameters", {}))
        return ParsedCall(
            data["name"],
            arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False),
        )


class ToolCallStream:
    """Streams text until a `<tool_call>` may begin, then holds the rest back so the calls can be
    parsed whole at the end (sent as complete tool-call deltas)."""

    def __init__(self, tools: HermesTools) -> None:
        self.tools = tools
        self.text = ""
        self.sent = 0
        self.holding = False

    def feed(self, delta: str) -> str:
        """Text that can go out as content now."""
        self.text += delta
        if self.holding:
            return ""
        at = self.text.find(OPEN, self.sent)
        if at != -1:
            self.holding = True
            out, self.sent = self.text[self.sent : at], at
            return out
        end = len(self.text) - _partial_prefix(self.text, OPEN)
        out, self.sent = self.text[self.sent : end], max(self.sent, end)
        return out

    def finish(self, stop_reason: str | int | None = None) -> tuple[str, list[ParsedCall]]:
        """(content still to send, the calls) at the end of the output (`stop_reason`: what ended it)."""
        rest = self.tools.untrim(self.text, stop_reason)[self.sent :]
        if not self.holding:
            return rest, []
        content, calls = self.tools.parse(rest)
        return (content or "") if calls else rest, calls


def _partial_prefix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that begins `marker` (held back in case it completes)."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


def _call_schema(name: str, tool: Tool) -> dict[str, Any]:
    params = tool.function.parameters or {"type": "object", "properties": {}}
    return {
        "type": "object",
        "properties": {"name": {"const": name}, "arguments": params},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def hermes_history(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For templates without tool support: earlier calls and tool answers written as Hermes text."""
    return [_as_hermes_text(m) for m in messages]


def _as_hermes_text(message: dict[str, Any]) -> dict[str, Any]:
    if message.get("tool_calls"):
        blocks = "\n".join(
            f"{OPEN}\n{json.dumps({'name': c['function']['name'], 'arguments': _json(c['function']['arguments'])}, ensure_ascii=False)}\n{CLOSE}"
            for c in message["tool_calls"]
        )
        text = f"{message.get('content') or ''}\n{blocks}".strip()
        return {"role": "assistant", "content": text}
    if message["role"] == "tool":
        return {
            "role": "user",
            "content": f"<tool_response>\n{message.get('content') or ''}\n</tool_response>",
        }
    return message


def _json(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments
