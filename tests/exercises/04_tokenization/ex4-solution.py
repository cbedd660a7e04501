# Wrong: reports each unseen character only the first time it appears, so a character that is
# missing twice (as in 纷㘈㘈) is listed once and the user cannot see everything that was lost.
def encode_report(text: str, stoi: dict[str, int],
                  unk_id: int) -> tuple[list[int], list[tuple[int, str]]]:
    ids, unknown, seen = [], [], set()
    for pos, c in enumerate(text):
        if c in stoi:
            ids.append(stoi[c])
        else:
            ids.append(unk_id)
            if c not in seen:
                unknown.append((pos, c))
                seen.add(c)
    return ids, unknown
