# Wrong: counts pairs over the pieces joined end to end, so a pair that straddles two pieces (the
# last byte of one word and the first of the next) can win, which pre-splitting exists to prevent.
def bpe_step(chunks: list[list[int]], new_id: int) -> tuple[list[list[int]], tuple[int, int]]:
    flat = [t for ids in chunks for t in ids]
    counts = Counter(pairwise(flat))
    pair = min(counts, key=lambda p: (-counts[p], p))
    return [merge(ids, pair, new_id) for ids in chunks], pair
