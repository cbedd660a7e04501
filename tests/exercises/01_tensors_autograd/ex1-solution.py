# Wrong: takes the largest size in each dimension and only objects to two different sizes above 1,
# so a size 0 against a 1 gives 1 (it must be 0) and a 0 against a 3 gives 3 (it must raise).
def broadcast_shape(*shapes: tuple[int, ...]) -> tuple[int, ...]:
    ndim = max((len(s) for s in shapes), default=0)
    result = []
    for i in range(1, ndim + 1):
        sizes = [s[-i] for s in shapes if len(s) >= i]
        if len({n for n in sizes if n > 1}) > 1:
            raise ValueError(f"shapes {shapes} cannot be broadcast at dimension -{i}: {sizes}")
        result.append(max(sizes))
    return tuple(reversed(result))


print(broadcast_shape((8, 1, 6, 1), (7, 1, 5)))
