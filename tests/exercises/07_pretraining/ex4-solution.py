# Wrong: checks every non-empty line after the header instead of stopping at the first empty line,
# so text after the poem's blank line (the next poem, or a model's run-on output) counts as extra
# poem lines. A quatrain followed by more text is still a well-formed 五言绝句 for is_well_formed.
def is_wujue(text: str) -> bool:
    lines = [line for line in text.split("\n")[1:] if line]
    sentence = f"[{CJK}]{{5}}"
    couplet = re.compile(f"{sentence}[，？！]{sentence}[。？！]")
    return len(lines) == 2 and all(couplet.fullmatch(line) for line in lines)
