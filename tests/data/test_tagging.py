"""Tag schemes: entity spans with CoNLL semantics (checked against seqeval), detection, conversion."""

from __future__ import annotations

import random
import warnings

import pytest
from seqeval.metrics.sequence_labeling import get_entities

from adapterkit.data.tagging import (
    Span,
    convert_tags,
    detect_scheme,
    entity_spans,
    label_types,
    labels_scheme,
    scheme_labels,
    scheme_name,
    split_tag,
)

TAGS = ["O"] + [f"{p}-{t}" for p in "BIES" for t in ("PER", "LOC", "geo-loc")]


def _seqeval(tags: list[str]) -> list[tuple[str, int, int]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sorted((t, s, e + 1) for t, s, e in get_entities(list(tags)))


@pytest.mark.parametrize("tags, expected", [
    (["B-PER", "I-PER", "O", "B-LOC"], [Span("PER", 0, 2), Span("LOC", 3, 4)]),
    (["I-PER", "I-PER", "B-PER", "O"], [Span("PER", 0, 2), Span("PER", 2, 3)]),  # IOB1
    (["O", "I-PER", "I-LOC"], [Span("PER", 1, 2), Span("LOC", 2, 3)]),  # I- without B-, type change
    (["B-PER", "E-PER", "S-LOC", "B-LOC", "I-LOC", "E-LOC"],
     [Span("PER", 0, 2), Span("LOC", 2, 3), Span("LOC", 3, 6)]),  # BIOES
    (["E-PER", "E-PER", "I-PER"], [Span("PER", 0, 1), Span("PER", 1, 2), Span("PER", 2, 3)]),
    (["B-geo-loc", "I-geo-loc"], [Span("geo-loc", 0, 2)]),
    ([], []),
])
def test_entity_spans_by_hand(tags, expected):
    assert entity_spans(tags) == expected
    assert sorted(entity_spans(tags)) == [Span(*s) for s in _seqeval(tags)]


def test_entity_spans_match_seqeval_on_random_and_malformed_sequences():
    rng = random.Random(0)
    for _ in range(3000):
        tags = [rng.choice(TAGS) for _ in range(rng.randint(1, 10))]
        assert sorted(entity_spans(tags)) == [Span(*s) for s in _seqeval(tags)], tags


def test_conversion_keeps_the_entities():
    rng = random.Random(1)
    for _ in range(1000):
        tags = [rng.choice(TAGS) for _ in range(rng.randint(1, 10))]
        for scheme in ("IOB1", "IOB2", "BIOES"):
            assert entity_spans(convert_tags(tags, scheme)) == entity_spans(tags)


def test_conversion_by_hand():
    iob1 = ["I-PER", "I-PER", "B-PER", "O", "I-LOC"]
    assert convert_tags(iob1, "IOB2") == ["B-PER", "I-PER", "B-PER", "O", "B-LOC"]
    assert convert_tags(iob1, "BIOES") == ["B-PER", "E-PER", "S-PER", "O", "S-LOC"]
    assert convert_tags(["B-PER", "B-PER", "O", "B-LOC", "I-LOC"], "IOB1") == \
        ["I-PER", "B-PER", "O", "I-LOC", "I-LOC"]


def test_detect_scheme():
    assert detect_scheme([["B-PER", "I-PER", "O"], ["O"]]) == "IOB2"
    assert detect_scheme([["B-PER", "O"], ["O", "I-LOC"]]) == "IOB1"
    assert detect_scheme([["S-PER"], ["I-PER"]]) == "BIOES"


def test_names_and_vocabularies():
    assert scheme_name("bio") == "IOB2" and scheme_name("IOBES") == "BIOES"
    with pytest.raises(ValueError, match="unknown tag scheme"):
        scheme_name("BILOUX")
    assert split_tag("B-geo-loc") == ("B", "geo-loc") and split_tag("O") == ("O", "")
    for bad in ("PER", "X-PER", "B-", "b-PER"):
        with pytest.raises(ValueError, match="PREFIX-TYPE"):
            split_tag(bad)
    assert scheme_labels(["PER", "LOC"], "IOB1") == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    bioes = scheme_labels(["PER"], "BIOES")
    assert bioes == ["O", "B-PER", "I-PER", "E-PER", "S-PER"] and labels_scheme(bioes) == "BIOES"
    assert label_types(bioes) == ["PER"]
