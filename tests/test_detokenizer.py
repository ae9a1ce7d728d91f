"""The incremental detokenizer alone, on a toy tokenizer (one character per token): pieces, and the text
that could begin a stop string held back until it is clear."""

from mini_infer.engine.detokenizer import TextStream


def pieces(text: str, stop: list[str]) -> tuple[list[str], TextStream]:
    stream = TextStream(lambda ids: "".join(map(chr, ids)), stop)
    return [
        stream.add([ord(c) for c in text[:n]], finished=n == len(text))
        for n in range(1, len(text) + 1)
    ], stream


def test_text_stream_holds_back_what_may_begin_a_stop_string():
    sent, stream = pieces("abcSTOP", ["STOP"])
    assert sent == ["", "", "", "a", "b", "c", ""] and stream.stopped and stream.text == "abc"
    sent, stream = pieces("abcSTOx", ["STOP"])
    assert sent == ["", "", "", "a", "b", "c", "STOx"] and not stream.stopped


def test_text_stream_without_stop_strings_sends_each_token_at_once():
    sent, stream = pieces("abc", [])
    assert sent == ["a", "b", "c"] and not stream.stopped


def test_a_character_split_over_tokens_waits_for_its_last_byte():
    data = "é!".encode()  # é is two UTF-8 bytes, one token each
    stream = TextStream(lambda ids: bytes(ids).decode(errors="replace"))
    assert [
        stream.add(list(data[:n]), finished=n == len(data)) for n in range(1, len(data) + 1)
    ] == ["", "é", "!"]
