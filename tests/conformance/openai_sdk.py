"""The official `openai` SDK, with strict response validation, against the fake OpenAI API:
Chat Completions and Responses, streamed and not, with a tool round trip each.

Run by tests/llm_conformance.rs, which starts the fake and scripts its replies in the order this
file consumes them. A failed assertion or a validation error exits non-zero.
"""

import json
import os
import sys

import openai

BASE_URL = os.environ["OPENAI_BASE_URL"]
KEY = os.environ["OPENAI_API_KEY"]
MODEL = "gpt-6.1-sol"

PARAMS = {
    "type": "object",
    "properties": {"path": {"type": "string"}},
    "required": ["path"],
}
CHAT_TOOLS = [{"type": "function", "function": {
    "name": "read_file", "description": "Read a file", "parameters": PARAMS}}]
RESPONSES_TOOLS = [{"type": "function", "name": "read_file", "description": "Read a file",
                    "parameters": PARAMS, "strict": False}]


def client():
    return openai.OpenAI(
        base_url=BASE_URL, api_key=KEY, max_retries=0, _strict_response_validation=True
    )


def check(condition, message):
    if not condition:
        raise AssertionError(message)


def chat_non_streaming(c):
    messages = [{"role": "system", "content": "You are a coding agent."},
                {"role": "user", "content": "Read main.py"}]
    first = c.chat.completions.create(
        model=MODEL, messages=messages, tools=CHAT_TOOLS, tool_choice="auto",
        max_completion_tokens=1024,
    )
    choice = first.choices[0]
    check(choice.finish_reason == "tool_calls", choice.finish_reason)
    calls = choice.message.tool_calls
    check(len(calls) == 2, calls)
    check(json.loads(calls[0].function.arguments) == {"path": "main.py"}, calls[0])
    check(calls[1].id == "call_b", calls[1])
    check(first.usage.prompt_tokens == 25 and first.usage.total_tokens == 37, first.usage)

    messages.append(choice.message.model_dump(exclude_none=True))
    for call in calls:
        messages.append({"role": "tool", "tool_call_id": call.id, "content": "def main(): pass"})
    second = c.chat.completions.create(model=MODEL, messages=messages, tools=CHAT_TOOLS)
    check(second.choices[0].finish_reason == "stop", second.choices[0])
    check(second.choices[0].message.content == "Done.", second.choices[0].message)


def chat_streaming(c):
    messages = [{"role": "user", "content": "Read main.py"}]
    text, calls, finish, usage = "", {}, None, None
    for chunk in c.chat.completions.create(
        model=MODEL, messages=messages, tools=CHAT_TOOLS, stream=True,
        stream_options={"include_usage": True},
    ):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            delta = choice.delta
            text += delta.content or ""
            for tc in delta.tool_calls or []:
                acc = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
                acc["id"] = tc.id or acc["id"]
                if tc.function is not None:
                    acc["name"] += tc.function.name or ""
                    acc["arguments"] += tc.function.arguments or ""
            finish = choice.finish_reason or finish
    check(text == "Let me read it.", repr(text))
    check(finish == "tool_calls", finish)
    check(calls[0]["name"] == "read_file", calls)
    check(json.loads(calls[0]["arguments"]) == {"path": "main.py"}, calls)
    check(usage is not None and usage.completion_tokens == 12, usage)

    messages.append({"role": "assistant", "content": text, "tool_calls": [
        {"id": calls[0]["id"], "type": "function",
         "function": {"name": "read_file", "arguments": calls[0]["arguments"]}}]})
    messages.append({"role": "tool", "tool_call_id": calls[0]["id"], "content": "def main(): pass"})
    # The SDK's own stream helper accumulates the same chunks.
    with c.chat.completions.stream(model=MODEL, messages=messages, tools=CHAT_TOOLS) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    check(final.choices[0].message.content == "Done.", final.choices[0].message)
    check(final.choices[0].finish_reason == "stop", final.choices[0])


def responses_non_streaming(c):
    first = c.responses.create(
        model=MODEL, instructions="You are a coding agent.", input="Read main.py",
        tools=RESPONSES_TOOLS, store=False, max_output_tokens=1024,
    )
    check(first.object == "response" and first.status == "completed", first.status)
    calls = [i for i in first.output if i.type == "function_call"]
    check(len(calls) == 1 and json.loads(calls[0].arguments) == {"path": "main.py"}, first.output)
    check([i.type for i in first.output] == ["reasoning", "message", "function_call"], first.output)
    check(first.output_text == "Let me read it.", first.output_text)
    check(first.usage.input_tokens == 25 and first.usage.total_tokens == 37, first.usage)

    items = [{"role": "user", "content": "Read main.py"}]
    items += [i.model_dump(exclude_none=True) for i in first.output]
    items.append({"type": "function_call_output", "call_id": calls[0].call_id,
                  "output": "def main(): pass"})
    second = c.responses.create(model=MODEL, input=items, tools=RESPONSES_TOOLS, store=False)
    check(second.output_text == "Done.", second.output)


def responses_streaming(c):
    with c.responses.stream(model=MODEL, input="Read main.py", tools=RESPONSES_TOOLS,
                            store=False) as stream:
        text = ""
        for event in stream:
            if event.type == "response.output_text.delta":
                text += event.delta
        first = stream.get_final_response()
    check(text == "Let me read it.", repr(text))
    calls = [i for i in first.output if i.type == "function_call"]
    check(len(calls) == 1 and json.loads(calls[0].arguments) == {"path": "main.py"}, first.output)

    items = [{"role": "user", "content": "Read main.py"}]
    items += [i.model_dump(exclude_none=True) for i in first.output]
    items.append({"type": "function_call_output", "call_id": calls[0].call_id,
                  "output": "def main(): pass"})
    kinds = []
    final = None
    for event in c.responses.create(model=MODEL, input=items, tools=RESPONSES_TOOLS,
                                    store=False, stream=True):
        kinds.append(event.type)
        if event.type == "response.completed":
            final = event.response
    check(kinds[0] == "response.created" and kinds[-1] == "response.completed", kinds)
    check(final is not None and final.output_text == "Done.", final)


def errors(c):
    expected = [
        (openai.RateLimitError, 429),
        (openai.AuthenticationError, 401),
        (openai.InternalServerError, 500),
    ]
    for cls, status in expected:
        try:
            c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
        except cls as e:
            check(e.status_code == status, (cls, e.status_code))
        else:
            raise AssertionError(f"expected {cls.__name__}")
    try:
        for _ in c.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True
        ):
            pass
    except openai.APIError as e:
        check("The server had an error" in str(e), str(e))
    else:
        raise AssertionError("expected an APIError from the chat stream")


def main():
    c = client()
    chat_non_streaming(c)
    chat_streaming(c)
    responses_non_streaming(c)
    responses_streaming(c)
    errors(c)
    print("openai SDK conformance: ok")


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # noqa: BLE001 - report anything as a failure
        print(f"FAILED: {type(e).__name__}: {e}", file=sys.stderr)
        raise
