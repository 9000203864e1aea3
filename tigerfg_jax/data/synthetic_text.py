"""Typed queries for the synthetic catalog (`text_queries.jsonl`, docs/DATA.md).

Each query names some attributes of a product of its split, in one of several word
orders and wordings ("striped red mug", "red mug with blue stripes", "mug in red",
"plain red mug"). Most name the pattern, which the titles usually leave out
(`synthetic.TITLE_PATTERN_PROB`) and the image always shows; some name colour and kind
only. A query's relevant items are every item of the split whose product has all the
attributes it names, so queries naming fewer attributes have several.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

# Which attributes a query names, and how often (the product's kind and colour, its
# pattern, the pattern's accent colour). Every set but the last names the pattern.
ATTRIBUTE_SETS = (
    (("kind", "colour", "pattern", "accent"), 0.3),
    (("kind", "colour", "pattern"), 0.3),
    (("kind", "pattern"), 0.25),
    (("kind", "colour"), 0.15),
)
_ADJECTIVES = {"plain": ("plain",), "stripes": ("striped",), "dots": ("dotted", "polka dot"),
               "checks": ("checked", "checkered")}
_NOUNS = {"stripes": "stripes", "dots": "dots", "checks": "checks"}


def _phrase(named: dict[str, str], rng: np.random.Generator) -> str:
  """One wording of the named attributes (`kind` always; others optional)."""
  kind, colour = named["kind"], named.get("colour")
  pattern, accent = named.get("pattern"), named.get("accent")
  if pattern is None:
    return str(rng.choice([f"{colour} {kind}", f"{kind} in {colour}",
                           f"{colour} coloured {kind}"]))
  adjective = str(rng.choice(_ADJECTIVES[pattern]))
  if accent is not None:
    noun = _NOUNS[pattern]
    return str(rng.choice([f"{colour} {kind} with {accent} {noun}",
                           f"{kind} in {colour} with {accent} {noun}",
                           f"{accent} {noun} on a {colour} {kind}"]))
  if colour is None:
    return str(rng.choice([f"{adjective} {kind}", f"{kind}, {adjective}",
                           f"{kind} with {_NOUNS.get(pattern, 'no pattern')}"]))
  return str(rng.choice([f"{adjective} {colour} {kind}", f"{colour} {adjective} {kind}",
                         f"{kind}, {colour}, {adjective}"]))


def _attributes(product) -> dict[str, str]:
  named = {"kind": product.kind, "colour": product.colour, "pattern": product.pattern}
  if product.accent is not None:
    named["accent"] = product.accent
  return named


def text_queries(split_name: str, products: Sequence, product_of_item: Sequence[int],
                 item_ids: Sequence[str], rng: np.random.Generator) -> list[dict]:
  """One query per product of the split (first listing order), duplicates of an earlier
  query's text left out: `{"query_id", "text", "item_ids"}` lines."""
  attributes = [_attributes(products[p]) for p in product_of_item]
  sets, weights = zip(*ATTRIBUTE_SETS)
  lines, seen = [], set()
  for p in dict.fromkeys(product_of_item):
    full = _attributes(products[p])
    wanted = sets[rng.choice(len(sets), p=np.asarray(weights) / sum(weights))]
    named = {k: full[k] for k in wanted if k in full}
    if full["pattern"] == "plain" and "pattern" not in named:
      named.pop("accent", None)
    text = _phrase(named, rng)
    if text in seen:
      continue
    seen.add(text)
    relevant = [item_ids[i] for i, a in enumerate(attributes)
                if all(a.get(k) == v for k, v in named.items())]
    lines.append({"query_id": f"{split_name}-text-{len(lines):05d}", "text": text,
                  "item_ids": relevant})
  return lines
