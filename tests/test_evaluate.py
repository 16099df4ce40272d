"""Issue 4: the evaluation rules (documented in train/evaluate.py) judge answers as intended."""
from train.evaluate import answer_correct, is_story, wer, words


def test_wer_normalises_case_punctuation_and_numbers():
    assert wer(["Turn on the lights, Nina."], ["turn on the lights nina"]) == 0.0
    assert wer(["It is 4 o'clock"], ["it is four o'clock"]) == 0.0
    assert wer(["a b c d"], ["a x c"]) == 0.5          # one substitution + one deletion over 4 words
    assert words("Twenty-one") == ["twenty", "one"]


def test_attribute_answers():
    assert answer_correct("Four.", "There are 4 beeps.")
    assert answer_correct("Square wave synthesizer.", "A square wave synthesizer is playing.")
    assert not answer_correct("Square wave synthesizer.", "A plucked string.")
    assert answer_correct("No.", "No, it is rain.")
    assert not answer_correct("No.", "Yes, it is not rain.")
    assert not answer_correct("Male.", "")
    # tempo estimates: within 4 % (MIREX Accuracy 1), and only the first number counts
    assert answer_correct("About 100.", "About 103 beats per minute.")
    assert not answer_correct("About 100.", "About 105.")
    assert not answer_correct("About 100.", "About 90, or maybe 100.")


def test_story_rule():
    caption = "A high-pitched tone beeps four times."
    story = ("Late at night the old lighthouse keeper heard a strange beeping from the radio. "
             "He counted four sharp tones, each higher than the wind outside. "
             "Remembering his training, he climbed the stairs and lit the great lamp. "
             "Far out at sea, a small boat saw the light and turned safely toward the harbor, "
             "and the keeper smiled as the beeping finally stopped.")
    assert is_story(story, [caption])
    assert not is_story(caption, [caption])
    assert not is_story(" ".join([caption] * 8), [caption])     # long, but only the caption repeated
