# Wrong: the template without <|end|>: the model would never learn where an answer stops.
def my_encode_chat(tok, prompt: str, response: str) -> tuple[list[int], int]:
    ids = [tok.stoi[USER]] + tok.encode(prompt) + [tok.stoi[ASSISTANT]]
    n_prompt = len(ids)
    return ids + tok.encode(response), n_prompt
