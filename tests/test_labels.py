from collections import Counter

from data_prep.labels import bad_characters, format_dictionary, letter_counts, letters_to_words, to_letters


def test_letter_format_matches_fairseq_libri_labels():
    assert to_letters("HELLO WORLD") == "H E L L O | W O R L D |"
    assert to_letters("DON'T") == "D O N ' T |"


def test_letters_round_trip():
    for text in ["A", "HELLO WORLD", "IT'S A LONG ROAD HOME"]:
        assert letters_to_words(to_letters(text)) == text


def test_dictionary_sorted_by_count_then_symbol():
    counts = letter_counts(["A B |", "B B |"])
    assert counts == Counter({"B": 3, "|": 2, "A": 1})
    assert format_dictionary(counts) == "B 3\n| 2\nA 1\n"
    assert format_dictionary(Counter({"Z": 1, "A": 1})) == "A 1\nZ 1\n"


def test_bad_characters():
    assert bad_characters("HELLO WORLD") == []
    assert bad_characters("HELLO, world 3") == [",", "3", "d", "l", "o", "r", "w"]
