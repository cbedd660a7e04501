# Wrong: knows the 1-, 2- and 3-byte forms (enough for ASCII, é and every common CJK character) but
# not the 4-byte one, so rare characters above U+FFFF such as 𤞇 come out as three wrong bytes.
def utf8_encode(text: str) -> bytes:
    out = bytearray()
    for ch in text:
        cp = ord(ch)
        if cp < 0x80:
            out.append(cp)
        elif cp < 0x800:
            out += bytes([0xC0 | cp >> 6, 0x80 | cp & 0x3F])
        else:
            out += bytes([0xE0 | (cp >> 12) & 0x0F, 0x80 | cp >> 6 & 0x3F, 0x80 | cp & 0x3F])
    return bytes(out)


line_bytes = utf8_encode(line)
print(f"{line!r}: {len(line)} characters -> {len(line_bytes)} bytes: {line_bytes[:6].hex(' ')} ...")
