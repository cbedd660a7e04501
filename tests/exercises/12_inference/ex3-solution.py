# Wrong: keeps each chunk's text in place of the last, so only the final piece survives.
def stream_text(events: list[str]) -> str:
    text = ""
    for line in events:
        payload = line.removeprefix("data: ")
        if payload == "[DONE]":
            break
        text = json.loads(payload)["choices"][0]["text"]
    return text


print(repr(stream_text(events)))
