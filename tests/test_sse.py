import random

from proxy.sse import Chunk, SSEParser, encode_event

STREAM = (b"data: {\"a\":1}\n\n"
          b": comment\n\n"
          b"event: message_start\ndata: {\"b\":2}\n\n"
          b"data: line one\ndata: line two\n\n"
          b"data: {\"c\":3}\r\n\r\n"
          b"data: [DONE]\n\n")
EXPECTED = [b"data: {\"a\":1}", b": comment", b"event: message_start\ndata: {\"b\":2}",
            b"data: line one\ndata: line two", b"data: {\"c\":3}", b"data: [DONE]"]


def test_whole_stream_in_one_read():
    assert SSEParser().feed(STREAM) == EXPECTED


def test_every_split_point_gives_the_same_events():
    for cut in range(1, len(STREAM)):
        parser = SSEParser()
        assert parser.feed(STREAM[:cut]) + parser.feed(STREAM[cut:]) == EXPECTED, cut


def test_random_chunking_with_crlf_and_bare_cr():
    stream = STREAM.replace(b"\n", b"\r\n") + b"data: x\r\rdata: y\r\n\r\n"
    rng = random.Random(7)
    for _ in range(300):
        parser, events, i = SSEParser(), [], 0
        while i < len(stream):
            n = rng.randint(1, 9)
            events += parser.feed(stream[i:i + n])
            i += n
        assert events == EXPECTED + [b"data: x", b"data: y"]
        assert parser.pending == b""


def test_extra_blank_lines_make_no_empty_events():
    assert SSEParser().feed(b"\n\ndata: a\n\n\n\n\ndata: b\n\n") == [b"data: a", b"data: b"]
    assert SSEParser().feed(b"data: a\n\n\ndata: b\r\n\r\n\r\ndata: c\n\n") == [b"data: a", b"data: b", b"data: c"]


def test_pending_holds_an_unterminated_event():
    parser = SSEParser()
    assert parser.feed(b"data: a\n\ndata: par") == [b"data: a"]
    assert parser.pending == b"data: par"


def test_chunk_views_are_lazy_and_consistent():
    chunk = Chunk(b"event: delta\ndata: {\"x\": 1}")
    assert chunk._parsed is False
    assert chunk.event == "delta"
    assert chunk.json == {"x": 1}
    chunk.set_json({"x": 2})
    assert chunk.raw == b"event: delta\ndata: {\"x\":2}"
    assert Chunk(b"data: [DONE]").is_done and Chunk(b"data: [DONE]").json is None
    assert Chunk(b": keepalive").is_comment
    assert Chunk(b"data: a\ndata: b").data == "a\nb"


def test_encode_event_splits_multiline_data():
    assert encode_event("a\nb", "ev") == b"event: ev\ndata: a\ndata: b"
