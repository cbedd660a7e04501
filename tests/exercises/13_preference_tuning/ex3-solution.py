def opposition_reward(text: str, form: str) -> float:
    # wrong: compares the odd positions (1, 3, 5), which the rules leave free, not the even ones
    if not tone_check(text, form).well_formed:
        return 0.0
    sents = sentences(text)
    couplets = list(zip(sents[0::2], sents[1::2]))

    def opposed(a: str, b: str) -> bool:
        for i in range(0, len(a), 2):
            ta, tb = tone(a[i]), tone(b[i])
            if ta in ("平", "仄") and tb in ("平", "仄") and ta == tb:
                return False
        return True

    return sum(opposed(a, b) for a, b in couplets) / len(couplets)
