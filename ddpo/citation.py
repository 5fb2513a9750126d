"""How to cite this code: the repository's ``CITATION.cff`` as data, for what an installed copy writes
(the exported model card). A wheel holds no ``CITATION.cff``; ``tests/test_tools.py`` checks that the
two agree."""

from ddpo import __version__

SOFTWARE = {
    "title": "ddpo-diffusion: reinforcement-learning fine-tuning of text-to-image diffusion models",
    "authors": ["The ddpo-diffusion contributors"],  # names (CITATION.cff: name), not family/given pairs
    "version": __version__,
    "license": "Apache-2.0",
}
# the method this code implements (CITATION.cff: references)
PAPER = {
    "title": "Training Diffusion Models with Reinforcement Learning",
    "authors": [
        ("Black", "Kevin"),
        ("Janner", "Michael"),
        ("Du", "Yilun"),
        ("Kostrikov", "Ilya"),
        ("Levine", "Sergey"),
    ],
    "year": 2024,
    "booktitle": "The Twelfth International Conference on Learning Representations (ICLR 2024)",
    "arxiv": "2305.13301",
    "url": "https://arxiv.org/abs/2305.13301",
}


def bibtex() -> str:
    """BibTeX entries for the software and the DDPO paper."""
    software = "\n".join(
        [
            "@software{ddpo_diffusion,",
            f"  title = {{{SOFTWARE['title']}}},",
            f"  author = {{{' and '.join('{' + name + '}' for name in SOFTWARE['authors'])}}},",
            f"  version = {{{SOFTWARE['version']}}},",
            f"  license = {{{SOFTWARE['license']}}},",
            "}",
        ]
    )
    authors = " and ".join(f"{family}, {given}" for family, given in PAPER["authors"])
    paper = "\n".join(
        [
            f"@inproceedings{{{PAPER['authors'][0][0].lower()}{PAPER['year']}training,",
            f"  title = {{{PAPER['title']}}},",
            f"  author = {{{authors}}},",
            f"  booktitle = {{{PAPER['booktitle']}}},",
            f"  year = {{{PAPER['year']}}},",
            f"  eprint = {{{PAPER['arxiv']}}},",
            "  archivePrefix = {arXiv},",
            f"  url = {{{PAPER['url']}}},",
            "}",
        ]
    )
    return f"{software}\n\n{paper}"
