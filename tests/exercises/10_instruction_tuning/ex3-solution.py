# Wrong: the plain character F1, punctuation included: shared commas and full stops earn credit.
from llmbook.tasks import char_f1


def next_line_credit(reply: str, reference: str) -> float:
    return char_f1(reply, reference)
