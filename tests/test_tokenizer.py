from vlm_demo.tokenizer import CLS, PAD, UNK, Tokenizer, normalize


def test_normalize_lowercases_and_strips_punctuation():
    assert normalize("A Red, CIRCLE!  at the top-left.") == ["a", "red", "circle", "at", "the", "top", "left"]


def test_round_trip_and_unknown_words():
    tok = Tokenizer.build(["a red circle", "a blue square"], context_length=8)
    ids = tok.encode("A red circle!")
    assert ids[0] == tok.stoi[CLS]
    assert tok.decode(ids) == "a red circle"
    unk = tok.encode("a purple circle")
    assert unk[2] == tok.stoi[UNK]
    assert tok.decode(unk) == "a <unk> circle"


def test_pads_and_truncates():
    tok = Tokenizer.build(["one two three four five six seven eight nine"], context_length=4)
    assert tok.encode("one") == [tok.stoi[CLS], tok.stoi["one"], tok.stoi[PAD], tok.stoi[PAD]]
    long = tok.encode("one two three four five")
    assert len(long) == 4 and tok.decode(long) == "one two three"
    assert tok.encode_batch(["one", "two"]).shape == (2, 4)
    assert tok.encode_batch([]).shape == (0, 4)


def test_vocabulary_most_frequent_first_and_min_count():
    tok = Tokenizer.build(["b a", "a c", "a b"], min_count=2)
    assert tok.itos[3:] == ["a", "b"]


def test_save_load(tmp_path):
    tok = Tokenizer.build(["a red circle"], context_length=6)
    tok.save(tmp_path)
    back = Tokenizer.load(tmp_path)
    assert back.itos == tok.itos and back.context_length == 6
    assert back.encode("red circle") == tok.encode("red circle")
