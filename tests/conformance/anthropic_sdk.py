"""The official `anthropic` SDK, with strict response validation, against the fake Messages API.

Run by tests/llm_conformance.rs, which starts the fake and scripts its replies in the order this
file consumes them. A failed assertion or a validation error exits non-zero.
"""

import os
import sys

import anthropic

BASE_URL = os.environ["ANTHROPIC_BASE_URL"]
KEY = os.environ["ANTHROPIC_API_KEY"]
MODEL = "claude-sonnet-5-5"

TOOLS = [
    {
        "name": "read_file",
        "description": "Read a file",
        "input_schema": {
            "type": "object",
            "properties": {"path": {"type": "string"}},
            "required": ["path"],
        },
    }
]


def client():
    return anthropic.Anthropic(
        base_url=BASE_URL, api_key=KEY, max_retries=0, _strict_response_validation=True
    )


def check(condition, message):
    if not condition:
        raise AssertionError(message)


def tool_round_trip_non_streaming(c):
    messages = [{"role": "user", "content": "Read main.py"}]
    first = c.messages.create(
        model=MODEL, max_tokens=1024, system="You are a coding agent.", messages=messages,
        tools=TOOLS, tool_choice={"type": "auto"},
    )
    check(first.type == "message" and first.role == "assistant", first)
    check(first.stop_reason == "tool_use", first.stop_reason)
    check([b.type for b in first.content] == ["text", "tool_use"], first.content)
    call = first.content[1]
    check(call.name == "read_file" and call.input == {"path": "main.py"}, call)
    check(first.usage.input_tokens == 25 and first.usage.output_tokens == 12, first.usage)

    messages.append({"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]})
    messages.append({"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": call.id, "content": "def main(): pass"}]})
    second = c.messages.create(model=MODEL, max_tokens=1024, messages=messages, tools=TOOLS)
    check(second.stop_reason == "end_turn", second.stop_reason)
    check(second.content[0].type == "text" and second.content[0].text == "Done.", second.content)


def tool_round_trip_streaming(c):
    messages = [{"role": "user", "content": "Read main.py"}]
    with c.messages.stream(model=MODEL, max_tokens=1024, messages=messages, tools=TOOLS) as stream:
        text = "".join(stream.text_stream)
        first = stream.get_final_message()
    check(text == "Let me read it.", repr(text))
    check([b.type for b in first.content] == ["thinking", "text", "tool_use"], first.content)
    check(first.content[0].signature == "c2lnbmF0dXJl", first.content[0])
    call = first.content[2]
    check(call.input == {"path": "main.py", "lines": [1, 20]}, call.input)
    check(first.stop_reason == "tool_use", first.stop_reason)
    check(first.usage.output_tokens == 12, first.usage)

    messages.append({"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]})
    messages.append({"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": call.id, "content": "def main(): pass"}]})
    # The raw event stream: pings are skipped, every other event validates.
    kinds = []
    for event in c.messages.create(
        model=MODEL, max_tokens=1024, messages=messages, tools=TOOLS, stream=True
    ):
        kinds.append(event.type)
    check(kinds[0] == "message_start" and kinds[-1] == "message_stop", kinds)
    check("ping" not in kinds, kinds)
    check("content_block_delta" in kinds and "message_delta" in kinds, kinds)


def refusal(c):
    message = c.messages.create(
        model=MODEL, max_tokens=1024, messages=[{"role": "user", "content": "something bad"}]
    )
    check(message.stop_reason == "refusal", message.stop_reason)
    check(message.stop_details is not None and message.stop_details.type == "refusal", message)


def errors(c):
    expected = [
        (anthropic.OverloadedError, 529),
        (anthropic.RateLimitError, 429),
        (anthropic.InternalServerError, 500),
        (anthropic.AuthenticationError, 401),
        (anthropic.PermissionDeniedError, 403),
    ]
    for cls, status in expected:
        try:
            c.messages.create(model=MODEL, max_tokens=16, messages=[{"role": "user", "content": "hi"}])
        except cls as e:
            check(e.status_code == status, (cls, e.status_code))
        else:
            raise AssertionError(f"expected {cls.__name__}")
    # An error event in the middle of a 200 stream.
    try:
        for _ in c.messages.create(
            model=MODEL, max_tokens=16, messages=[{"role": "user", "content": "hi"}], stream=True
        ):
            pass
    except anthropic.APIStatusError as e:
        check("Overloaded" in str(e), str(e))
    else:
        raise AssertionError("expected an APIStatusError from the stream")


def main():
    c = client()
    tool_round_trip_non_streaming(c)
    tool_round_trip_streaming(c)
    refusal(c)
    errors(c)
    print("anthropic SDK conformance: ok")


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # noqa: BLE001 - report anything as a failure
        print(f"FAILED: {type(e).__name__}: {e}", file=sys.stderr)
        raise
