"""Validates a job's events against the OpenAPI document the server serves.

argv: the document (JSON file), then a JSON file holding a list of SSE frames {"id", "data"}.
Each frame must match `EventFrame`, and each frame's `data`, parsed, must match `Event`.
Exits non-zero, naming every mismatch.
"""
import json
import sys

from jsonschema import Draft202012Validator


def validator(document, name):
    # The document is the root, so that "#/components/schemas/..." references resolve in it.
    schema = dict(document)
    schema["$ref"] = f"#/components/schemas/{name}"
    return Draft202012Validator(schema)


def main():
    document = json.load(open(sys.argv[1]))
    frames = json.load(open(sys.argv[2]))
    frame_check = validator(document, "EventFrame")
    event_check = validator(document, "Event")
    failures = []
    for frame in frames:
        for error in frame_check.iter_errors(frame):
            failures.append(f"frame {frame.get('id')}: {error.message}")
        event = json.loads(frame["data"])
        for error in event_check.iter_errors(event):
            failures.append(f"event {frame.get('id')} ({event.get('type')}): {error.message}")
    types = sorted({json.loads(f["data"])["type"] for f in frames})
    print(f"{len(frames)} events checked: {', '.join(types)}")
    if failures:
        print("\n".join(failures))
        sys.exit(1)


main()
