"""Formulas over concepts: AND, OR and AND NOT of concept masks (Mu & Andreas, NeurIPS 2020).

A formula is a tree: a :class:`Leaf` is one concept (its label number), a :class:`Node` combines two
formulas with ``AND``, ``OR`` or ``AND NOT``. Its mask in an image is built from the concepts' masks (a
pixel carries a concept when any label layer gives it there, or when it is an image-level label of the
image), and its *domain* is the set of images that have the category of any of its concepts: the images
where the paper's protocol would score one of them (``A[u, c]`` counts a unit's mask only there).

The text form is what ``explanations.csv`` holds and what users type: concept names joined by the
operators, NOT binding tighter than AND, AND tighter than OR, with parentheses (``(red-c OR blue-c) AND
ball``). A name is everything between operators and parentheses, spaces included.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Union

from ...core.errors import DissectionError, UnknownNameError
from ...core.types import Vocabulary

AND, OR, AND_NOT = "AND", "OR", "AND NOT"
#: The operators in the order the search tries them (ties between candidates go to the earlier one).
OPERATORS = (AND, OR, AND_NOT)


@dataclass(frozen=True)
class Leaf:
    label: int


@dataclass(frozen=True)
class Node:
    op: str
    left: Formula
    right: Formula


Formula = Union[Leaf, Node]  # noqa: UP007 (a runtime alias: dataclass fields refer to it by name)


def leaves(formula: Formula) -> list[int]:
    """The label numbers of the formula's concepts, left to right (repeats kept)."""
    if isinstance(formula, Leaf):
        return [formula.label]
    return leaves(formula.left) + leaves(formula.right)


def length(formula: Formula) -> int:
    """The number of concepts in the formula (a concept named twice counts twice)."""
    return len(leaves(formula))


def canonical(formula: Formula) -> tuple[object, ...]:
    """A key equal for formulas that differ only by the order of AND-ed or OR-ed terms
    (``a AND b`` and ``b AND a``; ``(a AND NOT c) AND b`` and ``(a AND b) AND NOT c``)."""
    if isinstance(formula, Leaf):
        return ("L", formula.label)
    if formula.op == OR:
        terms: list[tuple[object, ...]] = []
        _or_terms(formula, terms)
        return ("OR", tuple(sorted(terms, key=repr)))
    positive: list[tuple[object, ...]] = []
    negative: list[tuple[object, ...]] = []
    _and_terms(formula, positive, negative)
    return ("AND", tuple(sorted(positive, key=repr)), tuple(sorted(negative, key=repr)))


def _or_terms(formula: Formula, into: list[tuple[object, ...]]) -> None:
    if isinstance(formula, Node) and formula.op == OR:
        _or_terms(formula.left, into)
        _or_terms(formula.right, into)
    else:
        into.append(canonical(formula))


def _and_terms(formula: Formula, positive: list[tuple[object, ...]], negative: list[tuple[object, ...]]) -> None:
    if isinstance(formula, Node) and formula.op in (AND, AND_NOT):
        _and_terms(formula.left, positive, negative)
        if formula.op == AND:
            _and_terms(formula.right, positive, negative)
        else:
            negative.append(canonical(formula.right))
    else:
        positive.append(canonical(formula))


def text(formula: Formula, names: list[str]) -> str:
    """The formula as text, with the parentheses its structure needs (and around an AND under an OR)."""
    if isinstance(formula, Leaf):
        return names[formula.label]
    left = text(formula.left, names)
    if isinstance(formula.left, Node) and (formula.left.op == OR) != (formula.op == OR):
        left = f"({left})"
    right = text(formula.right, names)
    if isinstance(formula.right, Node):
        right = f"({right})"
    return f"{left} {formula.op} {right}"


_TOKENS = re.compile(r"\(|\)|\bAND\b|\bOR\b|\bNOT\b")


def parse(source: str, vocabulary: Vocabulary) -> Formula:
    """A formula from its text; a concept the vocabulary lacks fails with close matches (one line)."""
    by_name: dict[str, int] = {}
    ambiguous: set[str] = set()
    for concept in vocabulary.concepts:
        if concept.name in by_name:
            ambiguous.add(concept.name)
        by_name[concept.name] = concept.number
    tokens: list[str] = []
    position = 0
    for match in _TOKENS.finditer(source):
        name = source[position:match.start()].strip()
        if name:
            tokens.append(name)
        tokens.append(match.group())
        position = match.end()
    if source[position:].strip():
        tokens.append(source[position:].strip())
    if not tokens:
        raise DissectionError("the formula is empty; write concepts joined by AND, OR, AND NOT")
    parser = _Parser(tokens, by_name, ambiguous, source)
    formula = parser.disjunction()
    if parser.at < len(tokens):
        raise DissectionError(f"the formula {source!r} has {tokens[parser.at]!r} where an operator or its end "
                              "should be")
    return formula


_OPERATOR_TOKENS = ("(", ")", "AND", "OR", "NOT")


class _Parser:
    """Recursive descent: disjunction := conjunction (OR conjunction)*;
    conjunction := term (AND [NOT] term)*; term := NAME | ( disjunction )."""

    def __init__(self, tokens: list[str], by_name: dict[str, int], ambiguous: set[str], source: str) -> None:
        self.tokens, self.by_name, self.ambiguous, self.source = tokens, by_name, ambiguous, source
        self.at = 0

    def peek(self) -> str | None:
        return self.tokens[self.at] if self.at < len(self.tokens) else None

    def take(self) -> str:
        token = self.peek()
        if token is None:
            raise DissectionError(f"the formula {self.source!r} ends where a concept should be")
        self.at += 1
        return token

    def disjunction(self) -> Formula:
        formula = self.conjunction()
        while self.peek() == "OR":
            self.take()
            formula = Node(OR, formula, self.conjunction())
        return formula

    def conjunction(self) -> Formula:
        formula = self.term()
        while self.peek() == "AND":
            self.take()
            op = AND
            if self.peek() == "NOT":
                self.take()
                op = AND_NOT
            formula = Node(op, formula, self.term())
        return formula

    def term(self) -> Formula:
        token = self.take()
        if token == "(":
            formula = self.disjunction()
            if self.take() != ")":
                raise DissectionError(f"the formula {self.source!r} has an unclosed parenthesis")
            return formula
        if token == "NOT":
            raise DissectionError(f"the formula {self.source!r} has NOT without AND before it; write A AND NOT B "
                                  "(a concept's complement alone is no formula)")
        if token in _OPERATOR_TOKENS:
            raise DissectionError(f"the formula {self.source!r} has {token!r} where a concept should be")
        if token in self.ambiguous:
            raise DissectionError(f"the concept name {token!r} names several concepts of the dataset; a formula "
                                  "cannot tell them apart")
        if token not in self.by_name:
            raise UnknownNameError("concept", token, sorted(self.by_name),
                                   hint="concepts are the label names of the dataset (label.csv)")
        return Leaf(self.by_name[token])
